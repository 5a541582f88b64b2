"""Memory overhead of the regularizer during training: peak RSS on CPU, max allocated on CUDA.

Every configuration (a model, with or without a variant) runs in a fresh process: it builds the model, optimizer and
a fixed batch, runs a few plain-PyTorch training steps (with the regularizer when asked) and reports its peak
resident set size (``VmHWM``; on CUDA ``torch.cuda.max_memory_allocated``). The overhead of a variant is its peak
minus the plain run's. Target: the full ResNet-50 penalty at the official defaults (``random``) under 1 GiB above
the model's own training memory.

    python -m benchmarks.memory                    # resnet18 and resnet50, batch 64, 32×32
    python -m benchmarks.memory --quick
"""

import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import common

TARGET_BYTES = 2**30


def child(model_name: str, variant: str, batch: int, size: int, steps: int, threads: int, device: str) -> dict:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    model = common.create_model(model_name).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(dev)
    y = torch.randint(0, 100, (batch,), generator=g).to(dev)
    reg = None if variant == "plain" else common.make_regularizer(model, variant)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if reg is not None:
            reg.refresh(0.1)
            loss = loss + reg().penalty
        loss.backward()
        opt.step()
    common.sync(dev)
    out = {"model": model_name, "variant": variant, "peak_rss_bytes": common.peak_rss_bytes(), "steps": steps}
    if dev.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--variants", nargs="+", default=list(common.VARIANTS))
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--child", nargs=4, default=None, help=__import__("argparse").SUPPRESS)
    args = parser.parse_args(argv)
    models = args.models or (["tiny"] if args.quick else ["resnet18", "resnet50"])
    batch = args.batch_size or (4 if args.quick else 64)
    size = 8 if args.quick else 32
    steps = args.steps or (2 if args.quick else 3)
    if args.child:
        model_name, variant, threads, _ = args.child
        print(json.dumps(child(model_name, variant, batch, size, steps, int(threads), args.device)))
        return {}
    device = common.setup(args)
    key = "cuda_max_allocated_bytes" if device.type == "cuda" else "peak_rss_bytes"
    records = []
    for name in models:
        results: dict[str, dict] = {}
        for variant in ["plain", *args.variants]:
            cmd = [sys.executable, "-m", "benchmarks.memory", "--child", name, variant, str(args.threads), "-"]
            cmd += ["--device", args.device, "--batch-size", str(batch), "--steps", str(steps)]
            cmd += ["--quick"] if args.quick else []
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=common.REPO_ROOT, timeout=3600)
            if proc.returncode != 0:
                results[variant] = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
                common.log(f"[memory] {name} {variant}: FAILED {results[variant]['error']}")
                continue
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            common.log(f"[memory] {name} {variant}: {common.fmt_bytes(results[variant][key])}")
        base = results.get("plain", {}).get(key)
        for variant, r in results.items():
            if "error" in r or base is None:
                records.append({"model": name, "variant": variant, **r})
                continue
            over = r[key] - base
            rec = {**r, "overhead_bytes": over, "memory_kind": key}
            if name == "resnet50" and variant == "random":
                rec["target_met"] = over < TARGET_BYTES
            records.append(rec)
    rows = [
        [
            common.MODEL_LABELS.get(r["model"], r["model"]),
            r["variant"],
            common.fmt_bytes(r[key]) if key in r else "failed",
            common.fmt_bytes(r["overhead_bytes"]) if "overhead_bytes" in r else "",
            {True: "met", False: "NOT met"}.get(r.get("target_met"), ""),
        ]
        for r in records
    ]
    header = ["model", "variant", "peak RSS" if key == "peak_rss_bytes" else "max allocated", "overhead", "< 1 GiB"]
    payload = common.payload("memory", device, argv, batch_size=batch, image_size=size, steps=steps, records=records)
    common.save("memory", args.out, payload, common.md_table(header, rows))
    plot(records, args.out)
    return payload


def plot(records, out) -> None:
    def keep(r: dict) -> bool:
        return "overhead_bytes" in r and r["variant"] != "plain"

    fig, panels = common.model_panels(records, "peak memory overhead (MiB)", keep)
    for ax, recs in panels:
        ax.bar(range(len(recs)), [r["overhead_bytes"] / 2**20 for r in recs])
        ax.axhline(1024, color="tab:red", linestyle="--", linewidth=1)
    fig.suptitle("Memory overhead of the regularizer during training (red: 1 GiB)", fontsize=9)
    common.savefig(fig, "memory", out)


def main(argv: Sequence[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
