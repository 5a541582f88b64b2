"""Paired comparisons of the experiments: the two-sided Wilcoxon signed-rank test and Holm's correction.

Two rows of a table are compared on the same seeds (same training subset, initialization and batch order), so each
seed gives one paired difference. :func:`paired` summarizes the differences and tests them; :func:`holm` corrects
a family of p-values for multiple comparisons (step-down, family-wise error rate).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from experiments.publishing import mean_std


@dataclass(frozen=True)
class Paired:
    """Paired differences ``treated - base`` and their tests.

    Attributes:
        mean: Mean difference.
        std: Sample standard deviation of the differences.
        n: Number of pairs.
        wilcoxon_p: Two-sided Wilcoxon signed-rank p-value (zero differences dropped, ``scipy``'s ``"wilcox"``
            method; normal approximation with tie correction when there are ties). 1.0 when every difference is 0,
            NaN with fewer than 2 pairs.
        t_p: Two-sided paired t-test p-value (NaN when undefined).
    """

    mean: float
    std: float
    n: int
    wilcoxon_p: float
    t_p: float


def paired(treated: Sequence[float], base: Sequence[float]) -> Paired:
    """Compare ``treated`` with ``base`` pair by pair (same order: the same seeds).

    Args:
        treated: One value per seed.
        base: The reference, one value per seed.

    Raises:
        ValueError: When the lengths differ.

    Example::

        >>> r = paired([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
        >>> r.mean, r.n, round(r.wilcoxon_p, 4)
        (-1.0, 6, 0.0312)
    """
    if len(treated) != len(base):
        raise ValueError(f"`treated` and `base` must pair up, got {len(treated)} and {len(base)} values.")
    diffs = [a - b for a, b in zip(treated, base, strict=True)]
    mean, std = mean_std(diffs)
    n = len(diffs)
    if n < 2:
        return Paired(mean, std, n, float("nan"), float("nan"))
    from scipy import stats

    if all(d == 0 for d in diffs):
        return Paired(mean, std, n, 1.0, float("nan"))
    wilcoxon_p = float(stats.wilcoxon(diffs, zero_method="wilcox", alternative="two-sided").pvalue)
    t_p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if std > 0 else float("nan")
    return Paired(mean, std, n, wilcoxon_p, t_p)


def holm(pvalues: Sequence[float]) -> list[float]:
    r"""Holm's step-down adjusted p-values (NaN entries stay NaN and do not count in the family).

    With the ``m`` finite p-values sorted, :math:`p_{(1)} \le \dots \le p_{(m)}`, the adjusted value of the ``i``-th
    is :math:`\max_{j \le i} \min(1, (m - j + 1) p_{(j)})`. Rejecting where the adjusted value is below α controls
    the family-wise error rate at α.

    Example::

        >>> [round(p, 3) for p in holm([0.01, 0.04, 0.03, float("nan")])]
        [0.03, 0.06, 0.06, nan]
    """
    finite = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(finite)
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
