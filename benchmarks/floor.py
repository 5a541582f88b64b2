"""Closeness to the limit: every variant's penalty vs the time of its unavoidable GEMM FLOPs.

For each variant the penalty of one optimizer step (refresh: resample / fit the projections; forward; backward) is
timed on a model's layer sets, next to the time its unavoidable FLOPs take at the plain fp32 matmul rate measured in
the same run (:func:`benchmarks.common.floor_flops`: the projections plus the k-dimensional Grams, the full-space
Grams, and the learned projections' inner steps). Target: within 1.5× of that floor, for every variant. Where a
variant misses it, a torch.profiler breakdown says where the remaining time goes.

    python -m benchmarks.floor                  # resnet18 and resnet50 layer sets
    python -m benchmarks.floor --quick
"""

from collections.abc import Sequence
from typing import Any

import torch

from benchmarks import common

TARGET = 1.5


#: Matmul shapes the penalties run (name -> (batch, m, k, n)), to show how close to the square-matmul rate they get.
SHAPES = {
    "square fp32 matmul 2048³ (the floor's rate)": (1, 2048, 2048, 2048),
    "RP projection: 512×4608 by 4608×800 (C·k), 3 sets": (3, 512, 4608, 800),
    "AP / adversarial projection: 512×4608 by 4608×30, 3 sets": (3, 512, 4608, 30),
    "Gram tile, k = 40: 16 × (128×40 by 40×512)": (16, 128, 40, 512),
    "gradient tile: 16 × (128×512 by 512×40)": (16, 128, 512, 40),
}


def shape_rates(device: torch.device, quick: bool) -> dict[str, float]:
    """GFLOP/s (median) of the matmul shapes of :data:`SHAPES` (scaled down with ``quick``)."""
    out = {}
    for name, (b, m, k, n) in SHAPES.items():
        if quick:
            b, m, k, n = b, max(8, m // 16), max(8, k // 16), max(8, n // 16)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(b, m, k, generator=g, device=device)
        y = torch.randn(b, k, n, generator=g, device=device)
        res = common.interleaved(
            {"mm": lambda x=x, y=y: torch.bmm(x, y)}, repeats=3 if quick else 7, warmup=2, device=device
        )
        out[name] = 2 * b * m * k * n / res["mm"]["median_s"] / 1e9
    return out


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--variants", nargs="+", default=list(common.VARIANTS))
    parser.add_argument("--no-profile", action="store_true", help="skip the profiles of variants above the target")
    args = parser.parse_args(argv)
    device = common.setup(args)
    models = args.models or (["tiny"] if args.quick else ["resnet18", "resnet50"])
    repeats = args.repeats or (2 if args.quick else 5)
    rate = common.matmul_rate(device, n=256 if args.quick else 2048, repeats=3 if args.quick else 7)
    common.log(f"[floor] matmul rate {rate:.1f} GFLOP/s with {args.threads} thread(s)")
    records, rows = [], []
    for name in models:
        torch.manual_seed(0)
        model = common.create_model(name).to(device)
        regs = {v: common.make_regularizer(model, v) for v in args.variants}
        fns = {v: common.penalty_step(r) for v, r in regs.items()}
        res = common.interleaved(fns, repeats=repeats, warmup=1, device=device)
        rate_after = common.matmul_rate(device, n=256 if args.quick else 2048, repeats=3 if args.quick else 7)
        mm_rate = (rate + rate_after) / 2  # the same run, before and after: drift shows in the JSON
        for variant, reg in regs.items():
            flops = common.floor_flops(reg)
            floor_s = flops["total"] / (mm_rate * 1e9)
            t = res[variant]["median_s"]
            ratio = t / floor_s
            record = {
                "model": name,
                "variant": variant,
                "time": res[variant],
                "flops": flops,
                "floor_s": floor_s,
                "ratio": ratio,
                "ratio_cpu_time": res[variant]["cpu_median_s"] / floor_s,
                "met": ratio <= TARGET,
                "matmul_gflops": [rate, rate_after],
            }
            if not record["met"] and not args.no_profile:
                record["profile"] = common.profile_breakdown(fns[variant], runs=1 if args.quick else 2)
            records.append(record)
            rows.append(
                [
                    common.MODEL_LABELS.get(name, name),
                    common.VARIANT_LABELS.get(variant, variant),
                    f"{flops['total'] / 1e9:.1f}",
                    common.fmt_s(floor_s),
                    common.fmt_s(t),
                    f"**{ratio:.2f}×**",
                    "met" if record["met"] else "NOT met",
                ]
            )
            common.log(f"[floor] {name} {variant}: {t:.3f}s vs floor {floor_s:.3f}s = {ratio:.2f}x")
        rate = rate_after
    header = ["model", "variant", "floor GFLOP", "floor time", "penalty step", "ratio", f"≤ {TARGET}×"]
    rates = shape_rates(device, args.quick)
    markdown = common.md_table(header, rows)
    markdown += "\n\nMatmul rates of the shapes the penalties run (same run, same threads):\n\n"
    markdown += common.md_table(["shape", "GFLOP/s"], [[k, f"{v:.1f}"] for k, v in rates.items()])
    payload = common.payload("floor", device, argv, repeats=repeats, target=TARGET, records=records, shape_gflops=rates)
    common.save("floor", args.out, payload, markdown)
    plot(records, args.out)
    return payload


def plot(records: list[dict[str, Any]], out) -> None:
    fig, panels = common.model_panels(records, "penalty time / GEMM floor")
    for ax, recs in panels:
        colors = ["tab:green" if r["met"] else "tab:orange" for r in recs]
        ax.bar(range(len(recs)), [r["ratio"] for r in recs], color=colors)
        ax.axhline(TARGET, color="tab:red", linestyle="--", linewidth=1)
        ax.axhline(1.0, color="black", linewidth=0.5)
    fig.suptitle("Closeness to the GEMM floor (red: 1.5× target)", fontsize=9)
    common.savefig(fig, "floor", out)


def main(argv: Sequence[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
