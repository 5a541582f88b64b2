r"""The projection guarantee of RP-CoMHE: empirical probability of the poster's angle bound vs k and ε.

The poster states that for fixed :math:`w_1, w_2` and a Gaussian :math:`P \in \mathbb{R}^{k \times d}`

.. math::

    \frac{\cos\theta(w_1, w_2) - \epsilon}{1 + \epsilon} < \cos\theta(P w_1, P w_2)
    < \frac{\cos\theta(w_1, w_2) + \epsilon}{1 - \epsilon}

holds with probability at least :math:`\max(0, 1 - 2 e^{-k\epsilon^2/8})^2`. For each k, ε and a set of angles
:math:`\cos\theta \in` ``--cosines``, we draw ``--trials`` matrices and count how often both inequalities hold. By the
rotation invariance of the Gaussian matrix, :math:`(P w_1, P w_2)` for unit vectors with cosine ``c`` has the law of
:math:`(z_1, c z_1 + \sqrt{1 - c^2} z_2)` with :math:`z_1, z_2 \sim N(0, I_k)` independent; that is what we sample
(the script checks it against explicit ``k × d`` matrices for one setting). The reported probability is the minimum
over the cosines (the bound must hold for every pair).

Usage::

    python -m experiments.projection_guarantee
    python -m experiments.projection_guarantee --quick
"""

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experiments.cli import experiment_parser
from experiments.publishing import (
    DEFAULT_DOC,
    DEFAULT_OUT,
    doc_figure,
    environment,
    pyplot,
    save_figure,
    update_doc_block,
    write_json,
    write_text,
)

DEFAULT_KS = (5, 10, 20, 40, 80, 160)
DEFAULT_EPS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95
DEFAULT_COSINES = (-0.8, -0.4, 0.0, 0.4, 0.8)


def bound(k: int, eps: float) -> float:
    """The poster's lower bound ``max(0, 1 - 2 exp(-k eps^2 / 8))^2``."""
    return max(0.0, 1.0 - 2.0 * math.exp(-k * eps * eps / 8.0)) ** 2


def _projected_cosines(k: int, c: float, trials: int, generator: torch.Generator) -> torch.Tensor:
    z1 = torch.randn(trials, k, generator=generator, dtype=torch.float64)
    z2 = torch.randn(trials, k, generator=generator, dtype=torch.float64)
    a, b = z1, c * z1 + math.sqrt(max(0.0, 1.0 - c * c)) * z2
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def _explicit_cosines(k: int, d: int, c: float, trials: int, generator: torch.Generator) -> torch.Tensor:
    """The same with explicit Gaussian ``k × d`` matrices and a fixed pair of unit vectors of cosine ``c``."""
    w1 = torch.zeros(d, dtype=torch.float64)
    w1[0] = 1.0
    w2 = torch.zeros(d, dtype=torch.float64)
    w2[0], w2[1] = c, math.sqrt(1.0 - c * c)
    out = []
    for start in range(0, trials, 256):
        n = min(256, trials - start)
        p = torch.randn(n, k, d, generator=generator, dtype=torch.float64)
        a, b = p @ w1, p @ w2
        out.append((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)))
    return torch.cat(out)


def holds(cos_p: torch.Tensor, c: float, eps: float) -> float:
    """Fraction of trials in which both inequalities hold."""
    low = (c - eps) / (1 + eps)
    high = (c + eps) / (1 - eps) if eps < 1 else math.inf
    return float(((cos_p > low) & (cos_p < high)).double().mean())


def compute(ks: Sequence[int], eps: Sequence[float], cosines: Sequence[float], trials: int, seed: int) -> dict:
    """Empirical probabilities ``{k: {eps: {"min": p, "per_cosine": [...]}}}`` and the bound."""
    g = torch.Generator().manual_seed(seed)
    table: dict[str, Any] = {}
    for k in ks:
        samples = {c: _projected_cosines(k, c, trials, g) for c in cosines}
        table[str(k)] = {
            f"{e:g}": {"per_cosine": [holds(samples[c], c, e) for c in cosines], "bound": bound(k, e)} for e in eps
        }
        for e in eps:
            row = table[str(k)][f"{e:g}"]
            row["min"] = min(row["per_cosine"])
    return table


def plot(results: dict[str, Any], path: Path) -> None:
    """Empirical probability (solid) and the bound (dashed) against ε, one colour per k."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, k in enumerate(results["ks"]):
        rows = results["table"][str(k)]
        eps = [float(e) for e in rows]
        ax.plot(eps, [rows[e]["min"] for e in rows], color=f"C{i}", marker=".", label=f"k = {k} (empirical)")
        ax.plot(eps, [rows[e]["bound"] for e in rows], color=f"C{i}", ls="--", lw=1)
    ax.set_xlabel("ε")
    ax.set_ylabel("probability that the angle bound holds")
    ax.set_title(
        f"RP-CoMHE angle bound: empirical (solid; min over cos θ ∈ {results['cosines']})\nvs the guaranteed "
        "max(0, 1 − 2·exp(−kε²/8))² (dashed)",
        fontsize=9,
    )
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def markdown(results: dict[str, Any]) -> str:
    """A compact table (a subset of ε) and the violations of the bound, if any."""
    ks, table = results["ks"], results["table"]
    shown = [e for e in (0.1, 0.2, 0.3, 0.5, 0.7, 0.9) if f"{e:g}" in table[str(ks[0])]]
    lines = ["| k | " + " | ".join(f"ε={e:g}" for e in shown) + " |", "|---|" + "---|" * len(shown)]
    for k in ks:
        cells = [f"{table[str(k)][f'{e:g}']['min']:.3f} ({table[str(k)][f'{e:g}']['bound']:.3f})" for e in shown]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    # a violation must exceed the Monte-Carlo noise: 3 binomial standard deviations
    tol = 3 * math.sqrt(0.25 / results["trials"])
    violations = [
        (k, e, row["min"], row["bound"])
        for k in ks
        for e, row in table[str(k)].items()
        if row["min"] < row["bound"] - tol
    ]
    text = (
        "Empirical probability that the bound holds, minimum over the cosines (in parentheses the guaranteed "
        f"max(0, 1 − 2·exp(−kε²/8))²), {results['trials']} draws per (k, ε, cos θ):\n\n" + "\n".join(lines) + "\n\n"
    )
    if violations:
        text += "Cells where the empirical probability is below the bound by more than 3 Monte-Carlo std: " + ", ".join(
            f"k={k}, ε={e}: {p:.3f} < {b:.3f}" for k, e, p, b in violations
        )
    else:
        text += "The empirical probability is at or above the bound in every cell (within 3 Monte-Carlo std)."
    check = results["explicit_check"]
    text += (
        f"\n\nCheck of the sampling shortcut with explicit {check['k']}×{check['d']} Gaussian matrices "
        f"(cos θ = {check['cosine']}, ε = {check['eps']}): {check['explicit']:.3f} vs {check['shortcut']:.3f} "
        f"({check['trials']} draws each).\n"
    )
    return text


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Compute the probabilities, write ``projection_guarantee.{json,md,png}`` (and the doc block)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = experiment_parser("projection_guarantee", __doc__, common=False, allow_abbrev=False)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    parser.add_argument("--eps", type=float, nargs="+", default=list(DEFAULT_EPS))
    parser.add_argument("--cosines", type=float, nargs="+", default=list(DEFAULT_COSINES))
    parser.add_argument("--trials", type=int, default=None, help="draws per (k, ε, cos θ) (default 20000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--doc", type=Path, default=None)
    parser.add_argument("--no-doc", action="store_true")
    args, _ = parser.parse_known_args(argv)  # run_all passes training arguments too
    trials = args.trials or (2000 if args.quick else 20000)
    out = args.out if args.out is not None else (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    doc = None if (args.quick or args.no_doc) else (args.doc or DEFAULT_DOC)
    start = time.perf_counter()
    table = compute(args.ks, args.eps, args.cosines, trials, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    check_k, check_d, check_c, check_e = 20, 128, 0.4, 0.5
    check_trials = min(trials, 4000)
    results: dict[str, Any] = {
        "experiment": "projection_guarantee",
        "ks": list(args.ks),
        "eps": list(args.eps),
        "cosines": list(args.cosines),
        "trials": trials,
        "seed": args.seed,
        "table": table,
        "explicit_check": {
            "k": check_k,
            "d": check_d,
            "cosine": check_c,
            "eps": check_e,
            "trials": check_trials,
            "explicit": holds(_explicit_cosines(check_k, check_d, check_c, check_trials, g), check_c, check_e),
            "shortcut": holds(_projected_cosines(check_k, check_c, check_trials, g), check_c, check_e),
        },
        "command": " ".join(["python -m experiments.projection_guarantee", *argv]),
        "environment": environment(),
    }
    results["seconds"] = time.perf_counter() - start
    write_json(out / "projection_guarantee.json", results)
    png = out / "projection_guarantee.png"
    plot(results, png)
    text = markdown(results)

    def body(link: str) -> str:
        return (
            f"{text}\n![projection guarantee]({link})\n\n"
            f"Command: `{results['command']}` ({results['seconds']:.0f} s, seed {args.seed}, "
            f"{results['environment']['date']}).\n"
        )

    write_text(out / "projection_guarantee.md", body(png.name))
    if doc is not None:
        update_doc_block(doc, "projection_guarantee", body(doc_figure(png, doc)))
    print(text)
    return results


if __name__ == "__main__":
    main()
