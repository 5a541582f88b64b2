"""The prepared GPU check: CUDA correctness against CPU, then the benchmarks on the device (bf16, batch 256).

One command for a session that has a GPU (written for one NVIDIA H200; it has not been run yet, see
``docs/benchmarks.md``)::

    bash benchmarks/gpu_check.sh            # = python -m benchmarks.gpu --device cuda, log in results/gpu/

It checks, in order (each step prints PASS/FAIL and never stops the rest):

1. every energy variant on CUDA against float64 CPU (values, gradients), degenerate sets included;
2. the ``torch.compile`` (Triton) kernel against the eager CUDA kernel, and its speed;
3. the structured projections (``sparse`` through cuSPARSE, ``srht``) against their dense matrices on CUDA;
4. the regularizer on ResNet-18 on CUDA against CPU (the deterministic variants: MHE, half-space MHE, the expected
   kind of RP-CoMHE), and every variant finite;
5. a bf16-autocast training step with the regularizer, and fp16 with a ``GradScaler`` through the Lightning
   ``CoMHE`` callback;
6. the cheap settings through the Lightning callback on the device: ``projection_kind="expected"`` with
   ``every_n_steps`` = 1 and 4 (the penalty is evaluated on exactly the steps ``global_step % m == 0``, the weights
   stay finite, and the expected kind's penalty on the device equals CPU's);
7. weights split between CPU and the GPU (model parallelism) against the all-CPU run;
8. Lightning's own ``FSDPStrategy`` on the device: 32-true against the single-device run, and ``16-mixed``;

then runs ``floor``, ``overhead`` (batch 256, bf16 autocast of the model), the cost ``ladder`` (32×32 and 224×224,
including the expected kind and ``every_n_steps`` rungs), ``scale`` (C = 1 and C = 20 at N = 65,536) and ``memory``
with ``--device cuda``, writing to ``benchmarks/results/gpu/``. Target: RP-CoMHE at the official defaults ≤ 10% step
overhead on ResNet-50. ``--device cpu --quick`` exercises the same code on a CPU.
"""

import json
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import common

F64 = torch.float64


def _check(name: str, fn: Callable[[], Any], report: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    try:
        detail = fn()
        report[name] = {"ok": True, "detail": detail, "s": round(time.perf_counter() - t0, 2)}
        common.log(f"[gpu] PASS {name} {detail if detail is not None else ''}")
    except Exception as err:  # noqa: BLE001 - report and continue
        report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        common.log(f"[gpu] FAIL {name}: {type(err).__name__}: {err}")


def check_energies(device: torch.device, quick: bool) -> dict[str, float]:
    from lightning_comhe.functional import hyperspherical_energy, projected_energy

    g = torch.Generator().manual_seed(0)
    n = 50 if quick else 700
    w = torch.randn(3, n, 40, generator=g, dtype=F64)
    w[1, 7] = w[1, 3]  # duplicate
    w[2, 0] = 0.0  # zero neuron
    p = torch.randn(4, 16, 40, generator=g, dtype=F64)
    worst = {}
    for power in (0, 1, 2, 3.7, "a0", "a1", "a2"):
        for half in (False, True):
            for dtype, rtol in ((F64, 1e-10), (torch.float32, 2e-4)):
                for fn in (
                    lambda x, power=power, half=half: hyperspherical_energy(x, power, half_space=half),
                    lambda x, power=power, half=half: projected_energy(x, p.to(x), power, half_space=half),
                ):
                    ref_x = w.clone().requires_grad_(True)
                    ref = fn(ref_x)
                    (ref_g,) = torch.autograd.grad(ref.sum(), ref_x)
                    x = w.to(device, dtype).requires_grad_(True)
                    out = fn(x)
                    (gx,) = torch.autograd.grad(out.sum(), x)
                    assert torch.isfinite(out).all() and torch.isfinite(gx).all()
                    # float32: a duplicate pair's term is cancellation noise (tests/test_energy.py), so compare
                    # the set without degenerate neurons there; float64: every set
                    sets = [0] if dtype == torch.float32 else [0, 1, 2]
                    val_err = ((out.double().cpu() - ref).abs() / ref.abs())[sets].max().item()
                    g_err = ((gx.double().cpu() - ref_g)[sets].abs().max() / ref_g[sets].abs().max()).item()
                    assert val_err < rtol * 10 and g_err < (1e-3 if dtype == torch.float32 else 1e-8), (
                        power,
                        half,
                        val_err,
                        g_err,
                    )
                    key = f"{dtype}".replace("torch.", "")
                    worst[key] = max(worst.get(key, 0.0), val_err)
    return worst


def check_compiled(device: torch.device, quick: bool) -> dict[str, float]:
    from lightning_comhe.functional import _compiled, hyperspherical_energy

    n = 64 if quick else 4096
    x = torch.randn(8, n, 40, device=device)
    out = {}
    for power, half in ((2, True), ("a0", False)):
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        vals = []
        for backend, xi in zip(("fused", "compiled"), xs, strict=True):
            e = hyperspherical_energy(xi, power, half_space=half, backend=backend, check_finite=False)
            e.sum().backward()
            vals.append(e.detach())
        assert _compiled.compile_failed() is None, _compiled.compile_failed()
        torch.testing.assert_close(vals[1], vals[0], rtol=1e-4, atol=0)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-3, atol=1e-3 * xs[0].grad.abs().max().item())

    def step(backend):
        xi = x.clone().requires_grad_(True)
        hyperspherical_energy(xi, 2, half_space=True, backend=backend, check_finite=False).sum().backward()

    res = common.interleaved({"fused": lambda: step("fused"), "compiled": lambda: step("compiled")}, 5, 1, device)
    out["eager_s"] = res["fused"]["median_s"]
    out["compiled_s"] = res["compiled"]["median_s"]
    return out


def check_structured(device: torch.device, quick: bool) -> None:
    from lightning_comhe.projections import RandomProjection

    for kind in ("sparse", "srht"):
        rp = RandomProjection(dim=40, num=20 if not quick else 2, kind=kind, seed=0)
        rp.step()
        w = torch.randn(3, 64, 300, device=device, dtype=F64, requires_grad=True)
        v = rp.project("k", w)
        p = rp.projections("k", 3, 300, device, F64)
        assert p.device.type == device.type
        torch.testing.assert_close(v, torch.einsum("gnd,gckd->gcnk", w, p), rtol=1e-10, atol=1e-10)
        (gw,) = torch.autograd.grad(v.pow(2).sum(), w)
        assert torch.isfinite(gw).all()


def _twin_models(name: str, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The benchmark model ``name`` twice with equal weights: on the CPU and on ``device``."""
    torch.manual_seed(0)
    cpu_model = common.create_model(name)
    dev_model = common.create_model(name)
    dev_model.load_state_dict(cpu_model.state_dict())
    return cpu_model, dev_model.to(device)


def check_regularizer(device: torch.device, quick: bool) -> dict[str, float]:
    name = "tiny" if quick else "resnet18"
    cpu_model, dev_model = _twin_models(name, device)
    errs = {}
    for variant in common.VARIANTS:
        reg_d = common.make_regularizer(dev_model, variant)
        reg_d.refresh(0.1)
        out = reg_d()
        out.penalty.backward()
        assert torch.isfinite(out.penalty), variant
        if variant in ("mhe", "half_mhe", "random_expected"):  # the deterministic variants
            reg_c = common.make_regularizer(cpu_model, variant)
            reg_c.refresh(0.1)
            ref = reg_c().penalty
            errs[variant] = abs(out.penalty.item() - ref.item()) / abs(ref.item())
            assert errs[variant] < 1e-4, (variant, errs[variant])
    return errs


def check_mixed_precision(device: torch.device, quick: bool) -> dict[str, Any]:
    import torch.nn.functional as F

    name = "tiny" if quick else "resnet18"
    torch.manual_seed(0)
    model = common.create_model(name).to(device)
    reg = common.make_regularizer(model, "random")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (16,), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    reg.refresh(0.1)
    total = loss + reg().penalty
    total.backward()
    opt.step()
    assert torch.isfinite(total)
    result: dict[str, Any] = {"bf16_loss": total.item()}
    if device.type != "cuda":
        return result
    try:
        from lightning_comhe.callback import CoMHE
    except Exception as err:  # noqa: BLE001
        result["lightning"] = f"skipped: {err}"
        return result
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.lightning_parts import Classifier, quiet_trainer

    data = TensorDataset(torch.randn(64, 3, 32, 32), torch.randint(0, 100, (64,)))
    module = Classifier(common.create_model(name), momentum=0.0, weight_decay=0.0)
    quiet_trainer(device, 4, [CoMHE("random")], precision="16-mixed").fit(module, DataLoader(data, batch_size=16))
    assert all(torch.isfinite(p).all() for p in module.parameters())
    result["fp16_gradscaler_lightning"] = "ok"
    return result


def check_cheap_settings(device: torch.device, quick: bool) -> dict[str, Any]:
    """The expected kind and lazy regularization through the Lightning callback on ``device``."""

    name = "tiny" if quick else "resnet18"
    cpu_model, dev_model = _twin_models(name, device)
    # the expected kind is deterministic: the device's penalty and gradient equal CPU's
    reg_c, reg_d = (common.make_regularizer(m, "random_expected") for m in (cpu_model, dev_model))
    out_c, out_d = reg_c(), reg_d()
    err = abs(out_d.penalty.item() - out_c.penalty.item()) / abs(out_c.penalty.item())
    assert err < 1e-4, err
    result: dict[str, Any] = {"expected_rel_err_vs_cpu": err}
    try:
        import lightning.pytorch as pl

        from lightning_comhe.callback import CoMHE
    except Exception as err:  # noqa: BLE001
        result["lightning"] = f"skipped: {err}"
        return result
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.lightning_parts import Classifier, quiet_trainer

    class Spy(pl.Callback):
        """The global steps at which the regularizer computed a penalty."""

        def __init__(self):
            self.steps: list[int] = []
            self.trainer = None

        def on_train_start(self, trainer, pl_module):
            self.trainer = trainer
            for cb in trainer.callbacks:
                if isinstance(cb, CoMHE) and cb.regularizer is not None:
                    inner = cb.regularizer.compute

                    def counted(*args, inner=inner):
                        self.steps.append(self.trainer.global_step)
                        return inner(*args)

                    cb.regularizer.compute = counted

    steps = 8
    data = TensorDataset(torch.randn(8 * steps, 3, 32, 32), torch.randint(0, 100, (8 * steps,)))
    for every in (1, 4):
        spy = Spy()
        module = Classifier(common.create_model(name), weight_decay=0.0)
        trainer = quiet_trainer(device, steps, [CoMHE("random", projection_kind="expected", every_n_steps=every), spy])
        trainer.fit(module, DataLoader(data, batch_size=8))
        assert all(torch.isfinite(p).all() for p in module.parameters())
        assert spy.steps == [s for s in range(steps) if s % every == 0], (every, spy.steps)
        result[f"every_{every}_penalized_steps"] = spy.steps
    return result


def check_two_devices(device: torch.device, quick: bool) -> dict[str, float]:
    """Weights on cpu and on ``device`` (model parallelism): penalty and gradients equal the all-CPU run."""
    from lightning_comhe import CoMHERegularizer

    torch.manual_seed(0)
    layers = [torch.nn.Linear(24, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 10)]
    split = torch.nn.Sequential(layers[0], layers[1].to(device), layers[2].to(device))
    ref = torch.nn.Sequential(*(torch.nn.Linear(1, 1) for _ in range(3)))
    for i, layer in enumerate(split):
        ref[i] = torch.nn.Linear(layer.in_features, layer.out_features)
        ref[i].load_state_dict({k: v.cpu() for k, v in layer.state_dict().items()})
    detail = {}
    # deterministic variants only: random and learned projections draw from per-device generators
    for variant, kw in (
        ("mhe", {}),
        ("half_mhe", {}),
        ("random", {"projection_dim": 8, "projection_kind": "expected"}),
    ):
        regs = [CoMHERegularizer(m, variant, seed=1, **kw) for m in (split, ref)]
        for reg, model in zip(regs, (split, ref), strict=True):
            model.zero_grad()
            reg.refresh(0.1)
            reg().penalty.backward()
        got = [p.grad.cpu() for p in split.parameters() if p.grad is not None]
        want = [p.grad for p in ref.parameters() if p.grad is not None]
        detail[variant] = max(
            float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(got, want, strict=True)
        )
        assert detail[variant] < 1e-4, (variant, detail[variant])
    return detail


def check_fsdp1(device: torch.device, quick: bool) -> dict[str, Any]:
    """Lightning's own ``FSDPStrategy`` on one CUDA device (no CPU subclass): 32-true equals the single-device
    run, and ``16-mixed`` (FSDP's ``ShardedGradScaler``) stays finite with the penalty logged."""
    if device.type != "cuda":
        return {"skipped": "FSDPStrategy needs CUDA"}
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.lightning_parts import Classifier, quiet_trainer
    from lightning_comhe.callback import CoMHE

    data = TensorDataset(torch.randn(64, 3, 32, 32), torch.randint(0, 100, (64,)))
    weights, detail = [], {}
    for strategy, precision in (("auto", "32-true"), ("fsdp", "32-true"), ("fsdp", "16-mixed")):
        torch.manual_seed(0)
        module = Classifier(common.create_model("tiny" if quick else "resnet18"), momentum=0.0, weight_decay=0.0)
        wrap = {torch.nn.Conv2d, torch.nn.Linear}
        trainer = quiet_trainer(
            device, 3, [CoMHE("random", seed=3)], precision=precision,
            strategy=FSDPStrategy(auto_wrap_policy=wrap) if strategy == "fsdp" else "auto",
        )  # fmt: skip
        trainer.fit(module, DataLoader(data, batch_size=16))
        assert torch.isfinite(trainer.callback_metrics["comhe/penalty"]), (strategy, precision)
        if precision == "32-true":
            if strategy == "fsdp":
                from torch.distributed.fsdp import FullyShardedDataParallel

                with FullyShardedDataParallel.summon_full_params(trainer.strategy.model):
                    weights.append([p.detach().float().cpu().clone() for p in module.parameters()])
            else:
                weights.append([p.detach().float().cpu().clone() for p in module.parameters()])
    detail["fsdp_vs_single_max_rel"] = max(
        float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(weights[1], weights[0], strict=True)
    )
    assert detail["fsdp_vs_single_max_rel"] < 1e-4, detail
    return detail


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.set_defaults(device="cuda", out=common.RESULTS / "gpu")
    parser.add_argument("--skip-benchmarks", action="store_true")
    parser.add_argument("--full", action="store_true", help="every size and variant (longer than 15 minutes)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        common.log("[gpu] CUDA is not available here: nothing to check (use --device cpu --quick to test the script).")
        return {"skipped": "no CUDA"}
    device = common.setup(args)
    report: dict[str, Any] = {"machine": common.machine_info(device), "command": common.command_line("gpu", argv)}
    checks: dict[str, Any] = {}
    _check("energies vs float64 CPU", lambda: check_energies(device, args.quick), checks)
    _check("compiled (torch.compile) vs eager", lambda: check_compiled(device, args.quick), checks)
    _check("structured projections", lambda: check_structured(device, args.quick), checks)
    _check("regularizer vs CPU", lambda: check_regularizer(device, args.quick), checks)
    _check("bf16 autocast and fp16 GradScaler", lambda: check_mixed_precision(device, args.quick), checks)
    _check("expected kind and every_n_steps (Lightning)", lambda: check_cheap_settings(device, args.quick), checks)
    _check("weights on cpu and the GPU (model parallelism)", lambda: check_two_devices(device, args.quick), checks)
    _check("FSDP v1 on one CUDA device (Lightning)", lambda: check_fsdp1(device, args.quick), checks)
    report["checks"] = checks
    if not args.skip_benchmarks:
        from benchmarks import floor, ladder, memory, overhead, scale

        common_args = ["--device", args.device, "--out", str(args.out), "--threads", str(args.threads)]
        common_args += ["--quick"] if args.quick else []
        # sized for a 15-minute device budget (each spawned process pays a CUDA start-up); --full runs everything
        light = not args.full and not args.quick
        few = ["--variants", "half_mhe", "random", "random_sparse", "random_expected", "angle"] if light else []
        runs = {
            "floor": (floor.run, ["--repeats", "3"] if light else []),
            "overhead": (
                overhead.run,
                ["--batch-size", "8" if args.quick else "256", "--amp", "bf16"] + (["--repeats", "3"] if light else []),
            ),
            "ladder": (
                ladder.run,
                ["--thread-counts", str(args.threads)] + (["--repeats", "1", "--large-steps", "8"] if light else []),
            ),
            "scale": (
                scale.run,
                ["--sizes", "256", "4096", "16384", "65536", "--autograd-max", "4096"] if light else [],
            ),
            "scale_c20": (
                scale.run,
                ["--num-projections", "20", "--name", "scale_c20"]
                + ([] if args.quick else ["--sizes", "65536", "--autograd-max", "0"]),
            ),
            "memory": (memory.run, few),
        }
        for name, (fn, extra) in runs.items():
            t0 = time.perf_counter()
            try:
                fn(common_args + extra)
                report[name] = {"ok": True, "s": round(time.perf_counter() - t0, 1)}
            except Exception as err:  # noqa: BLE001
                report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
                common.log(f"[gpu] benchmark {name} failed: {err}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_summary.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    failed = [k for k, v in checks.items() if not v["ok"]]
    common.log(f"[gpu] checks: {len(checks) - len(failed)} passed, {len(failed)} failed {failed}")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
