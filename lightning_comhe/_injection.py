r"""Adding a penalty's gradient to the backward pass of a loss, without touching the loss. Pure PyTorch.

``loss.add_(penalty)`` is the obvious way for a hook that only receives the loss, and it is wrong in general: the
in-place add bumps the loss's version, so a backward whose last op saved its output (``sqrt``, ``exp``, ``sigmoid``,
``tanh``, ``norm``, ``logsumexp``: RMSE is the common case) raises, and where it does not raise the mutated value
would make it wrong; it also changes the user's own tensor. :class:`GradientInjection` instead

1. computes :math:`g_p = \nabla_p R` of the penalty ``R`` for the parameters it reaches (``torch.autograd.grad``:
   this runs the penalty's part of the backward early, fires no ``AccumulateGrad`` hook, so DDP's reducer and
   ZeRO's gradient hooks never see it as a separate backward);
2. registers a hook on the loss, which records the gradient :math:`c = \partial \mathcal{L} / \partial \text{loss}`
   that the backward pass delivers to it (``1`` for ``loss.backward()``, the loss scale or ``1/A`` of a strategy
   that scales the loss after the hook, e.g. DeepSpeed);
3. registers a hook on each reached parameter that returns :math:`\text{grad} + c\, g_p` as the gradient flows into
   it. Gradient all-reduces (DDP), accumulation buffers (ZeRO) and clipping then see task and penalty together.

A parameter the task's backward does not reach (a layer unused by this loss, or an FSDP2 shard whose gradient the
strategy writes itself) gets :math:`c\, g_p` added to ``.grad`` by :meth:`GradientInjection.finish`, right after
the backward. The result is exactly :math:`\nabla(\text{loss} + R)` (times the strategy's own factor ``c``),
whatever the last op of the loss.

Example::

    >>> import torch
    >>> w = torch.tensor([3.0, 4.0], requires_grad=True)
    >>> loss = w.pow(2).sum().sqrt()  # sqrt saves its output: `loss.add_` would break this backward
    >>> inj = GradientInjection()
    >>> inj.arm(loss, 0.5 * w.pow(2).sum(), [w])
    >>> loss.backward()
    >>> inj.finish()
    >>> w.grad  # w / |w| + w
    tensor([3.6000, 4.8000])
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["Delivery", "GradientInjection"]

#: A gradient given as a function of the parameter's incoming gradient, which returns the addend.
Delivery = Callable[[Tensor], Tensor]


class GradientInjection:
    """One armed penalty at a time: :meth:`arm` before the loss's backward, :meth:`finish` after it."""

    def __init__(self) -> None:
        self._pending: dict[int, tuple[Tensor, Tensor | Delivery]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._scale: Tensor | None = None

    @property
    def armed(self) -> bool:
        """Whether a penalty waits for its backward pass."""
        return bool(self._handles) or bool(self._pending)

    def arm(self, loss: Tensor, penalty: Tensor, params: Sequence[Tensor], materialize: bool = False) -> None:
        """Compute the penalty's gradient now and deliver it during ``loss``'s coming backward pass.

        Args:
            loss: The tensor the backward pass starts from, or one it passes through (a scalar that requires grad).
            penalty: The scalar penalty, differentiable with respect to some of ``params``.
            params: The leaf tensors that may receive the penalty's gradient (the others are ignored).
            materialize: Deliver a (zero) gradient to every one of ``params`` that requires grad, even those the
                penalty does not reach: ranks that compute different shares of a penalty then hold the same
                pending set, so :meth:`finish` can all-reduce it.

        Raises:
            ValueError: If ``loss`` does not require grad (no backward can pass through it).
        """
        self.cancel()
        if not loss.requires_grad:
            raise ValueError(
                "`loss` must require grad to carry the CoMHE penalty into its backward pass, got a tensor with "
                "requires_grad=False."
            )
        params = [p for p in params if p.requires_grad]
        if penalty.requires_grad:
            grads = list(torch.autograd.grad(penalty, params, allow_unused=True))
        else:
            grads = [None] * len(params)
        if materialize:
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        self.arm_gradients(loss, [(p, g) for p, g in zip(params, grads, strict=True) if g is not None])

    def arm_gradients(self, loss: Tensor, gradients: Sequence[tuple[Tensor, Tensor | Delivery]]) -> None:
        """Deliver already computed ``(parameter, gradient)`` pairs during ``loss``'s coming backward pass.

        :meth:`arm` computes the pairs itself; a penalty read from sharded weights brings its reduced ones
        (:class:`lightning_comhe._gathered.GatheredWeights`). A gradient may be a :data:`Delivery` instead: a
        function of the parameter's incoming gradient that returns the addend (a ZeRO-3 partition's slice, placed
        in the full gradient); it can only be delivered by the backward pass.

        Raises:
            ValueError: If ``loss`` does not require grad.
        """
        self.cancel()
        if not loss.requires_grad:
            raise ValueError(
                "`loss` must require grad to carry the CoMHE penalty into its backward pass, got a tensor with "
                "requires_grad=False."
            )
        self._pending = {id(p): (p, g) for p, g in gradients}
        self._handles.append(loss.register_hook(self._record_scale))
        for p, g in self._pending.values():
            self._handles.append(p.register_hook(self._adder(p, g)))

    def _record_scale(self, grad: Tensor) -> None:
        self._scale = grad.detach()

    def _factor(self, like: Tensor) -> Tensor | float:
        if self._scale is None:
            return 1.0
        return self._scale.to(device=like.device, dtype=like.dtype)

    def _adder(self, p: Tensor, g: Tensor | Delivery):  # noqa: ANN202 - a hook closure
        def hook(grad: Tensor) -> Tensor:
            self._pending.pop(id(p), None)
            addend = g(grad) if callable(g) else g
            return grad + (self._factor(grad) * addend).to(grad.dtype)

        return hook

    def finish(self, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """After the backward pass: add what no hook delivered to ``.grad``, and remove the hooks.

        Args:
            reduce: Applied to each undelivered gradient first, in the same order on every rank (e.g. the
                all-reduce that a sharded penalty needs where the strategy's own gradient all-reduce is over).
        """
        for p, g in self._pending.values():
            if callable(g) or p.shape != g.shape:  # a ZeRO-3 placeholder: its gradient lives in the partitions
                self.cancel()
                raise RuntimeError(
                    f"The CoMHE penalty's gradient{'' if callable(g) else f' of shape {tuple(g.shape)}'} could not "
                    "be delivered: the parameter "
                    f"(shape {tuple(p.shape)}) was not reached by the loss's backward pass, and its gradient is kept "
                    "by the strategy (DeepSpeed ZeRO-3). HINT: regularize only layers that the loss uses "
                    "(`CoMHE(exclude=...)`), or use ZeRO stage 1 or 2."
                )
            if reduce is not None:
                g = reduce(g)
            extra = self._factor(g) * g
            if p.grad is None:
                p.grad = extra.to(p.dtype).clone()
            else:
                p.grad.add_(extra.to(p.grad.dtype))
        self.cancel()

    def cancel(self) -> None:
        """Drop an armed penalty (and its hooks) without delivering it."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending = {}
        self._scale = None
