"""Training overhead: the step time of a model with each variant vs without the regularizer.

A plain PyTorch training step (SGD with momentum, cross-entropy on a fixed random batch of 32×32 images) is timed
without a regularizer and with :class:`~lightning_comhe.regularizer.CoMHERegularizer` of each variant (refresh,
penalty, one backward of task + penalty), round-robin in one run. Each ratio is reported next to the ratio its GEMM
floor allows, ``(plain step + floor) / plain step``; the time the regularizer adds must stay within 1.5× of the floor.
With ``--lightning`` (default when :class:`lightning_comhe.CoMHE` imports) the same is measured through a Lightning
``Trainer`` with the callback.

    python -m benchmarks.overhead                   # resnet18 and resnet50, batch 64, CPU
    python -m benchmarks.overhead --device cuda --batch-size 256 --amp bf16
    python -m benchmarks.overhead --quick
"""

import contextlib
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import common

TARGET_ADDED_VS_FLOOR = 1.5
TARGET_STRUCTURED_RATIO = 1.5  # random CoMHE with a structured projection vs the plain resnet18 step
TARGET_GPU_RANDOM = 1.10  # resnet50, GPU, official random defaults


def autocast_ctx(device: torch.device, amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def make_step(model, opt, x, y, reg, device, amp):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast_ctx(device, amp):
            loss = F.cross_entropy(model(x), y)
        if reg is not None:
            reg.refresh(opt.param_groups[0]["lr"])
            loss = loss + reg().penalty
        loss.backward()
        opt.step()

    return step


def lightning_steps(model_name, variants, batch, size, steps, rounds, device, amp) -> dict[str, Any] | None:
    """Median step time through ``Trainer.fit`` with the :class:`CoMHE` callback (``None`` without Lightning)."""
    try:
        import logging

        import lightning.pytorch as pl

        from lightning_comhe.callback import CoMHE

        for logger in ("lightning.pytorch", "lightning.fabric", "lightning_comhe"):
            logging.getLogger(logger).setLevel(logging.ERROR)
    except Exception as err:  # noqa: BLE001 - any import problem: the Lightning measurement is skipped
        common.log(f"[overhead] Lightning path skipped: {err}")
        return None
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.lightning_parts import Classifier, quiet_trainer

    class Clock(pl.Callback):
        def __init__(self):
            self.times: list[float] = []
            self._t = 0.0

        def on_train_batch_start(self, *args):
            common.sync(device)
            self._t = time.perf_counter()

        def on_train_batch_end(self, *args):
            common.sync(device)
            self.times.append(time.perf_counter() - self._t)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(batch * steps, 3, size, size, generator=g), torch.randint(0, 100, (batch * steps,))
    )
    precision = {"bf16": "bf16-mixed", "fp16": "16-mixed", None: "32-true"}[amp]
    times: dict[str, list[float]] = {v: [] for v in ["plain", *variants]}
    torch.manual_seed(0)
    net = common.create_model(model_name)
    for _ in range(rounds):
        for v in times:
            clock = Clock()
            callbacks = [clock] + ([] if v == "plain" else [CoMHE(v, log_every=10**9)])
            trainer = quiet_trainer(device, steps, callbacks, precision=precision)
            trainer.fit(Classifier(net), DataLoader(data, batch_size=batch))
            times[v] += clock.times[1:]  # the first step of a fit builds the regularizer and warms up
    med = {v: statistics.median(t) for v, t in times.items()}
    return {"step_s": med, "ratio": {v: med[v] / med["plain"] for v in med}, "steps_per_fit": steps, "rounds": rounds}


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--variants", nargs="+", default=list(common.VARIANTS))
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast the model's forward")
    parser.add_argument("--lightning", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args(argv)
    device = common.setup(args)
    models = args.models or (["tiny"] if args.quick else ["resnet18", "resnet50"])
    batch = args.batch_size or (4 if args.quick else 64)
    size = 8 if args.quick else args.image_size
    mm_rate = common.matmul_rate(device, n=256 if args.quick else 2048, repeats=3 if args.quick else 7)
    records, rows = [], []
    lightning_results: dict[str, Any] = {}
    for name in models:
        repeats = args.repeats or (2 if args.quick else (3 if name == "resnet50" else 5))
        torch.manual_seed(0)
        model = common.create_model(name).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 3, size, size, generator=g).to(device)
        y = torch.randint(0, 100, (batch,), generator=g).to(device)
        regs = {v: common.make_regularizer(model, v) for v in args.variants}
        fns = {"plain": make_step(model, opt, x, y, None, device, args.amp)}
        fns.update({v: make_step(model, opt, x, y, r, device, args.amp) for v, r in regs.items()})
        common.log(f"[overhead] {name}: batch {batch}, {len(fns)} configurations x {repeats} repeats")
        res = common.interleaved(fns, repeats=repeats, warmup=1, device=device)
        plain = res["plain"]["median_s"]
        for v, reg in regs.items():
            flops = common.floor_flops(reg)
            floor_s = flops["total"] / (mm_rate * 1e9)
            t = res[v]["median_s"]
            added = t - plain
            rec = {
                "model": name,
                "variant": v,
                "plain_step": res["plain"],
                "step": res[v],
                "ratio": t / plain,
                "floor_s": floor_s,
                "floor_ratio": (plain + floor_s) / plain,
                "added_s": added,
                "added_vs_floor": added / floor_s,
                "met": added / floor_s <= TARGET_ADDED_VS_FLOOR,
                "ratio_cpu_time": res[v]["cpu_median_s"] / res["plain"]["cpu_median_s"],
            }
            if name == "resnet18" and v.startswith("random_"):
                rec["structured_target_met"] = rec["ratio"] <= TARGET_STRUCTURED_RATIO
            if device.type == "cuda" and name == "resnet50" and v == "random":
                rec["gpu_target_met"] = rec["ratio"] <= TARGET_GPU_RANDOM
            if not rec["met"] and not args.no_profile:
                rec["profile"] = common.profile_breakdown(common.penalty_step(reg), runs=1)
            records.append(rec)
            rows.append(
                [
                    common.MODEL_LABELS.get(name, name),
                    common.VARIANT_LABELS.get(v, v),
                    common.fmt_s(plain),
                    common.fmt_s(t),
                    f"**{rec['ratio']:.2f}×**",
                    f"{rec['floor_ratio']:.2f}×",
                    f"{rec['added_vs_floor']:.2f}×",
                    "met" if rec["met"] else "NOT met",
                ]
            )
            common.log(
                f"[overhead] {name} {v}: {t:.3f}s vs plain {plain:.3f}s "
                f"({rec['ratio']:.2f}x, floor {rec['floor_ratio']:.2f}x)"
            )
        use_lightning = args.lightning == "yes" or (args.lightning == "auto" and name in ("tiny", "resnet18"))
        if use_lightning:
            gauss = [v for v in args.variants if not v.startswith("random_")]
            lt = lightning_steps(
                name,
                gauss,
                batch,
                size,
                steps=3 if args.quick else 6,
                rounds=1 if args.quick else 2,
                device=device,
                amp=args.amp,
            )
            if lt is not None:
                lightning_results[name] = lt
    header = ["model", "variant", "plain step", "step", "ratio", "floor allows", "added / floor", "≤ 1.5× floor"]
    md = common.md_table(header, rows)
    if lightning_results:
        lrows = [
            [common.MODEL_LABELS.get(m, m), v, common.fmt_s(t), f"{r['ratio'][v]:.2f}×"]
            for m, r in lightning_results.items()
            for v, t in r["step_s"].items()
        ]
        md += "\n\nThrough a Lightning `Trainer` with the `CoMHE` callback:\n\n"
        md += common.md_table(["model", "variant", "step", "ratio"], lrows)
    payload = common.payload(
        "overhead",
        device,
        argv,
        batch_size=batch,
        image_size=size,
        amp=args.amp,
        matmul_gflops=mm_rate,
        records=records,
        lightning=lightning_results,
    )
    common.save("overhead", args.out, payload, md)
    plot(records, args.out)
    return payload


def plot(records: list[dict[str, Any]], out) -> None:
    fig, panels = common.model_panels(records, "step time / plain step")
    for ax, recs in panels:
        xs = range(len(recs))
        ax.bar([i - 0.2 for i in xs], [r["ratio"] for r in recs], width=0.4, label="measured")
        ax.bar([i + 0.2 for i in xs], [r["floor_ratio"] for r in recs], width=0.4, label="GEMM floor allows")
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.legend(fontsize=7)
    fig.suptitle("Training-step overhead of each variant", fontsize=9)
    common.savefig(fig, "overhead", out)


def main(argv: Sequence[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
