"""Kernel vs naive: the library's penalty (forward + backward) against a naive port of the official code.

The naive port is written here, after the official TensorFlow code (``algorithm.md`` §1.4, §2): a Python loop over
the neuron sets and, for RP-CoMHE, over the ``C`` projections; each energy forms the ``2N × 2N`` cosine matrix of
``[V; −V]``, adds 1 to its diagonal, takes ``1/D`` and the strict upper triangle. It runs the backward of every
energy right away, which has the FLOPs of one big graph but keeps only one energy's ``2N × 2N`` intermediates alive
(the one-graph version runs out of 24 GiB on ResNet-50, ``algorithm.md`` §11). Both sides use the same layers (the
regularizer's selection) and the same projections (the regularizer's current draw); the values are asserted equal.

Every thread count of ``--thread-counts`` (default 1 and 2) is timed in the same process, interleaved round by
round. A model whose naive port takes more than 10 s per call (measured by the value check) gets one timed round
unless ``--repeats`` is given.

    python -m benchmarks.kernel                # resnet18, resnet50; 1 and 2 threads
    python -m benchmarks.kernel --models vit_small --thread-counts 1   # ViT-S/4 (32×32): minutes per naive call
    python -m benchmarks.kernel --models resnet18 --thread-counts 2
    python -m benchmarks.kernel --quick        # tiny sizes (smoke test)
"""

import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks import common

TARGETS = {("resnet18", "random"): 5.0, ("resnet50", "random"): 20.0}


def naive_energy(w: torch.Tensor, half_space: bool, eps: float = 1e-4) -> torch.Tensor:
    """The official s = 2 loss of one set (``algorithm.md`` §1.4): pair-mean of ``1/(2 - 2c)`` over ``i < j``."""
    x = torch.cat([w, -w], 0) if half_space else w
    n = x.shape[0]
    norm = torch.sqrt((x * x).sum(1, keepdim=True) + eps)
    cos = (x @ x.T) / (norm * norm.T)
    dist = 2.0 - 2.0 * cos + torch.eye(n, dtype=x.dtype, device=x.device)  # the official diagonal trick
    mask = torch.ones(n, n, dtype=x.dtype, device=x.device).triu(1)
    return (dist.pow(-1.0) * mask).sum() / (n * (n - 1) / 2)


def leaf_sets(reg) -> list[tuple[Any, torch.Tensor]]:
    """The regularizer's groups with detached leaf copies of their neurons (G, N, d)."""
    cache: dict = {}
    with torch.no_grad():
        return [(g, reg.group_neurons(g, cache).detach().clone().requires_grad_(True)) for g in reg.groups]


def group_projections(reg, sets) -> dict[str, torch.Tensor]:
    out = {}
    for group, w in sets:
        if group.mode == "projected":
            out[group.key] = reg.family.projector.projections(group.key, w.shape[0], w.shape[2], w.device, w.dtype)
    return out


def naive_penalty(sets, projections, backward: bool = True) -> tuple[float, dict[str, torch.Tensor]]:
    """Σ κ·E over every set, the naive way; returns the penalty and the per-group energies (G,)."""
    total = 0.0
    energies = {}
    for group, w in sets:
        per_set = []
        for i in range(w.shape[0]):
            wi = w[i]
            if group.mode == "projected":
                p = projections[group.key][i]  # (C, k, d)
                acc = 0.0
                for c in range(p.shape[0]):
                    e = naive_energy(wi @ p[c].T, half_space=True) / p.shape[0]
                    if backward:
                        (group.kappa * e).backward()
                    acc += e.item()
                per_set.append(acc)
            else:
                e = naive_energy(wi, half_space=group.mode == "half")
                if backward:
                    (group.kappa * e).backward()
                per_set.append(e.item())
        energies[group.key] = torch.tensor(per_set, dtype=torch.float64)
        total += group.kappa * sum(per_set)
    return total, energies


def library_energies(reg, sets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    total = None
    energies = {}
    for group, w in sets:
        e = reg.family.energy(group, w)
        energies[group.key] = e.detach().double()
        term = group.kappa * e.sum()
        total = term if total is None else total + term
    return total, energies


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--variants", nargs="+", default=["random", "half_mhe"])
    common.add_thread_counts(parser, (1, 2))
    args = parser.parse_args(argv)
    device = common.setup(args)
    counts = list(dict.fromkeys(args.thread_counts))
    models = args.models or (["tiny"] if args.quick else ["resnet18", "resnet50"])
    default_repeats = 2 if args.quick else 3
    used_repeats: dict[str, int] = {}
    rows, records = [], []
    for name in models:
        torch.manual_seed(0)
        model = common.create_model(name).to(device)
        for variant in args.variants:
            reg = common.make_regularizer(model, variant)
            reg.refresh()
            sets = leaf_sets(reg)
            projs = group_projections(reg, sets)
            common.log(f"[kernel] {name} {variant}: {sum(w.shape[0] for _, w in sets)} sets in {len(sets)} groups")

            # values (and gradients) of both implementations on the same leaves, the same projections
            lib_total, lib_e = library_energies(reg, sets)
            lib_total.backward()
            lib_grads = [w.grad.clone() for _, w in sets]
            for _, w in sets:
                w.grad = None
            t_check = time.perf_counter()
            naive_total, naive_e = naive_penalty(sets, projs)
            t_check = time.perf_counter() - t_check
            for key in lib_e:
                torch.testing.assert_close(lib_e[key], naive_e[key], rtol=1e-4, atol=0, msg=f"{name} {key}")
            grad_err = max(
                ((w.grad - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
                for (_, w), g in zip(sets, lib_grads, strict=True)
            )
            assert grad_err < 1e-3, f"{name} {variant}: gradients differ by {grad_err:.2e}"
            value_err = abs(lib_total.item() - naive_total) / abs(naive_total)
            model_pen = reg().penalty.item()
            assert abs(model_pen - naive_total) <= 1e-4 * abs(naive_total), (model_pen, naive_total)

            def library(model=model, reg=reg) -> None:
                model.zero_grad(set_to_none=True)
                reg().penalty.backward()

            def naive(sets=sets, projs=projs) -> None:
                for _, w in sets:
                    w.grad = None
                naive_penalty(sets, projs)

            repeats = args.repeats or (1 if t_check > 10 else default_repeats)
            used_repeats[f"{name}/{variant}"] = repeats
            fns, threads = {}, {}
            for t in counts:
                for side, fn in (("naive", naive), ("library", library)):
                    fns[common.thread_key(side, t)], threads[common.thread_key(side, t)] = fn, t
            res = common.interleaved(fns, repeats=repeats, warmup=0, device=device, threads=threads)
            target = TARGETS.get((name, variant))
            for t in counts:
                nv, lib = res[common.thread_key("naive", t)], res[common.thread_key("library", t)]
                speedup = nv["median_s"] / lib["median_s"]
                record = {
                    "model": name,
                    "variant": variant,
                    "threads": t,
                    "sets": sum(w.shape[0] for _, w in sets),
                    "groups": common.group_shapes(reg),
                    "naive": nv,
                    "library": lib,
                    "speedup": speedup,
                    "speedup_cpu_time": nv["cpu_median_s"] / lib["cpu_median_s"],
                    "target": target,
                    "met": None if target is None else speedup >= target,
                    "penalty": naive_total,
                    "value_rel_error": value_err,
                    "grad_rel_error": grad_err,
                }
                records.append(record)
                rows.append(
                    [
                        common.MODEL_LABELS.get(name, name),
                        common.VARIANT_LABELS.get(variant, variant),
                        t,
                        record["sets"],
                        common.fmt_s(nv["median_s"]),
                        common.fmt_s(lib["median_s"]),
                        f"**{speedup:.1f}×**",
                        "–" if target is None else f"≥ {target:.0f}× ({'met' if record['met'] else 'NOT met'})",
                        f"{value_err:.1e} / {grad_err:.1e}",
                    ]
                )
                common.log(f"[kernel]   @{t}: naive {nv['median_s']:.3f}s library {lib['median_s']:.3f}s")
    header = [
        "model",
        "variant",
        "threads",
        "sets",
        "naive fwd+bwd",
        "library fwd+bwd",
        "speed-up",
        "target",
        "rel. error value / grad",
    ]
    payload = common.payload("kernel", device, argv, repeats=used_repeats, thread_counts=counts, records=records)
    markdown = common.md_table(header, rows)
    common.save("kernel", args.out, payload, markdown)
    plot(records, args.out)
    return payload


def plot(records: list[dict[str, Any]], out) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    labels = [f"{common.MODEL_LABELS.get(r['model'], r['model'])}\n{r['variant']}, {r['threads']}T" for r in records]
    ax.bar(range(len(records)), [r["speedup"] for r in records], color="tab:blue")
    for i, r in enumerate(records):
        if r["target"]:
            ax.hlines(r["target"], i - 0.4, i + 0.4, colors="tab:red", linestyles="--")
    ax.set_xticks(range(len(records)), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up over the naive port")
    ax.set_title("Penalty forward+backward: library vs naive port (red: target)", fontsize=9)
    common.savefig(fig, "kernel", out)


def main(argv: Sequence[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
