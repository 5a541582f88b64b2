"""Scale: time and peak memory of one set of N neurons (d = 4,096, k = 40), N = 256 … 65,536.

Each size runs in a fresh process, so the peak resident set size (``VmHWM``, reset just before the run; on CUDA the
peak allocated memory) can be attributed: the child allocates the weights ``W`` (N × d) and the projections, warms up
on a small set, then records the RSS before and the peak during one forward + backward of
:func:`~lightning_comhe.functional.projected_energy` (half-space, C projections). "Extra" memory is that difference;
the weight gradient (N·d·4 bytes, which any training step holds) is reported separately. The plain-autograd backend
(N×N intermediates) is run up to ``--autograd-max`` for comparison. Target: N = 65,536 in under 1 GiB of extra memory.

    python -m benchmarks.scale                           # C = 1
    python -m benchmarks.scale --num-projections 20 --sizes 65536
    python -m benchmarks.scale --quick
"""

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks import common

TARGET_BYTES = 2**30


def child(n: int, d: int, k: int, c: int, backend: str, threads: int, device: str) -> dict[str, Any]:
    from lightning_comhe.functional import projected_energy

    torch.set_num_threads(threads)
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(n, d, generator=g, device=dev).requires_grad_(True)
    p = torch.randn(c, k, d, generator=g, device=dev)
    small = torch.randn(64, d, device=dev, requires_grad=True)  # warm up the kernels (and their libraries)
    projected_energy(small, p, check_finite=False, backend=backend).backward()
    common.sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    if common.reset_peak_rss():  # the peak from now on, relative to the current RSS
        base_rss = common.current_rss_bytes()
    else:  # pragma: no cover - no /proc/self/clear_refs: the peak so far
        base_rss = common.peak_rss_bytes()
    t0 = time.perf_counter()
    e = projected_energy(w, p, check_finite=False, backend=backend)
    e.backward()
    common.sync(dev)
    first = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(dev) - base) if dev.type == "cuda" else common.peak_rss_bytes() - base_rss
    grad_bytes = w.grad.numel() * w.grad.element_size()
    energy = e.item()
    w.grad = None
    t0 = time.perf_counter()
    projected_energy(w, p, check_finite=False, backend=backend).backward()
    common.sync(dev)
    second = time.perf_counter() - t0
    return {
        "n": n,
        "d": d,
        "k": k,
        "num_projections": c,
        "backend": backend,
        "time_s": min(first, second),
        "times_s": [first, second],
        "extra_bytes": peak,
        "weight_grad_bytes": grad_bytes,
        "extra_beyond_grad_bytes": peak - grad_bytes,
        "weights_bytes": w.numel() * w.element_size(),
        "energy": energy,
        "memory_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "peak RSS (VmHWM)",
    }


def spawn(n, d, k, c, backend, threads, device, timeout) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.scale", "--child", str(n), str(d), str(k), str(c), backend, str(threads)]
    cmd += ["--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=common.REPO_ROOT)
    if proc.returncode != 0:
        return {"n": n, "backend": backend, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None, help="d (default 4096)")
    parser.add_argument("--proj-dim", type=int, default=None, help="k (default 40)")
    parser.add_argument("--num-projections", type=int, default=1, help="C (default 1: one projected set)")
    parser.add_argument("--autograd-max", type=int, default=None, help="largest N for the autograd backend")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--child", nargs=6, default=None, help=argparse_hidden())
    parser.add_argument("--name", default="scale", help="result file name")
    args = parser.parse_args(argv)
    if args.child:
        n, d, k, c, backend, threads = args.child
        print(json.dumps(child(int(n), int(d), int(k), int(c), backend, int(threads), args.device)))
        return {}
    device = common.setup(args)
    d = args.dim or (256 if args.quick else 4096)
    k = args.proj_dim or (8 if args.quick else 40)
    sizes = args.sizes or ([64, 128, 256] if args.quick else [256 * 2**i for i in range(9)])
    autograd_max = args.autograd_max if args.autograd_max is not None else (128 if args.quick else 8192)
    records = []
    for backend in ("fused", "autograd"):
        for n in sizes:
            if backend == "autograd" and n > autograd_max:
                continue
            common.log(f"[scale] {backend} N={n} d={d} k={k} C={args.num_projections}")
            rec = spawn(n, d, k, args.num_projections, backend, args.threads, args.device, args.timeout)
            records.append(rec)
            if "error" not in rec:
                common.log(
                    f"[scale]   {rec['time_s']:.3f}s extra {common.fmt_bytes(rec['extra_bytes'])} "
                    f"(beyond the weight gradient {common.fmt_bytes(rec['extra_beyond_grad_bytes'])})"
                )
    fused = [r for r in records if r.get("backend") == "fused" and "error" not in r]
    largest = max(fused, key=lambda r: r["n"]) if fused else None
    target = None
    if largest is not None and largest["n"] >= 65536:
        target = {
            "n": largest["n"],
            "extra_bytes": largest["extra_bytes"],
            "met": largest["extra_bytes"] < TARGET_BYTES,
        }
    rows = [
        [
            r["backend"],
            r["n"],
            common.fmt_s(r["time_s"]),
            common.fmt_bytes(r["extra_bytes"]),
            common.fmt_bytes(r["weight_grad_bytes"]),
            common.fmt_bytes(r["extra_beyond_grad_bytes"]),
            f"{r['energy']:.6g}",
        ]
        if "error" not in r
        else [r["backend"], r["n"], "failed: " + " ".join(r["error"]), "", "", "", ""]
        for r in records
    ]
    header = ["backend", "N", "fwd+bwd", "extra peak memory", "of which weight grad", "beyond the grad", "energy"]
    payload = common.payload(
        "scale", device, argv, d=d, k=k, num_projections=args.num_projections, records=records, target=target
    )
    common.save(args.name, args.out, payload, common.md_table(header, rows))
    plot(records, args.out, args.name, d, k, args.num_projections)
    return payload


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def plot(records, out, name, d, k, c) -> None:
    plt = common.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(7.2, 3.0))
    for backend, style in (("fused", "o-"), ("autograd", "s--")):
        recs = sorted((r for r in records if r.get("backend") == backend and "error" not in r), key=lambda r: r["n"])
        if not recs:
            continue
        ns = [r["n"] for r in recs]
        a1.loglog(ns, [r["time_s"] for r in recs], style, label=backend)
        a2.loglog(ns, [max(r["extra_bytes"], 1) / 2**20 for r in recs], style, label=backend)
    a2.axhline(1024, color="tab:red", linestyle="--", linewidth=1, label="1 GiB")
    a1.set_xlabel("N (neurons)")
    a2.set_xlabel("N (neurons)")
    a1.set_ylabel("forward+backward (s)")
    a2.set_ylabel("extra peak memory (MiB)")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    fig.suptitle(f"One set of N neurons, d = {d}, k = {k}, C = {c}", fontsize=9)
    common.savefig(fig, name, out)


def main(argv: Sequence[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
