"""What a run measures on a model: the hyperspherical energy of its layers, its error, the cost of the penalty."""

import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


def layer_energies(model: nn.Module, head: str, half_space: bool = False) -> dict[str, float]:
    """Hyperspherical energy (s = 2, chordal, unprojected) of every layer CoMHE would regularize.

    The energy of a layer is the mean over its neuron sets (one per conv group). ``half_space=False`` gives the
    full-space energy of the neurons ``W``, ``True`` the half-space energy of ``[W; -W]``.

    Args:
        model: The network.
        head: Its classifier's module name (as :func:`~lightning_comhe.discover_layers` takes it).
        half_space: Half-space instead of full-space energy.

    Returns:
        ``{layer name: energy}``; layers with a single neuron per set are left out.
    """
    from lightning_comhe import discover_layers, hyperspherical_energy

    out: dict[str, float] = {}
    with torch.no_grad():
        for layer in discover_layers(model, head=head).layers:
            values = [
                hyperspherical_energy(s.detach(), power=2, half_space=half_space).mean()
                for s in layer.neuron_sets()
                if s.shape[1] > 1
            ]
            if values:
                out[layer.name] = float(torch.stack(values).mean())
    return out


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 500) -> float:
    """Top-1 error (%) of ``model`` on ``dataset`` (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    wrong, total = 0, 0
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        wrong += int((model(x.to(device)).argmax(dim=1).cpu() != y).sum())
        total += len(y)
    return 100.0 * wrong / max(1, total)


def time_penalty(regularizer: Any, repeats: int = 10) -> float:
    """Mean seconds of one ``refresh`` + penalty forward + backward on the current weights."""
    params = [layer.module.weight for layer in regularizer.selection.layers]
    for p in params:
        p.grad = None
    regularizer.refresh(0.01)
    regularizer().penalty.backward()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        regularizer.refresh(0.01)
        regularizer().penalty.backward()
    elapsed = (time.perf_counter() - start) / repeats
    for p in params:
        p.grad = None
    return elapsed
