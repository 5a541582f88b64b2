r"""``HypersphericalEnergy``: a torchmetrics metric of the full-space energy of a model's neurons.

The functional core is :func:`layer_energies` (layer discovery + :func:`~lightning_comhe.hyperspherical_energy`);
the metric only accumulates its result.
"""

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_comhe._validation import check_bool
from lightning_comhe.config import EnergyConfig, SelectionConfig
from lightning_comhe.discovery import LayerSelection, NeuronLayer, discover_layers
from lightning_comhe.functional.energy import PowerLike, hyperspherical_energy

__all__ = ["HypersphericalEnergy", "layer_energies"]


def _configs(
    power: PowerLike,
    half_space: bool,
    angular: bool,
    include: Any,
    exclude: Any,
    head: Any,
    grouped: Any,
    std_conv: Any,
    eps: float,
) -> tuple[EnergyConfig, SelectionConfig]:
    """Validate the metric's arguments through the library's configs (one place, one message style)."""
    check_bool("half_space", half_space)
    variant = "half_mhe" if half_space else "mhe"
    energy = EnergyConfig(variant=variant, power=power, angular=angular, eps=eps)
    selection = SelectionConfig(include=include, exclude=exclude, head=head, grouped=grouped, std_conv=std_conv)
    return energy, selection


def layer_energies(
    model: nn.Module | LayerSelection | Sequence[NeuronLayer],
    power: PowerLike = 2,
    *,
    half_space: bool = False,
    angular: bool = False,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    head: str | Sequence[str] | None = "auto",
    grouped: Literal["per_group", "skip"] = "per_group",
    std_conv: Literal["raw", "standardized"] = "raw",
    eps: float = 1e-4,
) -> dict[str, Tensor]:
    """Full-space (unprojected) hyperspherical energy of each layer of a model, without gradient.

    A layer's energy is the mean, over its neuron sets (one per conv group, three for a fused ``qkv``, ...), of
    :func:`~lightning_comhe.hyperspherical_energy` of the set: the same per-layer quantity as the ``energies`` of
    :class:`~lightning_comhe.regularizer.CoMHERegularizer` with ``variant="mhe"`` (or ``"half_mhe"`` for
    ``half_space=True``), and the ``comhe/energy/<layer>`` values the callback logs for those variants.

    Args:
        model: A model (its layers are found with :func:`~lightning_comhe.discovery.discover_layers`), or an
            already discovered selection / list of layers (``include``, ``exclude``, ``head`` and ``grouped`` are
            then ignored).
        power: ``0``, a float ``> 0``, or ``"0" "1" "2" "a0" "a1" "a2"``.
        half_space: Energy of :math:`[W; -W]` instead of :math:`W`.
        angular: Angular instead of chordal distance (implied by the ``"a"`` powers).
        include: Regex(es) over module names; only matching layers are measured.
        exclude: Regex(es) over module names of layers to leave out.
        head: Classifier module name, ``"auto"`` or ``None`` (only affects which layers are skipped, e.g. a one-output
            head).
        grouped: ``"per_group"`` (one energy per conv group) or ``"skip"`` (leave grouped convs out).
        std_conv: ``"raw"`` or ``"standardized"`` weight of timm weight-standardized convs.
        eps: The constant inside the norms.

    Returns:
        ``{layer name: 0-dim energy}`` in ``named_modules()`` order (float32, float64 for float64 weights).

    Raises:
        ValueError: If no layer is selected or an argument is invalid.

    Example::

        >>> model = nn.Sequential(nn.Linear(3, 3, bias=False))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.eye(3))
        >>> {k: round(v.item(), 4) for k, v in layer_energies(model).items()}
        {'0': 0.5}
    """
    energy, selection = _configs(power, half_space, angular, include, exclude, head, grouped, std_conv, eps)
    if isinstance(model, nn.Module):
        layers: Sequence[NeuronLayer] = discover_layers(model, **selection.discovery_kwargs()).layers
    elif isinstance(model, LayerSelection):
        layers = model.layers
    else:
        layers = list(model)
    kw = {"half_space": half_space, "angular": energy.is_angular, "eps": energy.eps}
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for layer in layers:
            per_set = [hyperspherical_energy(t.detach(), energy.s, **kw) for t in layer.neuron_sets()]
            out[layer.name] = torch.cat(per_set).mean()
    return out


class HypersphericalEnergy(Metric):
    r"""Full-space hyperspherical energy of a model's layers, per layer and in total.

    ``update(model)`` measures the energy of every selected layer (see :func:`layer_energies`: the mean over the
    layer's neuron sets of the unprojected energy, computed without gradient). ``compute()`` returns a dict
    ``{"total": Σ_layers energy, "<layer name>": energy, ...}``.

    **Several updates** (e.g. one per validation epoch) are averaged: ``compute()`` gives, per layer, the mean energy
    over all updates since the last ``reset()``. Use ``metric(model)`` (``forward``) to get the energy of the model
    *now* while still accumulating, or ``reset()`` before each ``update`` to track only the latest state. Every
    update must see the same layers (same names); a model with other layers raises a ``ValueError``.

    **Distributed** (DDP, FSDP2): the weights are replicated, so every process measures the same energy and the
    synchronized result equals the single-process one (it is never multiplied by the world size). Each update stores
    one row of per-layer energies in a list state reduced with ``"cat"``; ``compute`` averages the rows of all
    processes. If processes hold different weights, the result is their mean. Call ``update`` on every process.

    Args:
        power: ``0``, a float ``> 0``, or ``"0" "1" "2" "a0" "a1" "a2"`` (official strings).
        half_space: Measure half-space MHE (the energy of :math:`[W; -W]`) instead of full-space MHE.
        angular: Use the angular distance (implied by the ``"a"`` powers).
        include: Regex(es) over module names; only matching layers are measured.
        exclude: Regex(es) over module names of layers to leave out.
        head: Classifier module name, ``"auto"`` or ``None`` (see :func:`~lightning_comhe.discovery.discover_layers`).
        grouped: ``"per_group"`` or ``"skip"`` for grouped and depthwise convs.
        std_conv: ``"raw"`` or ``"standardized"`` weight of timm weight-standardized convs.
        eps: The constant inside the norms.
        kwargs: Standard torchmetrics ``Metric`` arguments (``sync_on_compute``, ``process_group``, ...).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> metric = HypersphericalEnergy()
        >>> metric.update(model)
        >>> sorted(metric.compute())
        ['0', '2', 'total']
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = None

    energies: list[Tensor]

    def __init__(
        self,
        power: PowerLike = 2,
        half_space: bool = False,
        angular: bool = False,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        head: str | Sequence[str] | None = "auto",
        grouped: Literal["per_group", "skip"] = "per_group",
        std_conv: Literal["raw", "standardized"] = "raw",
        eps: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _configs(power, half_space, angular, include, exclude, head, grouped, std_conv, eps)  # validates
        self.power = power
        self.half_space = half_space
        self.angular = angular
        self.include = include
        self.exclude = exclude
        self.head = head
        self.grouped = grouped
        self.std_conv = std_conv
        self.eps = float(eps)
        self.layer_names: list[str] | None = None
        self.add_state("energies", default=[], dist_reduce_fx="cat")

    def update(self, model: nn.Module) -> None:  # type: ignore[override]
        """Measure the energy of ``model``'s selected layers.

        Args:
            model: The model (any ``nn.Module``; a LightningModule's layers are named ``model.<...>`` etc.).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be a torch.nn.Module but got {type(model).__name__}.")
        values = layer_energies(
            model,
            self.power,
            half_space=self.half_space,
            angular=self.angular,
            include=self.include,
            exclude=self.exclude,
            head=self.head,
            grouped=self.grouped,
            std_conv=self.std_conv,
            eps=self.eps,
        )
        names = list(values)
        if not self.energies:  # first update since construction / reset()
            if "total" in names:
                raise ValueError("A layer named 'total' clashes with the 'total' key of HypersphericalEnergy.")
            self.layer_names = names
        elif names != self.layer_names:
            raise ValueError(
                f"HypersphericalEnergy.update() saw {len(names)} layers, but earlier updates saw "
                f"{len(self.layer_names or [])} other ones; reset() the metric before measuring another model."
            )
        dtype = torch.float64 if any(v.dtype == torch.float64 for v in values.values()) else torch.float32
        row = torch.stack([values[n].to(device=self.device, dtype=dtype) for n in names])
        self.energies.append(row.unsqueeze(0))

    def compute(self) -> dict[str, Tensor]:
        """``{"total": ..., "<layer>": ...}``: per-layer energies averaged over updates, and their sum."""
        if self.layer_names is None or (isinstance(self.energies, list) and not self.energies):
            return {"total": torch.tensor(float("nan"), device=self.device)}
        rows = dim_zero_cat(self.energies)
        mean = rows.reshape(-1, len(self.layer_names)).mean(dim=0)
        out = {"total": mean.sum()}
        out.update({name: mean[i] for i, name in enumerate(self.layer_names)})
        return out

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Plot the computed energies (torchmetrics' standard ``plot``; needs matplotlib).

        Args:
            val: A result of :meth:`compute` or ``forward`` (or a list of them); ``None``: :meth:`compute`.
            ax: A matplotlib axis to draw on.

        Returns:
            ``(figure, axis)``.
        """
        return self._plot(val, ax)
