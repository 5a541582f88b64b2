"""Layer discovery's head rule: which candidate layers are the classifier (``role="head"``).

``head="auto"`` (:func:`auto_heads`, public as :func:`lightning_comhe.discovery.find_heads`): every *outermost*
timm-style model (a module with a callable ``get_classifier()``, not inside another one: the root, or e.g. the
``self.model`` of a ``LightningModule``; several when models sit side by side) contributes the module(s) its
``get_classifier()`` returns, else its ``pretrained_cfg["classifier"]`` name(s). A headless timm model
(``num_classes=0``: ``get_classifier()`` is ``nn.Identity``) contributes none. Without any timm-style module the
head is the last ``nn.Linear``. A named head (:func:`named_heads`) must be a module of the model; a container
resolves to the last candidate inside it (e.g. LeViT's ``NormLinear``). LoRA adapters (``lora_A`` / ``lora_B``,
:func:`~lightning_comhe._walk.is_lora`) are never a head: they are left out of the candidates every rule here
looks at (:func:`eligible`), so a LoRA-wrapped classifier resolves to its ``base_layer``.

Example::

    >>> from torch import nn
    >>> from lightning_comhe._walk import candidates
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 3)))
    >>> auto_heads(model, candidates(model)), named_heads("1", model, candidates(model))
    (['1.1'], ['1.1'])
    >>> model.lora_B = nn.ModuleDict({"default": nn.Linear(2, 3)})  # peft style: never the head
    >>> auto_heads(model, candidates(model))
    ['1.1']
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from torch import nn

from lightning_comhe._walk import Candidate, is_lora, is_under

__all__ = ["auto_heads", "eligible", "named_heads", "resolve"]

Candidates = list[Candidate]


def eligible(candidates: Candidates) -> Candidates:
    """The candidates that may be a head: all but LoRA adapters."""
    return [c for c in candidates if not is_lora(c.name)]


def resolve(name: str, modules: dict[str, nn.Module], candidates: Candidates) -> str | None:
    """The candidate named ``name``, else the last candidate inside it (``head`` -> ``head.fc``), else ``None``."""
    if name not in modules:
        return None
    inside = [c.name for c in eligible(candidates) if c.name == name or is_under(c.name, name)]
    if name in inside:
        return name
    return inside[-1] if inside else None


def _outermost_roots(modules: dict[str, nn.Module]) -> list[str]:
    roots: list[str] = []
    for name, module in modules.items():
        if callable(getattr(module, "get_classifier", None)) and not any(is_under(name, r) for r in roots):
            roots.append(name)
    return roots


def _root_heads(
    root: str, modules: dict[str, nn.Module], names_by_id: dict[int, str], candidates: Candidates
) -> list[str]:
    found: list[str] = []
    try:
        classifier = modules[root].get_classifier()
    except (AttributeError, TypeError, NotImplementedError):
        classifier = None
    items = classifier if isinstance(classifier, (tuple, list)) else [classifier]
    for item in items:
        if isinstance(item, nn.Module) and id(item) in names_by_id:
            resolved = resolve(names_by_id[id(item)], modules, candidates)
            if resolved is not None:
                found.append(resolved)
    if found:
        return found
    cfg = getattr(modules[root], "pretrained_cfg", None) or getattr(modules[root], "default_cfg", None)
    cfg_names = cfg.get("classifier") if isinstance(cfg, dict) else None
    cfg_names = [cfg_names] if isinstance(cfg_names, str) else list(cfg_names or [])
    for cfg_name in cfg_names:
        resolved = resolve(f"{root}.{cfg_name}" if root else cfg_name, modules, candidates)
        if resolved is not None:
            found.append(resolved)
    return found


def auto_heads(model: nn.Module, candidates: Candidates) -> list[str]:
    """The head layers of the ``head="auto"`` rule (see the module docstring), given the model's candidates."""
    modules = dict(model.named_modules())
    roots = _outermost_roots(modules)
    if not roots:
        linears = [c.name for c in eligible(candidates) if isinstance(c.module, nn.Linear)]
        return linears[-1:]
    names_by_id = {id(m): n for n, m in modules.items()}
    heads: list[str] = []
    for root in roots:
        heads.extend(n for n in _root_heads(root, modules, names_by_id, candidates) if n not in heads)
    return heads


def named_heads(head: str | Sequence[str], model: nn.Module, candidates: Candidates) -> list[str]:
    """Resolve the (already validated) head name(s) to candidate layers.

    Raises:
        ValueError: If a name is no module of the model (with close names), or a module without a candidate inside.
    """
    names = [head] if isinstance(head, str) else list(head)
    modules = dict(model.named_modules())
    heads = []
    for name in names:
        if name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
            hint = f" Close names: {', '.join(close)}." if close else ""
            raise ValueError(f"`head` must name a module of the model, got {name!r}.{hint}")
        if is_lora(name):
            raise ValueError(f"`head` must not name a LoRA adapter (lora_A / lora_B), got {name!r}.")
        resolved = resolve(name, modules, candidates)
        if resolved is None:
            raise ValueError(
                "`head` must name a module with a weight matrix CoMHE can regularize, "
                f"got {name!r} ({type(modules[name]).__name__})."
            )
        heads.append(resolved)
    return heads
