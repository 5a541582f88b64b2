"""The FSDP v1 layout on real ``FullyShardedDataParallel`` units, in one process (gloo, world size 1).

The 2-process runs against the data-parallel reference are in ``tests/test_distributed.py``.
"""

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from lightning_comhe._fsdp1 import Fsdp1Layout, add_to_gradients
from tests.dist_helpers import free_port


@pytest.fixture
def one_rank() -> Iterator[None]:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _wrapped(**kwargs: object) -> tuple[nn.Module, nn.Sequential, list[torch.Tensor]]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    full = [p.detach().clone() for p in net.parameters()]
    return FullyShardedDataParallel(net, device_id=torch.device("cpu"), **kwargs), net, full


def test_the_layout_gathers_each_parameter_and_keeps_its_fragment_of_a_gradient(one_rank: None) -> None:
    root, net, full = _wrapped(use_orig_params=True)
    layout = Fsdp1Layout(root)
    params = list(net.parameters())
    assert len(layout) == 4 and all(layout.holds(p) for p in params) and not layout.holds(full[0])
    assert layout.synced
    assert [p.ndim for p in params] == [2, 1, 2, 1]  # one rank: FSDP shards nothing (NO_SHARD), the shapes stay
    for p, ref in zip(params, full, strict=True):
        assert layout.shape(p) == ref.shape
        torch.testing.assert_close(layout.gather(p), ref, atol=0, rtol=0)
        grad = torch.arange(ref.numel(), dtype=ref.dtype).view(ref.shape)
        torch.testing.assert_close(layout.piece(p, grad, summed=True), grad, atol=0, rtol=0)  # a sum over 1 rank
    weight = params[0]
    weight.grad = torch.ones_like(weight)
    add_to_gradients([(weight, torch.full_like(weight, 2.0)), (params[1], params[1].new_zeros(0))])
    torch.testing.assert_close(weight.grad, torch.full_like(weight, 3.0))
    assert params[1].grad is None  # an empty fragment adds nothing


def test_the_layout_refuses_units_without_their_original_parameters(one_rank: None) -> None:
    root, _, _ = _wrapped(use_orig_params=False)
    with pytest.raises(ValueError, match=r"needs `use_orig_params=True`.*got use_orig_params=False"):
        Fsdp1Layout(root)
