"""Statistics of an experiment across seeds: mean ± std, and paired tests of one variant against another.

Runs of two variants with the same seed share their data stream and initial state of everything but the
connector, so the comparison is paired by seed: the tests look at the per-seed differences. Two tests, since
five seeds are few: Student's paired t-test (assumes roughly normal differences) and the exact sign-flip
permutation test (assumes only that the sign of each difference is exchangeable under the null; with n seeds
its smallest two-sided p is 2 / 2**n, 0.0625 at n = 5, so at five seeds it can never reach 0.05).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from cmoe.errors import CMoEError


@dataclass(frozen=True)
class PairedTest:
    """`a` − `b` over `n` paired seeds: mean and sample std of the differences, the t statistic and its
    two-sided p, and the exact two-sided sign-flip p. `t`/`p_t` are None when every difference is equal."""

    n: int
    mean_diff: float
    std_diff: float
    t: float | None
    p_t: float | None
    p_sign_flip: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1) of the values present; (None, None) when none are, std 0.0
    for a single value."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else 0.0


def paired_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Paired comparison of `a` and `b` (same length, one pair per seed, at least 2 pairs)."""
    import numpy as np
    from scipy import stats

    if len(a) != len(b) or len(a) < 2:
        raise CMoEError(f"paired_test: expected two sequences of the same length >= 2, got {len(a)} and {len(b)}")
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = x - y
    n, mean = len(diff), float(diff.mean())
    std = float(diff.std(ddof=1))
    t = p_t = None
    if std > 0:
        result = stats.ttest_rel(x, y)
        t, p_t = float(result.statistic), float(result.pvalue)
    if np.all(diff == 0):
        p_flip = 1.0
    else:
        flip = stats.permutation_test((x, y), lambda u, v, axis: np.mean(u - v, axis=axis), vectorized=True,
                                      permutation_type="samples", alternative="two-sided", n_resamples=math.inf)
        p_flip = float(flip.pvalue)
    return PairedTest(n=n, mean_diff=mean, std_diff=std, t=t, p_t=p_t, p_sign_flip=p_flip)
