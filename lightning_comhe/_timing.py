"""When the penalty is computed: which optimizer steps, which backward passes, and when projections refresh.

Plain Python over two integers per backward pass, the optimizer-step index and the batch index (the callback reads
them from Lightning, :mod:`lightning_comhe._strategy`):

* lazy regularization: only the steps ``step % every_n_steps == 0`` are penalized;
* the projections refresh once per penalized step, before its first backward pass (``last_refresh``, which a
  checkpoint restores);
* the penalty joins the **first** backward pass of a step: later micro-batches of an accumulation window and later
  ``manual_backward`` calls of the step get none;
* except a closure re-evaluated by the optimizer (LBFGS, SAM): a backward pass of the *same batch* after
  :meth:`PenaltyTiming.closure_evaluated` within the same step gets the penalty again. Another batch of the same
  step is a micro-batch (DeepSpeed calls the optimizer step on every micro-batch of its window).
"""

__all__ = ["PenaltyTiming"]


class PenaltyTiming:
    """The bookkeeping of one callback: see the module docstring.

    Example::

        >>> t = PenaltyTiming(every_n_steps=1)
        >>> t.penalize(step=0, batch=0), t.penalize(step=0, batch=1)  # two micro-batches of step 0
        (True, False)
        >>> t.closure_evaluated(step=0, batch=1)
        >>> t.penalize(step=0, batch=1)  # LBFGS evaluates the closure of batch 1 again
        True
    """

    def __init__(self, every_n_steps: int = 1) -> None:
        self.every_n_steps = every_n_steps
        #: The step whose projections are current (checkpointed).
        self.last_refresh: int | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the runtime state (a new fit, or a restored checkpoint); ``last_refresh`` is the caller's."""
        self._penalized: int | None = None  # runtime only, never restored
        self._reevaluated = False
        self._closure_batch: int | None = None

    def due(self, step: int) -> bool:
        """Whether ``step`` is penalized at all (lazy regularization)."""
        return step % self.every_n_steps == 0

    def needs_refresh(self, step: int) -> bool:
        """Whether the projections must be refreshed for ``step`` (once per step); records that they will be."""
        if step == self.last_refresh:
            return False
        self.last_refresh = step
        return True

    def penalize(self, step: int, batch: int) -> bool:
        """Whether this backward pass gets the penalty; records it when it does."""
        if step == self._penalized and not (self._reevaluated and self._closure_batch == batch):
            return False
        self._penalized, self._reevaluated = step, False
        return True

    def closure_evaluated(self, step: int, batch: int) -> None:
        """After each closure evaluation (``on_before_optimizer_step``): another backward of ``batch`` re-evaluates."""
        self._reevaluated = self._penalized == step
        self._closure_batch = batch

    @property
    def factor(self) -> int:
        """The lazy-regularization weight of a penalized step (``every_n_steps``)."""
        return self.every_n_steps
