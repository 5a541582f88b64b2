"""Does the ``torch.compile`` kernel pay off? The eager fused kernel vs ``backend="compiled"``, same run.

Times one energy forward + backward of a few batches of projected sets (the RP-CoMHE shapes: k = 40) and the
ResNet-18 RP-CoMHE / half-space penalties with ``LIGHTNING_COMHE_COMPILE`` off and on. Compilation happens in the
warm-up (its one-off cost is reported separately). Values are asserted equal.

    python -m benchmarks.compiled
    python -m benchmarks.compiled --quick
"""

import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks import common


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    device = common.setup(args)
    from lightning_comhe.functional import _compiled, hyperspherical_energy

    shapes = [(4, 64, 8), (3, 40, 8)] if args.quick else [(60, 512, 40), (80, 64, 40), (1, 8192, 40)]
    records, rows = [], []
    for b, n, k in shapes:
        x = torch.randn(b, n, k, device=device, generator=torch.Generator(device=device).manual_seed(0))
        fns, values = {}, {}
        for backend in ("fused", "compiled"):

            def step(backend=backend, x=x, values=values):
                xi = x.clone().requires_grad_(True)
                e = hyperspherical_energy(xi, 2, half_space=True, backend=backend, check_finite=False)
                e.sum().backward()
                values[backend] = e.detach()

            fns[backend] = step
        t0 = time.perf_counter()
        fns["compiled"]()
        compile_s = time.perf_counter() - t0
        res = common.interleaved(fns, repeats=3 if args.quick else 7, warmup=1, device=device)
        torch.testing.assert_close(values["compiled"], values["fused"], rtol=1e-4, atol=0)
        rec = {
            "case": f"energy fwd+bwd, B={b} N={n} k={k}",
            "eager": res["fused"],
            "compiled": res["compiled"],
            "speedup": res["fused"]["median_s"] / res["compiled"]["median_s"],
            "first_call_s": compile_s,
        }
        records.append(rec)
    model_name = "tiny" if args.quick else "resnet18"
    model = common.create_model(model_name).to(device)
    for variant in ("half_mhe", "random"):
        reg = common.make_regularizer(model, variant)
        reg.refresh(0.1)

        def pen(reg=reg):
            model.zero_grad(set_to_none=True)
            reg().penalty.backward()

        def with_env(value, fn=pen):
            def inner():
                old = os.environ.get("LIGHTNING_COMHE_COMPILE")
                os.environ["LIGHTNING_COMHE_COMPILE"] = value
                try:
                    fn()
                finally:
                    if old is None:
                        del os.environ["LIGHTNING_COMHE_COMPILE"]
                    else:
                        os.environ["LIGHTNING_COMHE_COMPILE"] = old

            return inner

        t0 = time.perf_counter()
        with_env("1")()
        compile_s = time.perf_counter() - t0
        res = common.interleaved(
            {"fused": with_env("0"), "compiled": with_env("1")}, repeats=3 if args.quick else 5, warmup=1, device=device
        )
        records.append(
            {
                "case": f"{common.MODEL_LABELS.get(model_name, model_name)} {variant} penalty fwd+bwd",
                "eager": res["fused"],
                "compiled": res["compiled"],
                "speedup": res["fused"]["median_s"] / res["compiled"]["median_s"],
                "first_call_s": compile_s,
            }
        )
    failed = _compiled.compile_failed()
    if failed:  # the compiled path fell back to eager somewhere: the comparison is not valid
        common.log(f"[compiled] WARNING: compilation failed, the compiled numbers are eager ones: {failed}")
    for r in records:
        rows.append(
            [
                r["case"],
                common.fmt_s(r["eager"]["median_s"]),
                common.fmt_s(r["compiled"]["median_s"]),
                f"{r['speedup']:.2f}×",
                common.fmt_s(r["first_call_s"]),
            ]
        )
    header = ["case", "eager fused", "compiled", "speed-up", "first compiled call"]
    payload = common.payload("compiled", device, argv, compile_failed=_compiled.compile_failed(), records=records)
    common.save("compiled", args.out, payload, common.md_table(header, rows))
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 2.6))
    ax.barh(range(len(records)), [r["speedup"] for r in records])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(records)), [r["case"] for r in records], fontsize=7)
    ax.set_xlabel("eager time / compiled time")
    ax.set_title("torch.compile of the per-tile work (CPU)", fontsize=9)
    common.savefig(fig, "compiled", args.out)
    return payload


def main(argv: Sequence[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
