"""The penalty split across ranks: measured per-rank shares, and a cost model for 8, 64 and 512 ranks.

1. **Measured** (ResNet-18 layer sets): the time of one rank's share of the penalty (refresh + forward + backward
   of :meth:`CoMHERegularizer.compute` with that rank's share of :meth:`shard_plan`), for every rank of
   ``W = 2, 4, 8``, next to the whole penalty, all interleaved in one run. The work of a share is local (DDP only
   adds its all-reduce, which the gradient needs anyway), so this is the per-rank penalty time of a DDP step.
2. **Cost model** (ResNet-50 and ViT-B/16): the time of each group's penalty is measured here, a per-variant rate
   (seconds per modelled multiply-add, :func:`lightning_comhe.sharding.unit_cost`) is fitted through the origin,
   and the plan of ``W = 8, 64, 512`` gives the predicted per-rank time (the slowest rank) and the imbalance
   ``max / mean``.

    python -m benchmarks.shard
    python -m benchmarks.shard --quick
"""

from collections.abc import Sequence
from typing import Any

import torch

from benchmarks import common
from lightning_comhe.sharding import imbalance, rank_costs

VARIANTS = {"random": {}, "half_mhe": {}, "angle": {}}
LABELS = {"random": "RP-CoMHE (official k = 40, C = 20)", "half_mhe": "half-space MHE", "angle": "AP-CoMHE"}


def _step(reg: Any, share: Any) -> Any:
    def fn() -> None:
        reg.refresh(0.1, share)
        out = reg.compute(share)
        if out.penalty.requires_grad:
            out.penalty.backward()

    return fn


def measured(model_name: str, worlds: Sequence[int], quick: bool, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for variant in VARIANTS:
        model = common.create_model(model_name).to(device)
        reg = common.make_regularizer(model, variant)
        fns = {"whole": _step(reg, None)}
        for w in worlds:
            for r, share in enumerate(reg.shard_plan(w)):
                fns[f"W={w} rank {r}"] = _step(reg, share)
        res = common.interleaved(fns, repeats=2 if quick else 5, warmup=1, device=device)
        whole = res["whole"]["median_s"]
        for w in worlds:
            times = [res[f"W={w} rank {r}"]["median_s"] for r in range(w)]
            rows.append(
                {
                    "variant": variant,
                    "world": w,
                    "whole_s": whole,
                    "rank_s": times,
                    "slowest_fraction": max(times) / whole,
                    "ideal_fraction": 1 / w,
                }
            )
    return rows


def _group_times(reg: Any, device: torch.device, quick: bool) -> list[float]:
    fns = {}
    for g in reg.groups:
        share = {g.key: _whole_group_parts(reg, g)}
        fns[g.key] = _step(reg, share)
    res = common.interleaved(fns, repeats=1 if quick else 3, warmup=1, device=device)
    return [res[g.key]["median_s"] for g in reg.groups]


def _whole_group_parts(reg: Any, group: Any) -> list[tuple[int, int, int]]:
    unit = reg.family.shard_unit(group)
    if unit == "group":
        return [(-1, 0, 1)]
    num = {"projection": int(reg.config.num or 1), "rows": group.num_neurons}.get(unit, 1)
    return [(s, 0, num) for s in range(group.num_sets)]


def _group_model_cost(reg: Any, group: Any) -> float:
    """Modelled cost of a whole group (sum of its units), from the same rule the plan uses."""
    return rank_costs(reg.groups, reg.family, [{group.key: _whole_group_parts(reg, group)}])[0]


def cost_model(model_name: str, worlds: Sequence[int], quick: bool, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for variant in VARIANTS:
        model = common.create_model(model_name)
        reg = common.make_regularizer(model, variant)
        times = _group_times(reg, device, quick)
        costs = [_group_model_cost(reg, g) for g in reg.groups]
        rate = sum(t * c for t, c in zip(times, costs, strict=True)) / sum(c * c for c in costs)
        errors = [abs(rate * c - t) / t for t, c in zip(times, costs, strict=True) if t > 0]
        total = sum(times)
        for w in worlds:
            plan = reg.shard_plan(w)
            per_rank = [rate * c for c in rank_costs(reg.groups, reg.family, plan)]
            rows.append(
                {
                    "model": model_name,
                    "variant": variant,
                    "world": w,
                    "groups": len(reg.groups),
                    "units": sum(unit_count(reg, g) for g in reg.groups),
                    "whole_s": total,
                    "slowest_rank_s": max(per_rank),
                    "ideal_s": total / w,
                    "imbalance": imbalance(per_rank),
                    "idle_ranks": sum(1 for c in per_rank if c == 0),
                    "fit_median_rel_error": sorted(errors)[len(errors) // 2] if errors else 0.0,
                }
            )
    return rows


def unit_count(reg: Any, group: Any) -> int:
    unit = reg.family.shard_unit(group)
    if unit == "group":
        return 1
    return group.num_sets * (int(reg.config.num or 1) if unit == "projection" else 1)


def render(small: str, meas: list[dict[str, Any]], model_rows: list[dict[str, Any]]) -> str:
    """The Markdown tables of one run (also rebuilt from a saved ``shard.json``)."""
    md = ["Measured, one rank's share of the penalty (refresh + forward + backward), " + small + ":\n"]
    md.append(
        common.md_table(
            ["variant", "W", "whole penalty", "slowest rank", "fraction of the whole", "ideal 1/W"],
            [
                [LABELS[r["variant"]], r["world"], common.fmt_s(r["whole_s"]), common.fmt_s(max(r["rank_s"]))]
                + [f"{r['slowest_fraction']:.2f}", f"{r['ideal_fraction']:.2f}"]
                for r in meas
            ],
        )
    )
    md.append(
        "\nCost model (per-group times measured here, a fitted rate per variant, the plan of W ranks; imbalance is "
        "max / mean over the ranks, slowest / ideal also counts the extra work of row blocks):\n"
    )
    md.append(
        common.md_table(
            ["model", "variant", "W", "whole (1 rank)", "slowest rank", "ideal", "slowest / ideal", "imbalance"]
            + ["idle ranks"],
            [
                [common.MODEL_LABELS.get(r["model"], r["model"]), LABELS[r["variant"]], r["world"]]
                + [common.fmt_s(r["whole_s"]), common.fmt_s(r["slowest_rank_s"]), common.fmt_s(r["ideal_s"])]
                + [f"{r['slowest_rank_s'] / r['ideal_s']:.2f}", f"{r['imbalance']:.2f}"]
                + [f"{r['idle_ranks']} / {r['world']}"]
                for r in model_rows
            ],
        )
    )
    fit = {(r["model"], r["variant"]): r["fit_median_rel_error"] for r in model_rows}
    md.append(
        "\nMedian relative error of the per-group time predicted by the fitted rate: "
        + ", ".join(f"{m} {v}: {e:.0%}" for (m, v), e in fit.items())
        + "."
    )
    return "\n".join(md) + "\n"


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    device = common.setup(args)
    worlds = (2, 4) if args.quick else (2, 4, 8)
    big_worlds = (8, 64) if args.quick else (8, 64, 512)
    small, big = ("tiny", ["tiny"]) if args.quick else ("resnet18", ["resnet50", "vit_base"])
    meas = measured(small, worlds, args.quick, device)
    model_rows = [r for name in big for r in cost_model(name, big_worlds, args.quick, device)]
    markdown = render(small, meas, model_rows)
    data = common.payload("shard", device, argv, measured=meas, cost_model=model_rows)
    common.save("shard", args.out, data, markdown)
    print(markdown)
    return data


if __name__ == "__main__":
    run()
