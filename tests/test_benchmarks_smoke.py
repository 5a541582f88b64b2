"""Smoke test of the benchmark harness (``benchmarks/``) at tiny sizes: it runs and writes its files.

It checks the harness, never the timings.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--quick", "--threads", "1"]


def read(out: Path, name: str) -> dict:
    for ext in ("json", "md", "png"):
        assert (out / f"{name}.{ext}").is_file(), f"{name}.{ext} missing"
        assert (out / f"{name}.{ext}").stat().st_size > 0
    payload = json.loads((out / f"{name}.json").read_text())
    assert payload["machine"]["torch"] and payload["machine"]["nproc"] >= 1
    assert payload["command"].startswith(f"python -m benchmarks.{name.split('_c')[0]}")
    return payload


def test_kernel_benchmark(tmp_path):
    from benchmarks import kernel

    payload = kernel.run([*QUICK, "--out", str(tmp_path), "--thread-counts", "1", "2"])
    read(tmp_path, "kernel")
    assert {r["variant"] for r in payload["records"]} == {"random", "half_mhe"}
    assert [(r["variant"], r["threads"]) for r in payload["records"]] == [
        ("random", 1),
        ("random", 2),
        ("half_mhe", 1),
        ("half_mhe", 2),
    ]
    for r in payload["records"]:
        assert r["speedup"] > 0 and r["value_rel_error"] < 1e-4 and r["grad_rel_error"] < 1e-3
        assert len(r["naive"]["times_s"]) == len(r["library"]["times_s"]) == 2


def test_floor_benchmark_with_profiles(tmp_path):
    from benchmarks import common, floor

    variants = ["half_mhe", "random_sparse", "random_expected", "angle", "adversarial"]
    payload = floor.run([*QUICK, "--out", str(tmp_path), "--variants", *variants, "--thread-counts", "1", "2"])
    read(tmp_path, "floor")
    assert [(r["variant"], r["threads"]) for r in payload["records"]] == [(v, t) for v in variants for t in (1, 2)]
    for r in payload["records"]:
        assert (
            r["floor_s"] > 0
            and r["matmul_gflops"] > 0
            and r["flops"]["total"] == pytest.approx(sum(r["flops"][k] for k in ("projection", "gram", "inner")))
        )
    for v in variants:  # at tiny sizes the floor is never met: one profile per variant, at its worst thread count
        profiled = [r for r in payload["records"] if r["variant"] == v and "profile" in r]
        assert len(profiled) == 1
        assert sum(profiled[0]["profile"]["categories_pct"].values()) == pytest.approx(100, abs=1)
    assert set(payload["shape_gflops"]) == {"1", "2"} and set(payload["shape_gflops"]["2"]) == set(floor.SHAPES)
    assert "ratio (2 threads)" in (tmp_path / "floor.md").read_text()
    assert set(common.VARIANTS) >= {"mhe", "half_mhe", "random", "random_expected", "angle", "adversarial"}


def test_floor_flops_formula():
    from benchmarks import common

    model = common.create_model("tiny")
    reg = common.make_regularizer(model, "random")
    flops = common.floor_flops(reg)
    # conv2 (48 × 72) is projected (k = 40, C = 20); conv1 (8 × 27, d <= k) half-space; fc (100 × 48) full space
    proj = 4 * 48 * 72 * 40 * 20
    gram = 4 * 48**2 * 40 * 20 + 4 * 8**2 * 27 + 4 * 100**2 * 48
    assert flops["projection"] == proj and flops["gram"] == gram and flops["inner"] == 0
    # the expected kind: no projection, the projected set's full-space Gram instead
    flops = common.floor_flops(common.make_regularizer(model, "random_expected"))
    assert flops["projection"] == 0 and flops["gram"] == 4 * 48**2 * 72 + 4 * 8**2 * 27 + 4 * 100**2 * 48


def test_ladder_benchmark_lazy_and_expected_rungs(tmp_path):
    from benchmarks import ladder

    payload = ladder.run([*QUICK, "--out", str(tmp_path), "--thread-counts", "1", "2"])
    read(tmp_path, "ladder")
    labels = [label for label, _ in ladder.LADDER]
    assert {"plain", "RP expected", "expected, every 8", "RP official, every 4"} <= set(labels)
    first = [r for r in payload["records"] if r["image_size"] == 8]
    assert [(r["rung"], r["threads"]) for r in first] == [(lab, t) for t in (1, 2) for lab in labels]
    assert {r["threads"] for r in payload["records"] if r["image_size"] == 16} == {1}  # the large size: first count
    for r in payload["records"]:
        assert r["step_s"] > 0 and len(r["step_times_s"]) == 8  # 8 timed steps: one period of every_n_steps=8
    assert next(r for r in first if r["rung"] == "plain")["ratio"] == 1.0
    assert payload["target_record"]["threads"] == 1 and "target_met" in payload["target_record"]
    assert ladder.period_cost([1.0, 3.0, 1.0, 3.0], first_step=1, every=2) == 2.0


def test_overhead_benchmark_with_lightning(tmp_path):
    from benchmarks import overhead

    payload = overhead.run([*QUICK, "--out", str(tmp_path), "--variants", "random", "random_sparse", "--no-profile"])
    read(tmp_path, "overhead")
    assert [r["variant"] for r in payload["records"]] == ["random", "random_sparse"]
    for r in payload["records"]:
        assert r["ratio"] > 0 and r["floor_ratio"] >= 1
    if payload["lightning"]:  # the Lightning callback is importable: the Trainer path ran for the Gaussian variant
        assert set(payload["lightning"]["tiny"]["step_s"]) == {"plain", "random"}


def test_scale_and_memory_benchmarks_spawn_fresh_processes(tmp_path):
    from benchmarks import memory, scale

    payload = scale.run([*QUICK, "--out", str(tmp_path), "--sizes", "32", "64", "--autograd-max", "32"])
    read(tmp_path, "scale")
    assert [(r["backend"], r["n"]) for r in payload["records"]] == [("fused", 32), ("fused", 64), ("autograd", 32)]
    assert all("error" not in r and r["weight_grad_bytes"] == r["n"] * 256 * 4 for r in payload["records"])
    payload = memory.run([*QUICK, "--out", str(tmp_path), "--variants", "random"])
    read(tmp_path, "memory")
    assert [r["variant"] for r in payload["records"]] == ["plain", "random"]
    assert all(r["peak_rss_bytes"] > 0 for r in payload["records"])


def test_report_and_gpu_script(tmp_path):
    from benchmarks import gpu, report

    out = gpu.run(["--device", "cpu", "--quick", "--threads", "1", "--skip-benchmarks", "--out", str(tmp_path)])
    assert all(check["ok"] for check in out["checks"].values()), out["checks"]
    assert (tmp_path / "gpu_summary.json").is_file()
    # the report renders from whatever results exist (none here: every section says so)
    doc = report.run(["--results", str(tmp_path), "--doc", str(tmp_path / "benchmarks.md")])
    text = doc.read_text()
    assert "## Targets" in text and "not run" in text


def test_compiled_benchmark(tmp_path):
    from benchmarks import compiled

    payload = compiled.run([*QUICK, "--out", str(tmp_path)])
    read(tmp_path, "compiled")
    assert len(payload["records"]) == 4 and all(r["speedup"] > 0 for r in payload["records"])


def test_shard_benchmark_measures_shares_and_models_many_ranks(tmp_path):
    from benchmarks import shard

    payload = shard.run([*QUICK, "--out", str(tmp_path)])
    assert (tmp_path / "shard.md").is_file() and (tmp_path / "shard.json").is_file()
    assert {r["world"] for r in payload["measured"]} == {2, 4}
    assert all(len(r["rank_s"]) == r["world"] and r["whole_s"] > 0 for r in payload["measured"])
    rows = payload["cost_model"]
    assert {r["world"] for r in rows} == {8, 64} and all(r["imbalance"] >= 1.0 for r in rows)
    assert all(abs(r["ideal_s"] * r["world"] - r["whole_s"]) <= 1e-9 + 1e-9 * r["whole_s"] for r in rows)
    assert all(r["idle_ranks"] < r["world"] for r in rows)


def test_shard_step_benchmark_times_real_ddp_steps(tmp_path):
    from benchmarks import shard_step

    payload = shard_step.run([*QUICK, "--out", str(tmp_path)])
    assert (tmp_path / "shard_step.md").is_file() and (tmp_path / "shard_step.json").is_file()
    runs = {f"{v}/{m}" for v in shard_step.VARIANTS for m in ("sharded", "unsharded")}
    assert set(payload["times"]) == {"none"} | runs
    times = payload["times"].values()
    assert all(len(ranks) == 2 and all(len(t) == 2 and min(t) > 0 for t in ranks) for ranks in times)
    assert [r["variant"] for r in payload["rows"]] == list(shard_step.VARIANTS)
    assert all(r["step_sharded_s"] > 0 and r["step_unsharded_s"] > 0 for r in payload["rows"])


def test_run_all_is_one_command(tmp_path):
    from benchmarks import run_all

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "benchmarks.run_all", *QUICK, "--out", str(tmp_path), "--doc", str(tmp_path / "b.md")]
    cmd += ["--skip", "kernel", "overhead", "ladder", "scale", "scale_c20", "memory", "compiled", "shard", "shard_step"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "b.md").read_text()
    assert (tmp_path / "floor.json").is_file() and "Closeness to the GEMM floor" in text
    assert "ladder" in run_all.BENCHMARKS and "cheap preset" in text.lower()
