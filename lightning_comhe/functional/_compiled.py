"""Optional ``torch.compile`` path of the fused energy kernel.

The eager kernel (:mod:`lightning_comhe.functional.energy`) spends its time in the Gram matmuls and in a few
elementwise passes over each Gram tile. Compiling the per-tile work lets the compiler (TorchInductor: C++/OpenMP on
CPU, Triton on GPU) fuse the elementwise work, the eps floor (always applied, so no host synchronisation) and the
triangle mask into one pass per tile. The tile loop itself stays in Python, like in the eager kernel.

It is opt-in: ``backend="compiled"``, or the environment variable ``LIGHTNING_COMHE_COMPILE=1`` for
``backend="auto"``. When ``torch.compile`` is unavailable or fails (no C++ compiler, an unsupported platform), the
kernel falls back to the eager path with one warning. Values equal the eager path to rounding (tested on CPU).
"""

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["compile_failed", "compile_requested", "compiled_tile_fns", "run_or_fallback"]

_ENV = "LIGHTNING_COMHE_COMPILE"
_CACHE: dict[tuple, tuple[Callable, Callable]] = {}
_FAILED: list[str] = []  # the first failure message; once set, the compiled path is not tried again


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
    from lightning_comhe.functional import energy as E  # the reference formulas (circular import at call time)

    def tile_sum(ub: Tensor, qb: Tensor, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """Σ over the pairs i < j of the tile ``[r0, r1) × [c0, c1)`` of the terms, per set: (B,)."""
        ur, uc = ub[:, r0:r1], ub[:, c0:c1]
        c = torch.bmm(ur, uc.transpose(1, 2))
        b = qb[:, r0:r1, None] + qb[:, None, c0:c1]
        terms = E._reference_terms(c, b, s, angular, half_space, eps)
        i = torch.arange(r0, r1, device=ub.device)[:, None]
        j = torch.arange(c0, c1, device=ub.device)[None, :]
        return torch.where(j > i, terms, 0.0).sum(dim=(1, 2))

    def tile_sum_and_grad(ub: Tensor, qb: Tensor, r0: int, r1: int, c0: int, c1: int) -> tuple[Tensor, Tensor, Tensor]:
        """The tile's sum and its row and column gradient contributions ``(W U_cols, Wᵀ U_rows)``."""
        ur, uc = ub[:, r0:r1], ub[:, c0:c1]
        c = torch.bmm(ur, uc.transpose(1, 2))
        b = qb[:, r0:r1, None] + qb[:, None, c0:c1]
        terms, dterm = E._reference_terms_and_grad(c, b, s, angular, half_space, eps, True)
        i = torch.arange(r0, r1, device=ub.device)[:, None]
        j = torch.arange(c0, c1, device=ub.device)[None, :]
        keep = j > i
        w = torch.where(keep, dterm, 0.0)
        total = torch.where(keep, terms, 0.0).sum(dim=(1, 2))
        return total, torch.bmm(w, uc), torch.bmm(w.transpose(1, 2), ur)

    # Dynamo caches compiled graphs per code object; give every variant its own code object, so that variants do not
    # share (and exhaust) one recompilation budget.
    tag = f"{int(s * 1000)}_{int(angular)}{int(half_space)}_{abs(hash((s, angular, half_space, eps))) % 10**8}"
    tile_sum.__code__ = tile_sum.__code__.replace(co_name=f"tile_sum_{tag}")
    tile_sum_and_grad.__code__ = tile_sum_and_grad.__code__.replace(co_name=f"tile_sum_and_grad_{tag}")
    return tile_sum, tile_sum_and_grad


#: Recompilations allowed per tile function: tiles specialise on edge cases (first row block, a single set, ...) and a
#: model has several set shapes, which exceeds Dynamo's default of 8.
_RECOMPILE_LIMIT = 64


def _raise_recompile_limit() -> None:
    """Raise Dynamo's per-function recompile limit to ``_RECOMPILE_LIMIT`` (never lowers it)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < _RECOMPILE_LIMIT:
            setattr(cfg, name, _RECOMPILE_LIMIT)


def compiled_tile_fns(s: float, angular: bool, half_space: bool, eps: float) -> tuple[Callable, Callable] | None:
    """The compiled ``(tile_sum, tile_sum_and_grad)`` of one energy variant, or ``None`` if compilation is unavailable.

    Shapes are dynamic, so every tile of every problem size reuses one compiled graph per variant.
    """
    if _FAILED:
        return None
    key = (float(s), bool(angular), bool(half_space), float(eps))
    if key not in _CACHE:
        try:
            _raise_recompile_limit()
            fwd, bwd = _tile_fns(*key)
            _CACHE[key] = (
                torch.compile(fwd, dynamic=True, fullgraph=True),
                torch.compile(bwd, dynamic=True, fullgraph=True),
            )
        except Exception as err:  # noqa: BLE001 - any failure means: use the eager kernel
            _disable(err)
            return None
    return _CACHE[key]


def run_or_fallback(compiled: Callable[[], Any], eager: Callable[[], Any]) -> Any:
    """``compiled()``; if it raises (a compilation failure), disable the compiled path and return ``eager()``."""
    try:
        return compiled()
    except Exception as err:  # noqa: BLE001 - e.g. torch._dynamo.exc.BackendCompilerFailed, missing C++ compiler
        _disable(err)
        return eager()
