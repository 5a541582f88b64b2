"""The report's cost-ladder rungs and the cheap-preset section (:mod:`benchmarks.report`)."""

from typing import Any

from benchmarks import common

_RUNG_NOTES = (
    ("mhe", '`variant="mhe"`', "full-space MHE of every layer: no projection, no noise"),
    ("half_mhe", '`variant="half_mhe"`', "half-space MHE ([W; −W]) of every layer: no projection, no noise"),
    (
        "RP official (k=40, C=20)",
        '`variant="random"`',
        "the official RP-CoMHE: C = 20 fresh Gaussian k = 40 projections per set and step, a Monte-Carlo "
        "estimate of the projected energy",
    ),
    (
        "RP C=4",
        '`variant="random", num_projections=4`',
        "the same expectation from 5× fewer draws: a noisier estimate (about 5× the variance of C = 20)",
    ),
    (
        "RP sparse",
        '`variant="random", projection_kind="sparse"`',
        "very sparse sign projections (density 1/√d): the Gaussian's entry moments, a cheaper projection; "
        "the JL guarantee holds for neurons whose mass is spread over many coordinates",
    ),
    (
        "RP expected",
        '`variant="random", projection_kind="expected"`',
        "the exact C → ∞ mean of the official estimator: no sampling noise, no draws, no random state in "
        "checkpoints; one full-space energy per set. For s = 2 its gradient is exactly k/(k−3) times half-space "
        "MHE's (`docs/math.md`): whatever the sampling noise of C = 20 did for accuracy is gone (not measured here)",
    ),
    ("angle", '`variant="angle"`', "a learned angle-preserving projection, one side-SGD step per refresh"),
    ("adversarial", '`variant="adversarial"`', "a learned adversarial projection, ten side-SGD ascent steps"),
    (
        "RP official, every 4",
        '`variant="random", every_n_steps=4`',
        "lazy regularization: the official penalty on one step in 4, weighted 4",
    ),
    ("RP official, every 8", '`variant="random", every_n_steps=8`', "the same, one step in 8"),
    (
        "expected, every 4",
        '`variant="random", projection_kind="expected", every_n_steps=4`',
        "the expected kind, lazily: one step in 4, weighted 4",
    ),
    (
        "expected, every 8",
        '`variant="random", projection_kind="expected", every_n_steps=8`',
        "**the cheap preset**: the expected kind on one step in 8, weighted 8",
    ),
)


def _ladder_ratio(lad: dict[str, Any] | None, rung: str, size: int, threads: int | None = None) -> dict | None:
    return next(
        (
            r
            for r in (lad or {}).get("records", [])
            if r["rung"] == rung and r["image_size"] == size and (threads is None or r["threads"] == threads)
        ),
        None,
    )


def preset_section(res: dict[str, dict[str, Any] | None]) -> str:
    """What to pick (the cheap preset), what every choice changes, and what each costs on the ladder."""
    lad = res.get("ladder")
    out = ["## What to pick: the cheap preset\n"]
    out.append(
        "```python\n"
        "from lightning_comhe import CoMHE\n\n"
        'callback = CoMHE(variant="random", projection_kind="expected", every_n_steps=8)\n'
        "```\n"
    )
    small = min((r["image_size"] for r in (lad or {}).get("records", [])), default=32)
    cheap = _ladder_ratio(lad, "expected, every 8", small)
    official = _ladder_ratio(lad, "RP official (k=40, C=20)", small, cheap["threads"] if cheap else None)
    large = next(
        (r for r in (lad or {}).get("records", []) if r["rung"] == "expected, every 8" and r["image_size"] > small),
        None,
    )
    if cheap and official:
        line = (
            f"On this machine it costs **{cheap['ratio']:.2f}×** the plain Lightning step of "
            f"{common.MODEL_LABELS.get(cheap['model'], cheap['model'])} at {small}×{small} "
            f"(batch {cheap['batch_size']}, {cheap['threads']} thread"
            + ("s" if cheap["threads"] > 1 else "")
            + f"), against {official['ratio']:.2f}× for the official RP-CoMHE at every step"
        )
        if large:
            line += (
                f"; at {large['image_size']}×{large['image_size']} (batch {large['batch_size']}) {large['ratio']:.2f}×"
            )
        out.append(line + " (section 4).\n")
    out.append(
        "It keeps RP-CoMHE's expected penalty (the same energy in expectation, same layers, same κ) and removes "
        "the two costs that dominate small-image training: the C = 20 projection matmuls (the expectation has "
        "none) and the per-step evaluation (lazy regularization). What each part changes:\n\n"
        '* **`projection_kind="expected"`**: the exact C → ∞ mean of the official estimator. Deterministic: no '
        "sampling noise, no projections, no random state; the regularizer is a full-space energy with a corrected "
        "pair kernel (for s = 2 exactly k/(k−3) times half-space MHE plus a constant, `docs/math.md`). If the "
        "noise of fresh draws helped as a regularizer, that is gone; this page does not measure accuracy.\n"
        "* **`every_n_steps=m`** (lazy regularization, StyleGAN2's lazy R1): the penalty and the refresh of the "
        "projections run on the steps with `global_step % m == 0`, weighted by m; nothing on the others. With "
        "SGD the average gradient is the same. **Adam / AdamW:** the burst m·∇R is damped on the step it lands on "
        "and inflates the second-moment estimate for the steps after it, so it is not equivalent to ∇R at every "
        "step: keep m small with adaptive optimizers, or compare against m = 1 first (`docs/math.md`, “Lazy "
        "regularization”). `resample_every`, `log_every` and `srip_iterations` then count penalized steps, and "
        "`comhe/penalty` is logged without the factor m.\n"
        "* Fewer projections (`num_projections=4`) keep the expectation but make the estimate noisier; "
        '`projection_kind="sparse"` changes the distribution of the projections (same entry moments).\n'
    )
    sizes = sorted({r["image_size"] for r in (lad or {}).get("records", [])})
    counts = sorted({r["threads"] for r in (lad or {}).get("records", []) if r["image_size"] == sizes[0]})
    header = ["setting", "what it changes"]
    header += [f"{s}×{s}, {t} thread" + ("s" if t > 1 else "") for s in sizes[:1] for t in counts]
    header += [f"{s}×{s}" for s in sizes[1:]]
    rows = []
    for rung, code, note in _RUNG_NOTES:
        cells = [code, note]
        for s in sizes[:1]:
            for t in counts:
                rec = _ladder_ratio(lad, rung, s, t)
                cells.append(f"{rec['ratio']:.2f}×" if rec else "–")
        for s in sizes[1:]:
            rec = _ladder_ratio(lad, rung, s)
            cells.append(f"{rec['ratio']:.2f}×" if rec else "–")
        rows.append(cells)
    if lad:
        out.append("Step time relative to the plain Lightning step (ResNet-18, the cost ladder of section 4):\n")
    out.append(common.md_table(header, rows) + "\n")
    return "\n".join(out)
