"""The layers a regularizer reads, stacked into groups, and kept in step with the model. Pure PyTorch.

:class:`TrackedLayers` runs layer discovery (:func:`~lightning_comhe.discovery.discover_layers`) and the grouping of
the energy family (:func:`~lightning_comhe.energies.build_groups`), and remembers the model's parameter list and
``requires_grad`` flags at that moment. :meth:`TrackedLayers.changed` compares them with the model's current ones (one
pass over the parameters, no tensor work), so a caller can follow fine-tuning schedules and changed module trees
cheaply: discovery runs again only when something changed.
"""

import torch
from torch import Tensor, nn

from lightning_comhe.config import SelectionConfig
from lightning_comhe.discovery import LayerSelection, discover_layers
from lightning_comhe.energies import EnergyFamily, Group, build_groups

__all__ = ["TrackedLayers"]


class TrackedLayers:
    """The selected layers of ``model``, their groups, and the model state they were selected from.

    Args:
        model: The model (only a reference is kept).
        selection: Which layers (include / exclude / head / grouped / std_conv).
        family: The energy family, which routes each set to a group (tag, mode, κ).
        allow_empty: Accept a selection without layers (else :func:`discover_layers` raises).

    Example::

        >>> from lightning_comhe.config import EnergyConfig
        >>> from lightning_comhe.energies import build_energy
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
        >>> layers = TrackedLayers(model, SelectionConfig(), build_energy(EnergyConfig(variant="mhe")))
        >>> layers.selection.names, layers.changed()
        (['0', '1'], False)
        >>> model[0].requires_grad_(False)  # doctest: +ELLIPSIS
        Linear(...)
        >>> layers.changed()
        True
    """

    def __init__(
        self, model: nn.Module, selection: SelectionConfig, family: EnergyFamily, allow_empty: bool = False
    ) -> None:
        self._model = model
        self._config = selection
        self._family = family
        self.rebuild(allow_empty)

    def rebuild(self, allow_empty: bool = True) -> None:
        """Select the layers and build the groups again, from the model as it is now."""
        params = list(self._model.parameters())
        self._params, self._flags = params, [p.requires_grad for p in params]
        kwargs = self._config.discovery_kwargs()
        self.selection: LayerSelection = discover_layers(self._model, **kwargs, allow_empty=allow_empty)
        self._by_name = {layer.name: layer for layer in self.selection.layers}
        self.groups: tuple[Group, ...] = build_groups(self.selection.layers, self._family)
        #: How many neuron sets each layer has over all its groups (a layer's mean energy divides by it).
        self.layer_sets: dict[str, int] = {}
        for group in self.groups:
            for m in group.members:
                self.layer_sets[m.layer] = self.layer_sets.get(m.layer, 0) + m.num_sets

    def changed(self) -> bool:
        """Whether a parameter was added, removed or replaced, or a ``requires_grad`` flipped, since the selection."""
        params = list(self._model.parameters())
        if len(params) != len(self._params) or any(a is not b for a, b in zip(params, self._params, strict=True)):
            return True
        return [p.requires_grad for p in params] != self._flags

    def group_neurons(self, group: Group, cache: dict[str, list[Tensor]] | None = None) -> Tensor:
        """The current ``(G, N, d)`` neurons of ``group`` (differentiable); ``cache`` shares layer extractions."""
        cache = {} if cache is None else cache
        parts = []
        for m in group.members:
            if m.layer not in cache:
                cache[m.layer] = self._by_name[m.layer].neuron_sets()
            parts.append(cache[m.layer][m.tensor_index])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def parameters(self, group: Group | None = None) -> list[Tensor]:
        """The distinct tensors the neurons are read from (weights, or their direction parameters), in layer order.

        With ``group``: those of its layers only.
        """
        layers = (
            self.selection.layers
            if group is None
            else [self._by_name[n] for n in dict.fromkeys(m.layer for m in group.members)]
        )
        seen: dict[int, Tensor] = {}
        for layer in layers:
            for t in layer.weights():
                seen.setdefault(id(t), t)
        return list(seen.values())
