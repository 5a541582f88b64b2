"""Closeness to the limit: every variant's penalty vs the time of its unavoidable GEMM FLOPs, at 1 and 2 threads.

For each variant the penalty of one optimizer step (refresh: resample / fit the projections; forward; backward) is
timed on a model's layer sets, next to the time its unavoidable FLOPs take at the plain fp32 matmul rate measured in
the same rounds (:func:`benchmarks.common.floor_flops`: the projections plus the k-dimensional Grams, the full-space
Grams, and the learned projections' inner steps). Every thread count of ``--thread-counts`` (default 1 and 2) is
measured in the same process, interleaved round by round (the variants, and the 2048³ matmul that gives the floor's
rate, each at each thread count), so the two columns of the table share the machine's conditions. Target: within
1.5× of that floor, for every variant. Where a variant misses it, a torch.profiler breakdown (at the first thread
count where it misses) says where the remaining time goes.

    python -m benchmarks.floor                          # resnet18 and resnet50 layer sets, 1 and 2 threads
    python -m benchmarks.floor --thread-counts 1        # one thread count only
    python -m benchmarks.floor --model-thread-counts resnet50=1   # resnet50 at 1 thread only
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
    "AP / adversarial projection: 30×4608 by 4608×512 (P·Wᵀ), 3 sets": (3, 30, 4608, 512),
    "Gram tile, k = 40: 16 × (128×40 by 40×512)": (16, 128, 40, 512),
    "gradient tile: 16 × (128×512 by 512×40)": (16, 128, 512, 40),
}


def shape_rates(device: torch.device, quick: bool, thread_counts: Sequence[int]) -> dict[str, dict[str, float]]:
    """GFLOP/s (median) of the matmul shapes of :data:`SHAPES` per thread count (scaled down with ``quick``)."""
    fns, threads, flops = {}, {}, {}
    for name, (b, m, k, n) in SHAPES.items():
        if quick:
            b, m, k, n = b, max(8, m // 16), max(8, k // 16), max(8, n // 16)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(b, m, k, generator=g, device=device)
        y = torch.randn(b, k, n, generator=g, device=device)
        for t in thread_counts:
            key = common.thread_key(name, t)
            fns[key] = lambda x=x, y=y: torch.bmm(x, y)
            threads[key], flops[key] = t, 2 * b * m * k * n
    res = common.interleaved(fns, repeats=3 if quick else 7, warmup=2, device=device, threads=threads)
    return {
        str(t): {
            name: flops[common.thread_key(name, t)] / res[common.thread_key(name, t)]["median_s"] / 1e9
            for name in SHAPES
        }
        for t in thread_counts
    }


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--variants", nargs="+", default=list(common.VARIANTS))
    parser.add_argument("--no-profile", action="store_true", help="skip the profiles of variants above the target")
    common.add_thread_counts(parser, (1, 2))
    parser.add_argument(
        "--model-thread-counts",
        nargs="+",
        default=[],
        metavar="MODEL=T[,T...]",
        help="thread counts of one model instead of --thread-counts (e.g. resnet50=1)",
    )
    args = parser.parse_args(argv)
    device = common.setup(args)
    counts = list(dict.fromkeys(args.thread_counts))
    per_model = {}
    for item in args.model_thread_counts:
        model_name, _, values = item.partition("=")
        per_model[model_name] = [int(x) for x in values.split(",") if x]
    all_counts = list(dict.fromkeys(counts + [t for ts in per_model.values() for t in ts]))
    models = args.models or (["tiny"] if args.quick else ["resnet18", "resnet50"])
    repeats = args.repeats or (2 if args.quick else 5)
    n_mm = 256 if args.quick else 2048
    g = torch.Generator(device=device).manual_seed(0)
    mm_a = torch.randn(n_mm, n_mm, generator=g, device=device)
    mm_b = torch.randn(n_mm, n_mm, generator=g, device=device)
    mm_out = torch.empty(n_mm, n_mm, device=device)
    records, rows = [], []
    for name in models:
        torch.manual_seed(0)
        model = common.create_model(name).to(device)
        regs = {v: common.make_regularizer(model, v) for v in args.variants}
        steps = {v: common.penalty_step(r) for v, r in regs.items()}
        model_counts = per_model.get(name, counts)
        fns, threads = {}, {}
        for t in model_counts:
            for v, fn in steps.items():
                fns[common.thread_key(v, t)], threads[common.thread_key(v, t)] = fn, t
            # the floor's rate, timed in the same rounds at the same thread count
            fns[common.thread_key("matmul", t)] = lambda: torch.mm(mm_a, mm_b, out=mm_out)
            threads[common.thread_key("matmul", t)] = t
        common.log(f"[floor] {name}: {len(regs)} variants x threads {model_counts} x {repeats} repeats, interleaved")
        res = common.interleaved(fns, repeats=repeats, warmup=1, device=device, threads=threads)
        rates = {t: 2 * n_mm**3 / res[common.thread_key("matmul", t)]["median_s"] / 1e9 for t in model_counts}
        per_variant: dict[str, dict[int, dict[str, Any]]] = {}
        for variant, reg in regs.items():
            flops = common.floor_flops(reg)
            for t in model_counts:
                floor_s = flops["total"] / (rates[t] * 1e9)
                timing = res[common.thread_key(variant, t)]
                ratio = timing["median_s"] / floor_s
                record = {
                    "model": name,
                    "variant": variant,
                    "threads": t,
                    "time": timing,
                    "flops": flops,
                    "floor_s": floor_s,
                    "ratio": ratio,
                    "ratio_cpu_time": timing["cpu_median_s"] / floor_s,
                    "met": ratio <= TARGET,
                    "matmul_gflops": rates[t],
                }
                per_variant.setdefault(variant, {})[t] = record
                records.append(record)
                common.log(
                    f"[floor] {name} {variant} @{t}: {timing['median_s']:.3f}s vs floor {floor_s:.3f}s = {ratio:.2f}x"
                )
        for variant, by_t in per_variant.items():
            # one profile per variant: at the first thread count where it misses the target (the fewest threads:
            # where the time goes in the code, least disturbed by other tenants of the machine)
            unmet = next((r for r in by_t.values() if not r["met"]), None)
            if unmet is not None and not args.no_profile:
                common.set_threads(unmet["threads"])
                unmet["profile"] = common.profile_breakdown(steps[variant], runs=1)
                common.set_threads(args.threads)
            row = [common.MODEL_LABELS.get(name, name), common.VARIANT_LABELS.get(variant, variant)]
            row.append(f"{next(iter(by_t.values()))['flops']['total'] / 1e9:.1f}")
            for t in all_counts:
                r = by_t.get(t)
                if r is None:
                    row += ["–", "–", "not run"]
                    continue
                row += [common.fmt_s(r["floor_s"]), common.fmt_s(r["time"]["median_s"]), f"**{r['ratio']:.2f}×**"]
            row.append(" / ".join(("met" if by_t[t]["met"] else "NOT met") if t in by_t else "–" for t in all_counts))
            rows.append(row)
    counts = all_counts
    header = ["model", "variant", "floor GFLOP"]
    for t in counts:
        label = f"{t} thread" + ("s" if t > 1 else "")
        header += [f"floor time ({label})", f"penalty step ({label})", f"ratio ({label})"]
    header.append(f"≤ {TARGET}× ({' / '.join(str(t) for t in counts)} threads)")
    rates_by_shape = shape_rates(device, args.quick, counts)
    common.set_threads(args.threads)
    markdown = common.md_table(header, rows)
    markdown += "\n\nMatmul rates (GFLOP/s) of the shapes the penalties run (same run, interleaved):\n\n"
    markdown += common.md_table(
        ["shape", *[f"{t} thread" + ("s" if t > 1 else "") for t in counts]],
        [[k, *[f"{rates_by_shape[str(t)][k]:.1f}" for t in counts]] for k in SHAPES],
    )
    payload = common.payload(
        "floor",
        device,
        argv,
        repeats=repeats,
        target=TARGET,
        thread_counts=counts,
        records=records,
        shape_gflops=rates_by_shape,
    )
    common.save("floor", args.out, payload, markdown)
    plot(records, args.out, counts)
    return payload


def plot(records: list[dict[str, Any]], out, counts: Sequence[int]) -> None:
    first = [r for r in records if r["threads"] == counts[0]]
    fig, panels = common.model_panels(first, "penalty time / GEMM floor")
    width = 0.8 / len(counts)
    for ax, recs in panels:
        model = recs[0]["model"] if recs else None
        for i, t in enumerate(counts):
            rt = [r for r in records if r["model"] == model and r["threads"] == t]
            xs = [j - 0.4 + width * (i + 0.5) for j in range(len(rt))]
            label = f"{t} thread" + ("s" if t > 1 else "")
            if rt:
                ax.bar(xs, [r["ratio"] for r in rt], width=width, label=label)
        ax.axhline(TARGET, color="tab:red", linestyle="--", linewidth=1)
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.legend(fontsize=7)
    fig.suptitle("Closeness to the GEMM floor (red: 1.5× target)", fontsize=9)
    common.savefig(fig, "floor", out)


def main(argv: Sequence[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
