"""Optional ``torch.compile`` path of the fused energy kernel.

The eager kernel (:mod:`lightning_comhe.functional._tiled`) spends its time in the Gram matmuls and in a few
elementwise passes over each Gram tile. Compiling the per-tile work lets the compiler (TorchInductor: C++/OpenMP on
CPU, Triton on GPU) fuse the elementwise work, the eps floor (always applied, so no host synchronisation) and the
triangle mask into one pass per tile. The tile loop itself stays in Python, like in the eager kernel. The per-tile
work is the reference formula of :mod:`lightning_comhe.functional._pairwise`.

It is opt-in: ``backend="compiled"``, or the environment variable ``LIGHTNING_COMHE_COMPILE=1`` for
``backend="auto"``. When ``torch.compile`` is unavailable or fails (no C++ compiler, an unsupported platform), the
kernel falls back to the eager path with one warning. Values equal the eager path to rounding (tested on CPU).

Dynamo settings: tiles specialise on edge cases (the first row block, a single set, ...) and a model has several
set shapes, which exceeds Dynamo's default of 8 recompilations per function. This module never changes a
process-wide Dynamo setting:

* where ``torch.compile`` takes ``recompile_limit`` and ``isolate_recompiles`` (PyTorch 2.14), each compiled tile
  function gets its own limit of ``_RECOMPILE_LIMIT`` recompilations and its own cache entries (one per energy
  variant), as options of that ``torch.compile`` call only;
* on older PyTorch, :func:`recompile_limit_scope` raises ``torch._dynamo.config.recompile_limit`` (or
  ``cache_size_limit``) to ``_RECOMPILE_LIMIT`` with ``torch._dynamo.config.patch`` only while the compiled tiles run
  (inside :func:`run_or_fallback`), and restores it on exit; there the variants share that budget. A limit that is
  already higher is left as it is.
"""

import contextlib
import inspect
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_comhe.functional._pairwise import reference_terms, reference_terms_and_grad

__all__ = ["compile_failed", "compile_requested", "compiled_tile_fns", "recompile_limit_scope", "run_or_fallback"]

_ENV = "LIGHTNING_COMHE_COMPILE"
_CACHE: dict[tuple, tuple[Callable, Callable]] = {}
_FAILED: list[str] = []  # the first failure message; once set, the compiled path is not tried again

#: Recompilations allowed per tile function (see the module docstring).
_RECOMPILE_LIMIT = 64

#: Whether ``torch.compile`` takes the per-call ``recompile_limit`` and ``isolate_recompiles`` options.
_PER_CALL_LIMITS = {"recompile_limit", "isolate_recompiles"} <= set(inspect.signature(torch.compile).parameters)


def compile_requested() -> bool:
    """Whether ``LIGHTNING_COMHE_COMPILE`` asks ``backend="auto"`` to use the compiled kernel."""
    return os.environ.get(_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def compile_failed() -> str | None:
    """The reason the compiled path was disabled in this process, or ``None``."""
    return _FAILED[0] if _FAILED else None


def _disable(err: BaseException) -> None:
    if not _FAILED:
        _FAILED.append(f"{type(err).__name__}: {err}")
        warnings.warn(
            "lightning_comhe: torch.compile of the energy kernel failed, falling back to the eager kernel "
            f"({_FAILED[0][:300]}).",
            RuntimeWarning,
            stacklevel=4,
        )


def _tile_fns(s: float, angular: bool, half_space: bool, eps: float) -> tuple[Callable, Callable]:
    def tile_sum(ub: Tensor, qb: Tensor, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """Σ over the pairs i < j of the tile ``[r0, r1) × [c0, c1)`` of the terms, per set: (B,)."""
        ur, uc = ub[:, r0:r1], ub[:, c0:c1]
        c = torch.bmm(ur, uc.transpose(1, 2))
        b = qb[:, r0:r1, None] + qb[:, None, c0:c1]
        terms = reference_terms(c, b, s, angular, half_space, eps)
        i = torch.arange(r0, r1, device=ub.device)[:, None]
        j = torch.arange(c0, c1, device=ub.device)[None, :]
        return torch.where(j > i, terms, 0.0).sum(dim=(1, 2))

    def tile_sum_and_grad(ub: Tensor, qb: Tensor, r0: int, r1: int, c0: int, c1: int) -> tuple[Tensor, Tensor, Tensor]:
        """The tile's sum and its row and column gradient contributions ``(W U_cols, Wᵀ U_rows)``."""
        ur, uc = ub[:, r0:r1], ub[:, c0:c1]
        c = torch.bmm(ur, uc.transpose(1, 2))
        b = qb[:, r0:r1, None] + qb[:, None, c0:c1]
        terms, dterm = reference_terms_and_grad(c, b, s, angular, half_space, eps, True)
        i = torch.arange(r0, r1, device=ub.device)[:, None]
        j = torch.arange(c0, c1, device=ub.device)[None, :]
        keep = j > i
        w = torch.where(keep, dterm, 0.0)
        total = torch.where(keep, terms, 0.0).sum(dim=(1, 2))
        return total, torch.bmm(w, uc), torch.bmm(w.transpose(1, 2), ur)

    return tile_sum, tile_sum_and_grad


def _compile(fn: Callable) -> Callable:
    """``torch.compile`` of one tile function: dynamic shapes, one graph, and its own recompile budget if possible."""
    options: dict[str, Any] = {"dynamic": True, "fullgraph": True}
    if _PER_CALL_LIMITS:
        options.update(recompile_limit=_RECOMPILE_LIMIT, isolate_recompiles=True)
    return torch.compile(fn, **options)


def recompile_limit_scope() -> contextlib.AbstractContextManager:
    """A context in which Dynamo allows ``_RECOMPILE_LIMIT`` recompilations per function, restored on exit.

    A no-op where ``torch.compile`` takes a per-call limit (the tile functions carry their own), where the global
    limit is already at least as high, and inside a function that Dynamo is tracing.
    """
    if _PER_CALL_LIMITS or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    import torch._dynamo as dynamo  # lazily: importing Dynamo is slow, and only the compiled path needs it

    cfg = dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) >= _RECOMPILE_LIMIT:
        return contextlib.nullcontext()
    return cfg.patch(**{name: _RECOMPILE_LIMIT})


def compiled_tile_fns(s: float, angular: bool, half_space: bool, eps: float) -> tuple[Callable, Callable] | None:
    """The compiled ``(tile_sum, tile_sum_and_grad)`` of one energy variant, or ``None`` if compilation is unavailable.

    Shapes are dynamic, so every tile of every problem size reuses one compiled graph per variant. Call them inside
    :func:`run_or_fallback` (which applies :func:`recompile_limit_scope`).
    """
    if _FAILED:
        return None
    key = (float(s), bool(angular), bool(half_space), float(eps))
    if key not in _CACHE:
        try:
            fwd, bwd = _tile_fns(*key)
            _CACHE[key] = (_compile(fwd), _compile(bwd))
        except Exception as err:  # noqa: BLE001 - any failure means: use the eager kernel
            _disable(err)
            return None
    return _CACHE[key]


def run_or_fallback(compiled: Callable[[], Any], eager: Callable[[], Any]) -> Any:
    """``compiled()`` within :func:`recompile_limit_scope`; if it raises, disable the compiled path, run ``eager()``."""
    try:
        with recompile_limit_scope():
            return compiled()
    except Exception as err:  # noqa: BLE001 - e.g. torch._dynamo.exc.BackendCompilerFailed, missing C++ compiler
        _disable(err)
        return eager()
