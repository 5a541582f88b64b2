"""Multi-process tests of the CoMHE callback: DDP (gloo), two "nodes" on localhost, FSDP v1, FSDP2 and DeepSpeed
on CPU.

Each strategy runs one worker launch (``tests/scripts/dist_worker.py``) holding several short fits, so the process
start-up cost is paid once per strategy. Every fit is checked three ways:

- the ranks end bit-identical (weights, callback state, logged penalty);
- each rank saw exactly the batches of a hand-written reproduction of Lightning's ``DistributedSampler``;
- the final weights equal a single-process float64 reference: mean over ranks of the task gradients plus the
  penalty gradient once per optimizer step (:func:`tests.dist_helpers.reference_fit_data_parallel`), and differ
  from the penalty-free reference.
"""

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_comhe.regularizer import CoMHERegularizer
from tests.dist_helpers import (
    base_env,
    epoch_batches,
    free_port,
    python_script,
    reference_fit_data_parallel,
    reference_fit_deepspeed,
    run_processes,
)
from tests.helpers import TinyMLP, assert_nested_equal, clone_model, make_dataset, regularizer_penalty

pytestmark = pytest.mark.distributed

TIMEOUT = 240.0  # seconds for one worker launch (all its fits); typical: 15-30 s on 2 busy cores
WORLD_SIZE = 2
# Small projections (d = 6 or 8 > k = 4, so the layers are really projected) and moderate weights; see test_callback.
_PROJECTED = {"weight": 0.1, "head_weight": 1.0, "projection_dim": 4}
COMHE = {
    "mhe": {"variant": "mhe"},
    "half_mhe": {"variant": "half_mhe"},
    "random": {"variant": "random", "num_projections": 3, **_PROJECTED},
    "angle": {"variant": "angle", **_PROJECTED},
    "adversarial": {"variant": "adversarial", "inner_steps": 2, **_PROJECTED},
}


def _config(
    name: str, variant: str, *, accumulate: int = 1, batch_size: int = 4, max_steps: int = 4, every_n_steps: int = 1
) -> dict:
    """One fit of the worker. 15 samples: 8 per rank and epoch (one padded index); batch 4 -> 2 batches per rank,
    batch 3 -> 3 batches (3 + 3 + 2), i.e. a ragged accumulation window of 1 with ``accumulate=2``."""
    return {
        "name": name,
        "comhe": {**COMHE[variant], "seed": 7, **({"every_n_steps": every_n_steps} if every_n_steps > 1 else {})},
        "accumulate": accumulate,
        "batch_size": batch_size,
        "max_steps": max_steps,
    }


SHARDED = ("random", "angle", "adversarial")
RESHARDED = ("random", "angle")  # resumed into one process: the RNG entries, the learned projections
DDP_CONFIGS = [
    _config("mhe", "mhe"),
    _config("half_mhe", "half_mhe"),
    _config("random", "random"),
    _config("angle", "angle"),
    _config("adversarial", "adversarial"),
    _config("random_acc2", "random", accumulate=2, batch_size=3, max_steps=4),
    _config("angle_acc2", "angle", accumulate=2, batch_size=3, max_steps=4),
    # lazy regularization: the penalty (×2) on steps 0, 2, 4 only, with accumulation
    _config("random_lazy2_acc2", "random", accumulate=2, batch_size=3, max_steps=5, every_n_steps=2),
    # the penalty split across the ranks is the default (shard=True): the same runs, every rank computing it all
    *({**_config(f"{v}_unsharded", v), "comhe": {**_config(v, v)["comhe"], "shard": False}} for v in SHARDED),
    # a DDP checkpoint after step 2 (of 4), resumed into fresh objects, sharded
    *({**_config(f"{v}_resume", v), "resume_at": 2} for v in SHARDED),
    # the same checkpoint of an unsharded run: the reference of a resume into another world size
    *(
        {**_config(f"{v}_unsharded_resume", v), "comhe": {**_config(v, v)["comhe"], "shard": False}, "resume_at": 2}
        for v in RESHARDED
    ),
]
MULTINODE_CONFIGS = [
    _config("random", "random"),
    _config("adversarial_acc2", "adversarial", accumulate=2, batch_size=3, max_steps=4),
]
FSDP2_SHARDED = FSDP1_SHARDED = ("random", "angle")
# the penalty split across the ranks (the default) against every rank computing it all
FSDP_COMMON = [
    *(_config(v, v) for v in ("mhe", "random", "angle")),
    _config("adversarial_acc2", "adversarial", accumulate=2, batch_size=3, max_steps=4),
    *({**_config(f"{v}_unsharded", v), "comhe": {**_config(v, v)["comhe"], "shard": False}} for v in FSDP2_SHARDED),
]
FSDP2_CONFIGS = FSDP_COMMON
FSDP1_CONFIGS = [
    *FSDP_COMMON,
    _config("half_mhe_acc2", "half_mhe", accumulate=2, batch_size=3, max_steps=4),
    {**_config("random_shard_grad_op", "random"), "sharding": "SHARD_GRAD_OP"},
    {**_config("angle_no_shard", "angle"), "sharding": "NO_SHARD"},
    # a `configure_model` hook: CoMHE finds its layers in `on_fit_start`, when they are already 1-D fragments
    {**_config("random_built_late", "random"), "configure_model": True},
    # a (full-state-dict) FSDP v1 checkpoint after step 2 (of 4), resumed into a fresh strategy and callback
    {**_config("adversarial_resume", "adversarial"), "resume_at": 2},
]

DEEPSPEED_CONFIGS = [
    {**_config("zero1_random", "random"), "stage": 1},
    {**_config("zero2_angle", "angle"), "stage": 2},
    {**_config("zero2_adversarial_acc2", "adversarial", accumulate=2, batch_size=3, max_steps=4), "stage": 2},
    {**_config("zero3_random", "random"), "stage": 3},
    {**_config("zero3_angle", "angle"), "stage": 3},
    {**_config("zero3_half_mhe_unsharded", "half_mhe"), "stage": 3, "unsharded": True},
    # a ZeRO-3 checkpoint after step 2 (of 4), resumed into a fresh engine and callback
    {**_config("zero3_adversarial_resume", "adversarial"), "stage": 3, "resume_at": 2},
]
for _c in DEEPSPEED_CONFIGS:
    if _c.get("unsharded"):
        _c["comhe"]["shard"] = False  # every rank computes the whole penalty on its gathered weights


def _launch(mode: str, configs: list[dict], out: Path, *, by_hand: bool, **env: str) -> dict[str, list[dict[str, Any]]]:
    """Run the worker; return, per config name, the per-rank results (ordered by global rank)."""
    args = ["--mode", mode, "--out", str(out), "--configs", json.dumps(configs)]
    for _attempt in range(3):  # a free port can be taken by another process before the workers bind it: retry
        port = str(free_port())
        if by_hand:  # one process per "node", started here
            envs = [
                base_env(
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(r), WORLD_SIZE="2", LOCAL_RANK="0", **env
                )
                for r in range(2)
            ]
            commands = [python_script("dist_worker.py", *args)] * 2
        else:  # Lightning's launcher starts local rank 1 itself
            envs = [base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)]
            commands = [python_script("dist_worker.py", *args)]
        finished = run_processes(commands, envs, timeout=TIMEOUT)
        if not any(f.returncode != 0 and "address already in use" in f.output.lower() for f in finished):
            break
    for f in finished:
        assert f.returncode == 0, f.output[-6000:]
    results = {}
    for c in configs:
        files = [out / f"{c['name']}_rank{r}.pt" for r in range(WORLD_SIZE)]
        missing = [str(f) for f in files if not f.exists()]
        assert not missing, f"missing results {missing}:\n" + "\n".join(f.output[-3000:] for f in finished)
        results[c["name"]] = [torch.load(f, weights_only=False) for f in files]
    return results


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return _launch("ddp", DDP_CONFIGS, tmp_path_factory.mktemp("ddp"), by_hand=False)


@pytest.fixture(scope="module")
def multinode_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return _launch("multinode", MULTINODE_CONFIGS, tmp_path_factory.mktemp("multinode"), by_hand=True)


@pytest.fixture(scope="module")
def fsdp2_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return _launch("fsdp2", FSDP2_CONFIGS, tmp_path_factory.mktemp("fsdp2"), by_hand=False)


def _check(
    results: list[dict[str, Any]], config: dict, dtype: torch.dtype = torch.float64, atol: float = 1e-12, rtol=1e-10
) -> None:
    r0, r1 = results
    # 1. a real 2-process run that went the whole way
    assert [r["global_rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == WORLD_SIZE and r["global_step"] == config["max_steps"] for r in results)

    # 2. replicas bit-identical
    assert r0["weights"].keys() == r1["weights"].keys()
    for k in r0["weights"]:
        assert r0["weights"][k].dtype == dtype
        assert torch.equal(r0["weights"][k], r1["weights"][k]), f"ranks differ on {k}"
    assert_nested_equal(r0["callback_state"], r1["callback_state"])
    assert torch.equal(r0["penalty"], r1["penalty"])

    # 3. each rank saw the batches of the hand-written DistributedSampler, epoch after epoch
    dataset = make_dataset(num_batches=5, batch_size=3)
    seen = [r["inputs"] for r in results]
    epoch = 0
    while seen[0]:
        expected = epoch_batches(dataset, WORLD_SIZE, epoch, config["batch_size"])
        for rank in range(WORLD_SIZE):
            n = min(len(expected[rank]), len(seen[rank]))
            for i in range(n):
                torch.testing.assert_close(seen[rank][i], expected[rank][i][0].double(), atol=0, rtol=0)
            seen[rank] = seen[rank][n:]
        epoch += 1
    assert not seen[1]

    # 4. the single-process data-parallel reference, and the penalty mattered
    model = TinyMLP(momentum=0.9).to(dtype)  # same dtype as the run: random draws differ between float32 and 64
    ref, plain = clone_model(model), clone_model(model)
    common = {
        "world_size": WORLD_SIZE,
        "batch_size": config["batch_size"],
        "max_steps": config["max_steps"],
        "accumulate": config["accumulate"],
        "dtype": dtype,
    }
    comhe = dict(config["comhe"])
    every = comhe.pop("every_n_steps", 1)
    comhe.pop("shard", None)
    dense = regularizer_penalty(CoMHERegularizer(ref, **comhe))
    logged: list[torch.Tensor] = []

    def penalty(step: int, lr: float) -> torch.Tensor:  # lazy regularization: m·R on the steps step % m == 0
        if step % every:
            return torch.zeros((), dtype=dtype, requires_grad=True)
        value = dense(step, lr)
        logged.append(value.detach().clone())
        return every * value

    reference_fit_data_parallel(ref, dataset, penalty_fn=penalty, **common)
    reference_fit_data_parallel(plain, dataset, penalty_fn=None, **common)
    ref_weights = {k: v.detach() for k, v in ref.named_parameters()}
    plain_weights = {k: v.detach() for k, v in plain.named_parameters()}
    assert ref_weights.keys() == r0["weights"].keys()
    for k, v in ref_weights.items():
        torch.testing.assert_close(r0["weights"][k], v, atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(r0["penalty"], logged[-1], atol=atol, rtol=rtol)  # R of the last penalized step
    assert max((r0["weights"][k] - plain_weights[k]).abs().max().item() for k in plain_weights) > 1e-3


@pytest.mark.parametrize("config", DDP_CONFIGS, ids=[c["name"] for c in DDP_CONFIGS])
def test_ddp_matches_data_parallel_reference(config: dict, ddp_results: dict) -> None:
    """``Trainer(accelerator="cpu", devices=2, strategy="ddp")`` (gloo), launched by Lightning itself."""
    _check(ddp_results[config["name"]], config)


@pytest.mark.parametrize("variant", SHARDED)
def test_ddp_sharded_penalty_equals_the_unsharded_one(variant: str, ddp_results: dict) -> None:
    """``shard=True`` (each rank a share, ×W) gives the weights of ``shard=False`` (every rank everything)."""
    _assert_split_equals_unsplit(ddp_results[variant], ddp_results[f"{variant}_unsharded"], scatter=False)


def _assert_split_equals_unsplit(sharded: list[dict], unsharded: list[dict], scatter: bool) -> None:
    """The split runs (``shard=True``) end with the weights and penalty of the unsplit ones, ranks identical."""
    assert [r["shard"] for r in sharded] == [(0, 2, scatter), (1, 2, scatter)]
    assert all(r["shard"] is None for r in unsharded)
    for k, v in unsharded[0]["weights"].items():
        torch.testing.assert_close(sharded[0]["weights"][k], v, atol=1e-12, rtol=1e-10)
        assert torch.equal(sharded[0]["weights"][k], sharded[1]["weights"][k])  # ranks bit-identical
    torch.testing.assert_close(sharded[0]["penalty"], unsharded[0]["penalty"], atol=1e-12, rtol=1e-10)
    # the checkpointed state is the whole state on every rank (each rank fitted only its own projections)
    assert_nested_equal(sharded[0]["callback_state"], sharded[1]["callback_state"])


@pytest.mark.parametrize("variant", SHARDED)
def test_ddp_sharded_checkpoint_resumes_bit_exactly(variant: str, ddp_results: dict) -> None:
    for rank_result in ddp_results[f"{variant}_resume"]:
        resumed = rank_result["resumed"]
        for k, v in rank_result["weights"].items():
            assert torch.equal(resumed["weights"][k], v), f"{variant}: {k} differs after resuming"
        assert_nested_equal(resumed["callback_state"], rank_result["callback_state"])


def _continue_in_one_process(checkpoint: str, comhe: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Resume a 2-rank checkpoint with one process (world size 1) and train to step 4."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from lightning_comhe import CoMHE

    model, callback = TinyMLP(momentum=0.9, seed=123).double(), CoMHE(**comhe)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        precision="64-true",
        max_steps=4,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(make_dataset(num_batches=5, batch_size=3), batch_size=4, shuffle=False)
    trainer.fit(model, loader, ckpt_path=checkpoint)
    assert trainer.global_step == 4
    return {k: v.detach().clone() for k, v in model.named_parameters()}, callback.state_dict()


@pytest.mark.parametrize("variant", RESHARDED)
def test_ddp_sharded_checkpoint_resumes_into_another_world_size(variant: str, ddp_results: dict) -> None:
    """A checkpoint of a 2-rank sharded run holds the whole state: one process resumes it as an unsharded one's."""
    sharded_ckpt = ddp_results[f"{variant}_resume"][0]["checkpoint"]
    unsharded_ckpt = ddp_results[f"{variant}_unsharded_resume"][0]["checkpoint"]
    states = [torch.load(c, weights_only=False)["callbacks"] for c in (sharded_ckpt, unsharded_ckpt)]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert _flat_keys(states[0][key]) == _flat_keys(states[1][key])  # every group's projections and RNG entries
    comhe = {**COMHE[variant], "seed": 7}
    weights, state = _continue_in_one_process(sharded_ckpt, comhe)
    ref_weights, ref_state = _continue_in_one_process(unsharded_ckpt, {**comhe, "shard": False})
    for k, v in ref_weights.items():
        torch.testing.assert_close(weights[k], v, atol=1e-12, rtol=1e-10, msg=lambda m, k=k: f"{k}: {m}")
    assert _flat_keys(state) == _flat_keys(ref_state)
    # and the resumed run really continued: its weights moved away from the checkpoint's
    ckpt_weights = torch.load(sharded_ckpt, weights_only=False)["state_dict"]
    assert max((weights[k] - ckpt_weights[k]).abs().max().item() for k in weights) > 1e-4


def _flat_keys(state: Any, prefix: str = "") -> set[str]:
    if isinstance(state, dict):
        return set().union(*(_flat_keys(v, f"{prefix}/{k}") for k, v in state.items())) if state else {prefix}
    return {prefix}


@pytest.mark.parametrize("config", MULTINODE_CONFIGS, ids=[c["name"] for c in MULTINODE_CONFIGS])
def test_multinode_matches_data_parallel_reference(config: dict, multinode_results: dict) -> None:
    """``num_nodes=2, devices=1`` on localhost, one process per "node" started by hand with ``NODE_RANK=0|1``."""
    assert [r["node_rank"] for r in multinode_results[config["name"]]] == [0, 1]
    _check(multinode_results[config["name"]], config)


@pytest.mark.parametrize("config", FSDP2_CONFIGS, ids=[c["name"] for c in FSDP2_CONFIGS])
def test_fsdp2_matches_data_parallel_reference(config: dict, fsdp2_results: dict) -> None:
    """FSDP2 on CPU: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` + ``fully_shard``."""
    results = fsdp2_results[config["name"]]
    assert all(r["sharded"] for r in results)  # the weights really were DTensors during training
    if results[0]["shard"] is not None:  # a split penalty gathers one group's weights at a time (64 of 136)
        assert all(0 < r["gathered_peak"] <= 64 < r["regularized_numel"] == 136 for r in results)
    _check(results, config)


@pytest.mark.parametrize("variant", FSDP2_SHARDED)
def test_fsdp2_sharded_penalty_equals_the_unsharded_one(variant: str, fsdp2_results: dict) -> None:
    """Under FSDP2 each rank computes a share on the gathered weights; the shares' gradients are reduce-scattered."""
    _assert_split_equals_unsplit(fsdp2_results[variant], fsdp2_results[f"{variant}_unsharded"], scatter=True)


@pytest.fixture(scope="module")
def fsdp1_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return _launch("fsdp1", FSDP1_CONFIGS, tmp_path_factory.mktemp("fsdp1"), by_hand=False)


@pytest.mark.parametrize("config", FSDP1_CONFIGS, ids=[c["name"] for c in FSDP1_CONFIGS])
def test_fsdp1_matches_data_parallel_reference(config: dict, fsdp1_results: dict) -> None:
    """FSDP v1 on CPU: Lightning's ``FSDPStrategy`` (one unit per ``Linear``), float32 (its precision plugin has no
    ``"64-true"``).

    After each backward the weights are 1-D fragments again, with fragments of the averaged gradient: the penalty is
    computed on gathered copies (one group at a time) and each rank adds its fragment of its gradient.
    """
    results = fsdp1_results[config["name"]]
    sharded = config.get("sharding", "FULL_SHARD") != "NO_SHARD"
    assert all(r["fsdp1_fragments"] == sharded for r in results)  # the weights really were 1-D fragments
    if config["comhe"].get("shard", True):
        assert [r["shard"] for r in results] == [(0, 2, True), (1, 2, True)]
    if sharded:  # one group's weights gathered at a time, never all of them
        assert all(0 < r["gathered_peak"] <= 64 < r["regularized_numel"] == 136 for r in results)
    if config.get("resume_at"):
        for r in results:
            for k, v in r["weights"].items():
                assert torch.equal(r["resumed"]["weights"][k], v), f"{k} differs after resuming"
            assert_nested_equal(r["resumed"]["callback_state"], r["callback_state"])
    _check(results, config, dtype=torch.float32, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", FSDP1_SHARDED)
def test_fsdp1_sharded_penalty_equals_the_unsharded_one(variant: str, fsdp1_results: dict) -> None:
    _assert_split_equals_unsplit(fsdp1_results[variant], fsdp1_results[f"{variant}_unsharded"], scatter=True)


@pytest.fixture(scope="module")
def deepspeed_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the [dev] extra on Linux; CI installs it")
    return _launch("deepspeed", DEEPSPEED_CONFIGS, tmp_path_factory.mktemp("ds"), by_hand=False, DS_ACCELERATOR="cpu")


@pytest.mark.parametrize("config", DEEPSPEED_CONFIGS, ids=[c["name"] for c in DEEPSPEED_CONFIGS])
def test_deepspeed_zero_matches_reference(config: dict, deepspeed_results: dict) -> None:
    """DeepSpeed ZeRO-1/2/3 through Lightning's ``DeepSpeedStrategy`` on DeepSpeed's CPU accelerator (float32).

    Under ZeRO-3 the weights are gathered for the penalty (its parameters are empty placeholders outside forward),
    and the penalty's gradients are averaged into the partitions with the task's.

    Without accumulation DeepSpeed steps like DDP: the data-parallel reference applies. With accumulation the
    engine's windows run across epoch ends and both Lightning and the engine divide the loss by ``A``:
    :func:`tests.dist_helpers.reference_fit_deepspeed` reproduces that, with the penalty once per engine step.
    """
    results = deepspeed_results[config["name"]]
    assert all(r["engine"] == "DeepSpeedEngine" and r["zero_stage"] == config["stage"] for r in results)
    assert all(r["zero3_partitioned"] == (config["stage"] == 3) for r in results)  # ZeRO-3 really partitioned
    # the penalty split across the ranks (or, with shard=False, computed whole on every rank)
    # (ZeRO-3: the shares' gradients are summed over the ranks into each rank's partition slice, "scatter")
    stage3 = config["stage"] == 3
    assert [r["shard"] for r in results] == (
        [None, None] if config.get("unsharded") else [(0, 2, stage3), (1, 2, stage3)]
    )
    if stage3:  # one group's weights gathered at a time, never all of them (TinyMLP: 8x6, 8x8 and 3x8 layers)
        assert all(0 < r["gathered_peak"] <= 64 < r["regularized_numel"] == 136 for r in results)
    if config.get("resume_at"):  # resumed from the checkpoint into a fresh engine: bit-exact
        for r in results:
            for k, v in r["weights"].items():
                assert torch.equal(r["resumed"]["weights"][k], v), f"{k} differs after resuming"
            assert_nested_equal(r["resumed"]["callback_state"], r["callback_state"])
    tol = {"dtype": torch.float32, "atol": 1e-5, "rtol": 1e-4}
    if config["accumulate"] == 1:
        _check(results, config, **tol)
        return
    r0, r1 = results
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), f"ranks differ on {k}"
    assert_nested_equal(r0["callback_state"], r1["callback_state"])
    micro = len(r0["inputs"])
    assert micro == len(r1["inputs"]) and micro >= 2 * config["accumulate"]
    dataset = make_dataset(num_batches=5, batch_size=3)
    model = TinyMLP(momentum=0.9)
    ref, plain = clone_model(model), clone_model(model)
    common = {"world_size": WORLD_SIZE, "batch_size": config["batch_size"], "micro_batches": micro}
    common["accumulate"] = config["accumulate"]
    penalty = regularizer_penalty(CoMHERegularizer(ref, **config["comhe"]))
    _, penalties = reference_fit_deepspeed(ref, dataset, penalty_fn=penalty, **common)
    reference_fit_deepspeed(plain, dataset, penalty_fn=None, **common)
    assert r0["engine_steps"] == micro // config["accumulate"] == len(penalties)
    for k, v in ref.named_parameters():
        torch.testing.assert_close(r0["weights"][k], v.detach(), atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    assert max((r0["weights"][k] - p.detach()).abs().max().item() for k, p in plain.named_parameters()) > 1e-3
