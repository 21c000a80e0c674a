"""Binary classification metrics with patient-level bootstrap confidence intervals.

The positive class is ``1`` (for the flagship task: CIN2+, against CIN0/1 as ``0``), and a
*score* is the predicted probability of the positive class (any monotone score works). An image is
predicted positive when ``score >= threshold``.

Everything here is plain numpy and accepts numpy arrays, Python sequences or torch tensors (they
are detached and moved to the CPU). A ratio whose denominator is zero (for example the precision
when nothing is predicted positive) is ``nan``, never an exception, so that a degenerate bootstrap
resample or a tiny test set cannot crash an evaluation.

The decision threshold must be chosen on the *validation* split with :func:`choose_threshold` and
then applied unchanged to the test split: choosing it on the test split makes every reported
number optimistic.

References:
    Chae, Zimmermann, Kim, Kim. "Attentive Transfer Learning via Self-supervised Learning for
    Cervical Dysplasia Diagnosis." Journal of Information Processing Systems 17(3), 2021
    (Table 2 reports accuracy, specificity, sensitivity and precision).

    Youden. "Index for rating diagnostic tests." Cancer 3(1), 1950.

    Efron, Tibshirani. "An Introduction to the Bootstrap." Chapman & Hall, 1993 (percentile
    intervals, ch. 13; resampling of independent units).

    Clopper, Pearson. "The use of confidence or fiducial limits illustrated in the case of the
    binomial." Biometrika 26(4), 1934 (the exact interval of a proportion).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BOOTSTRAP_METRICS",
    "PROPORTION_METRICS",
    "VERDICTS",
    "EvaluationReport",
    "PairedDifference",
    "binary_metrics",
    "bootstrap_ci",
    "bootstrap_samples",
    "choose_threshold",
    "clopper_pearson_ci",
    "confusion_counts",
    "evaluate_predictions",
    "format_fold_table",
    "format_table",
    "paired_difference",
    "sensitivity_at_specificity",
    "summarize_folds",
]

#: Metrics :func:`bootstrap_samples` and :func:`bootstrap_ci` can resample.
BOOTSTRAP_METRICS: tuple[str, ...] = (
    "accuracy",
    "specificity",
    "sensitivity",
    "precision",
    "f1",
    "auc",
    "sensitivity_at_specificity",
)

#: Metrics that are a proportion of images (a count over a count). At 0% or 100% their bootstrap
#: interval collapses to a point, and :func:`evaluate_predictions` gives an exact interval
#: instead (:func:`clopper_pearson_ci`). ``sensitivity_at_specificity`` is a sensitivity read at a
#: threshold chosen on the same data, so its exact interval is an approximation.
PROPORTION_METRICS: tuple[str, ...] = (
    "accuracy",
    "specificity",
    "sensitivity",
    "precision",
    "sensitivity_at_specificity",
)

#: The verdicts of :func:`paired_difference`: the interval of the difference lies above 0, below
#: 0, or holds 0 (``"undefined"`` when no resample defines the metric for both models).
VERDICTS: tuple[str, ...] = ("better", "worse", "no difference detectable at this size")

_DEFAULT_CI_METRICS: tuple[str, ...] = BOOTSTRAP_METRICS

# Bootstrap resamples are processed in chunks of about this many (resample, image) cells, which
# bounds memory at a few tens of MB whatever the test-set size.
_CHUNK_CELLS = 2_000_000


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _labels(y_true: Any, name: str = "y_true") -> np.ndarray:
    y = _to_numpy(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D of shape (n,); got shape {tuple(y.shape)}")
    if y.dtype == bool:
        return y.astype(np.int64)
    if y.size and not np.issubdtype(y.dtype, np.number):
        raise TypeError(f"{name} must hold the numbers 0 and 1; got dtype {y.dtype}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        values = sorted({float(v) for v in np.unique(y[bad])[:5]})
        raise ValueError(
            f"{name} must be binary with 0 = negative and 1 = positive; found {values}. "
            "Map raw grades to classes first (e.g. CIN0/1 -> 0, CIN2+ -> 1)."
        )
    return y.astype(np.int64)


def _scores(scores: Any, n: int, name: str = "scores") -> np.ndarray:
    s = _to_numpy(scores)
    if s.ndim == 2 and s.shape[1] == 2:
        raise ValueError(
            f"{name} must be 1-D (probability of the positive class); got shape "
            f"{tuple(s.shape)}. Pass probs[:, 1] (e.g. logits.softmax(-1)[:, 1])."
        )
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D of shape (n,); got shape {tuple(s.shape)}")
    if s.shape[0] != n:
        raise ValueError(f"{name} has {s.shape[0]} entries but y_true has {n}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(s)).sum())} non-finite values")
    return s


def _check_threshold(threshold: Any) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise TypeError(f"threshold must be a number; got {threshold!r}") from None
    if math.isnan(t):
        raise ValueError("threshold must not be nan")
    return t


# --------------------------------------------------------------------------------------------
# Point estimates
# --------------------------------------------------------------------------------------------


def confusion_counts(y_true: Any, y_pred: Any) -> dict[str, int]:
    """Count true/false positives and negatives.

    Args:
        y_true: Labels of shape (n,), 0 (negative) or 1 (positive).
        y_pred: Predicted labels of shape (n,), 0 or 1.

    Returns:
        ``{"tp": ..., "fp": ..., "tn": ..., "fn": ...}`` as Python ints.

    Example:
        >>> confusion_counts([0, 1, 1, 0], [0, 1, 0, 1])
        {'tp': 1, 'fp': 1, 'tn': 1, 'fn': 1}
    """
    y = _labels(y_true)
    p = _labels(y_pred, "y_pred")
    if p.shape != y.shape:
        raise ValueError(f"y_pred has {p.shape[0]} entries but y_true has {y.shape[0]}")
    tp = int(np.sum((y == 1) & (p == 1)))
    fp = int(np.sum((y == 0) & (p == 1)))
    tn = int(np.sum((y == 0) & (p == 0)))
    fn = int(np.sum((y == 1) & (p == 0)))
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


def _rates(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """Threshold metrics from (possibly weighted, possibly batched) counts; 0/0 -> nan."""
    tp, fp, tn, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, tn, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        n = tp + fp + tn + fn
        out = {
            "accuracy": np.where(n > 0, (tp + tn) / n, np.nan),
            "specificity": np.where(tn + fp > 0, tn / (tn + fp), np.nan),
            "sensitivity": np.where(tp + fn > 0, tp / (tp + fn), np.nan),
            "precision": np.where(tp + fp > 0, tp / (tp + fp), np.nan),
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan),
        }
    return out


class _Ranked:
    """Scores sorted once, with tie blocks, for fast weighted ROC statistics.

    For sorted position ``i``, ``start[i]`` / ``stop[i]`` delimit the block of equal scores
    that holds it; ``block_start`` lists each block's first position (ascending scores).
    """

    def __init__(self, y: np.ndarray, s: np.ndarray) -> None:
        order = np.argsort(s, kind="stable")
        self.order = order
        ss = s[order]
        self.sorted_scores = ss
        self.pos = y[order].astype(np.float64)
        self.neg = 1.0 - self.pos
        n = ss.shape[0]
        new_block = np.ones(n, dtype=bool)
        new_block[1:] = ss[1:] != ss[:-1]
        self.block_start = np.flatnonzero(new_block)
        block_id = np.cumsum(new_block) - 1
        block_stop = np.append(self.block_start[1:], n)
        self.start = self.block_start[block_id]
        self.stop = block_stop[block_id]
        self.unique_scores = ss[self.block_start]

    def thresholds(self) -> np.ndarray:
        """Candidate thresholds (K + 1,): one per way of splitting the sorted unique scores.

        ``t[k]`` predicts positive exactly the blocks ``k, k+1, ...``: ``t[0]`` is the smallest
        score (all positive), ``t[k]`` the midpoint between unique scores ``k-1`` and ``k``,
        ``t[K]`` the next float above the largest score (all negative).
        """
        u = self.unique_scores
        if u.size == 0:
            return np.array([0.5])
        mids = (u[:-1] + u[1:]) / 2.0
        mids = np.where(mids > u[:-1], mids, u[1:])  # adjacent floats: midpoint rounds down
        return np.concatenate([u[:1], mids, [np.nextafter(u[-1], np.inf)]])

    def curve(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Weighted counts at every candidate threshold.

        Args:
            w: Weights of shape (R, n) in sorted order (R resamples).

        Returns:
            ``(tp, fp, tn, fn)``, each (R, K + 1), matching :meth:`thresholds`.
        """
        wp = w * self.pos
        wn = w * self.neg
        # Exclusive cumulative sums at block starts, plus the totals: (R, K + 1).
        cp = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(wp, axis=1)], axis=1)
        cn = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(wn, axis=1)], axis=1)
        cuts = np.append(self.block_start, w.shape[1])
        fn = cp[:, cuts]
        tn = cn[:, cuts]
        tp = cp[:, -1:] - fn
        fp = cn[:, -1:] - tn
        return tp, fp, tn, fn

    def auc(self, w: np.ndarray) -> np.ndarray:
        """Weighted Mann-Whitney AUC per row of ``w`` (R, n); nan where a class has no weight.

        AUC = P(score_pos > score_neg) + 0.5 P(score_pos == score_neg), with each image counted
        as many times as its weight (its multiplicity in a bootstrap resample).
        """
        wp = w * self.pos
        wn = w * self.neg
        cn = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(wn, axis=1)], axis=1)
        below = cn[:, self.start]  # negative weight strictly below each image's score
        tied = cn[:, self.stop] - below
        num = np.sum(wp * (below + 0.5 * tied), axis=1)
        den = wp.sum(axis=1) * wn.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

    def sens_at_spec(self, w: np.ndarray, target: float) -> tuple[np.ndarray, np.ndarray]:
        """Best sensitivity with specificity >= target, per row; and the index of its threshold."""
        tp, fp, tn, fn = self.curve(w)
        with np.errstate(divide="ignore", invalid="ignore"):
            spec = tn / (tn + fp)
            sens = tp / (tp + fn)
        # Specificity grows and sensitivity falls with the threshold, so the smallest threshold
        # that reaches the target is the best one. The last threshold always has spec = 1.
        ok = spec >= target - 1e-12
        k = np.argmax(ok, axis=1)
        valid = ok.any(axis=1) & ((tp + fn)[:, 0] > 0) & ((tn + fp)[:, 0] > 0)
        value = np.where(valid, sens[np.arange(sens.shape[0]), k], np.nan)
        return value, k


def binary_metrics(y_true: Any, scores: Any, threshold: float = 0.5) -> dict[str, Any]:
    """The paper's four metrics plus F1, AUC, the confusion matrix and the counts.

    An image is predicted positive when ``score >= threshold``. Ratios with a zero denominator
    are ``nan`` (never an exception): for example ``precision`` when nothing is predicted
    positive, ``sensitivity`` when there is no positive image. The AUC needs both classes; with
    only one it is ``nan`` and ``auc_defined`` is ``False``.

    Args:
        y_true: Labels of shape (n,): 1 = positive (CIN2+), 0 = negative (CIN0/1).
        scores: Predicted probability (or any score) of the positive class, shape (n,).
        threshold: Decision threshold; choose it on validation data (:func:`choose_threshold`).

    Returns:
        A dict with float ``accuracy``, ``specificity`` (TN / (TN + FP)), ``sensitivity``
        (recall, TP / (TP + FN)), ``precision`` (TP / (TP + FP)), ``f1``, ``auc``; bool
        ``auc_defined``; float ``threshold``; int ``tp``, ``fp``, ``tn``, ``fn``, ``n``,
        ``n_positive``, ``n_negative``.

    References:
        Chae et al., JIPS 2021, Table 2 (accuracy, specificity, sensitivity, precision).
    """
    y = _labels(y_true)
    s = _scores(scores, y.shape[0])
    t = _check_threshold(threshold)
    pred = (s >= t).astype(np.int64)
    counts = confusion_counts(y, pred)
    rates = _rates(counts["tp"], counts["fp"], counts["tn"], counts["fn"])
    n_pos = int(y.sum())
    n_neg = int(y.shape[0] - n_pos)
    auc = float(_Ranked(y, s).auc(np.ones((1, y.shape[0])))[0]) if y.size else float("nan")
    out: dict[str, Any] = {k: float(v) for k, v in rates.items()}
    out["auc"] = auc
    out["auc_defined"] = n_pos > 0 and n_neg > 0
    out["threshold"] = t
    out.update(counts)
    out.update(n=int(y.shape[0]), n_positive=n_pos, n_negative=n_neg)
    return out


def sensitivity_at_specificity(
    y_true: Any, scores: Any, specificity: float = 0.9
) -> tuple[float, float]:
    """The highest sensitivity reachable while keeping specificity at or above a target.

    The ROC curve is scanned over every threshold that separates two distinct scores
    (midpoints between consecutive unique scores, plus "everything positive" and "everything
    negative"); the smallest threshold whose specificity reaches the target has the highest
    sensitivity.

    Args:
        y_true: Labels of shape (n,), 0 or 1.
        scores: Scores of the positive class, shape (n,).
        specificity: Target specificity in [0, 1].

    Returns:
        ``(sensitivity, threshold)``; applying ``threshold`` with :func:`binary_metrics` to the
        same data reproduces both numbers. ``(nan, nan)`` when a class is missing.
    """
    if not 0.0 <= float(specificity) <= 1.0:
        raise ValueError(f"specificity must be in [0, 1]; got {specificity}")
    y = _labels(y_true)
    s = _scores(scores, y.shape[0])
    if y.sum() == 0 or y.sum() == y.shape[0]:
        return float("nan"), float("nan")
    ranked = _Ranked(y, s)
    value, k = ranked.sens_at_spec(np.ones((1, y.shape[0])), float(specificity))
    return float(value[0]), float(ranked.thresholds()[k[0]])


def choose_threshold(
    y_true: Any,
    scores: Any,
    *,
    criterion: str = "youden",
    target: float | None = None,
) -> float:
    """Choose a decision threshold on VALIDATION data.

    Never choose the threshold on the test split: the threshold is part of the model, and
    tuning it on the test images makes every reported test metric optimistic. Choose it on the
    validation split (the one used for early stopping), then pass it unchanged to
    :func:`evaluate_predictions` on the test split.

    Candidate thresholds are the midpoints between consecutive distinct scores (plus "all
    positive" and "all negative"), so the chosen value sits in the middle of a gap rather than on
    a validation score.

    Args:
        y_true: Validation labels of shape (n,), 0 or 1; both classes must be present.
        scores: Validation scores of the positive class, shape (n,).
        criterion: ``"youden"`` maximises Youden's J = sensitivity + specificity - 1;
            ``"f1"`` maximises F1; ``"specificity"`` takes the highest sensitivity whose
            specificity is at least ``target``. Ties go to the lowest threshold (higher
            sensitivity, the safer error for screening).
        target: The specificity to reach, in [0, 1]; required for ``"specificity"`` only.

    Returns:
        The threshold (predict positive when ``score >= threshold``).

    References:
        Youden. "Index for rating diagnostic tests." Cancer 3(1), 1950.
    """
    criteria = ("youden", "f1", "specificity")
    if criterion not in criteria:
        raise ValueError(f"criterion must be one of {criteria}; got {criterion!r}")
    if criterion == "specificity":
        if target is None:
            raise ValueError('criterion="specificity" needs target=, e.g. target=0.9')
        if not 0.0 <= float(target) <= 1.0:
            raise ValueError(f"target must be in [0, 1]; got {target}")
    elif target is not None:
        raise ValueError(f'target is only used with criterion="specificity"; got {criterion!r}')
    y = _labels(y_true)
    s = _scores(scores, y.shape[0])
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.shape[0]:
        raise ValueError(
            f"choosing a threshold needs both classes in the validation labels; got "
            f"{n_pos} positive and {y.shape[0] - n_pos} negative"
        )
    ranked = _Ranked(y, s)
    thresholds = ranked.thresholds()
    if criterion == "specificity":
        _, k = ranked.sens_at_spec(np.ones((1, y.shape[0])), float(target))  # type: ignore[arg-type]
        return float(thresholds[k[0]])
    tp, fp, tn, fn = (a[0] for a in ranked.curve(np.ones((1, y.shape[0]))))
    rates = _rates(tp, fp, tn, fn)
    if criterion == "youden":
        objective = rates["sensitivity"] + rates["specificity"] - 1.0
    else:
        objective = np.nan_to_num(rates["f1"], nan=-1.0)
    return float(thresholds[int(np.argmax(objective))])


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


def _group_index(groups: Any, n: int) -> tuple[np.ndarray, int]:
    if groups is None:
        return np.arange(n), n
    g = _to_numpy(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"groups must have shape ({n},) like y_true; got {tuple(g.shape)}")
    _, inverse = np.unique(g, return_inverse=True)
    inverse = inverse.reshape(-1)
    return inverse, int(inverse.max()) + 1 if n else 0


def _check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    names = tuple(metrics)
    unknown = [m for m in names if m not in BOOTSTRAP_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {BOOTSTRAP_METRICS}")
    return names


def bootstrap_samples(
    y_true: Any,
    scores: Any,
    *,
    threshold: float,
    groups: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    metrics: Sequence[str] = _DEFAULT_CI_METRICS,
    sensitivity_at: float = 0.9,
) -> dict[str, np.ndarray]:
    """Each metric on ``n_boot`` bootstrap resamples (the distribution behind the CIs).

    With ``groups`` (patient ids), each resample draws as many patients as there are, with
    replacement, and keeps *all* images of every drawn patient (a patient drawn twice counts
    twice). Without, images are resampled. Images of one patient are not independent, so
    resampling images understates the uncertainty whenever patients contribute several images.

    Resampling is vectorised: a resample is a vector of multiplicities, and every metric is a
    weighted count over the original data (the AUC a weighted Mann-Whitney statistic).

    Args:
        y_true: Labels of shape (n,), 0 or 1.
        scores: Scores of the positive class, shape (n,).
        threshold: Fixed decision threshold (chosen on validation data).
        groups: Optional patient ids of shape (n,) (ints or strings).
        n_boot: Number of resamples.
        seed: Seed of the local ``np.random.default_rng``; the same seed gives the same output.
        metrics: Names from :data:`BOOTSTRAP_METRICS`.
        sensitivity_at: Target specificity for ``"sensitivity_at_specificity"`` (the threshold
            is re-chosen on each resample: it is a point of the ROC curve).

    Returns:
        ``{metric: array of shape (n_boot,)}``; ``nan`` where a resample leaves the metric
        undefined (for example a resample without any positive image for the AUC).

    References:
        Efron, Tibshirani. "An Introduction to the Bootstrap." 1993.
    """
    names = _check_metrics(metrics)
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be at least 1; got {n_boot}")
    n_boot = int(n_boot)
    y = _labels(y_true)
    s = _scores(scores, y.shape[0])
    t = _check_threshold(threshold)
    n = y.shape[0]
    if n == 0:
        raise ValueError("bootstrap needs at least one image; got empty y_true")
    inverse, n_groups = _group_index(groups, n)

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))

    ranked = _Ranked(y, s)
    inv_sorted = inverse[ranked.order]
    pred_sorted = (ranked.sorted_scores >= t).astype(np.float64)
    pos_sorted = ranked.pos
    out = {m: np.empty(n_boot) for m in names}
    chunk = max(1, _CHUNK_CELLS // max(n, n_groups))
    for lo in range(0, n_boot, chunk):
        d = draws[lo : lo + chunk]
        r = d.shape[0]
        # Multiplicity of every group in every resample: (r, G), then of every image: (r, n).
        flat = (d + np.arange(r)[:, None] * n_groups).ravel()
        mult = np.bincount(flat, minlength=r * n_groups).reshape(r, n_groups)
        w = mult[:, inv_sorted].astype(np.float64)
        tp = w @ (pos_sorted * pred_sorted)
        fn = w @ (pos_sorted * (1 - pred_sorted))
        fp = w @ ((1 - pos_sorted) * pred_sorted)
        tn = w @ ((1 - pos_sorted) * (1 - pred_sorted))
        rates = _rates(tp, fp, tn, fn)
        for m in names:
            if m in rates:
                out[m][lo : lo + r] = rates[m]
            elif m == "auc":
                out[m][lo : lo + r] = ranked.auc(w)
            else:  # sensitivity_at_specificity
                out[m][lo : lo + r] = ranked.sens_at_spec(w, float(sensitivity_at))[0]
    return out


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(v, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def bootstrap_ci(
    y_true: Any,
    scores: Any,
    *,
    threshold: float,
    groups: Any = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    metrics: Sequence[str] = _DEFAULT_CI_METRICS,
    sensitivity_at: float = 0.9,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals, resampled by patient when ``groups`` is given.

    The interval of a metric is the ``alpha / 2`` and ``1 - alpha / 2`` quantiles of its values
    over the resamples of :func:`bootstrap_samples`. Resamples in which the metric is undefined
    (a resample with a single class, for the AUC) are skipped; when every resample is undefined
    the interval is ``(nan, nan)``. These are the raw percentile intervals: a proportion at 0%
    or 100% gets ``(0, 0)`` or ``(1, 1)`` here, which :func:`evaluate_predictions` replaces with
    an exact interval.

    Args:
        y_true: Labels of shape (n,), 0 or 1.
        scores: Scores of the positive class, shape (n,).
        threshold: Fixed decision threshold (chosen on validation data).
        groups: Optional patient ids of shape (n,): patients are resampled with all their
            images. Strongly recommended when a patient has several images.
        n_boot: Number of resamples.
        alpha: 1 - confidence level (0.05 gives 95% intervals).
        seed: Seed of the local random generator.
        metrics: Names from :data:`BOOTSTRAP_METRICS`.
        sensitivity_at: Target specificity for ``"sensitivity_at_specificity"``.

    Returns:
        ``{metric: (low, high)}``.

    References:
        Efron, Tibshirani. "An Introduction to the Bootstrap." 1993, ch. 13.
    """
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1), e.g. 0.05 for 95% intervals; got {alpha}")
    samples = bootstrap_samples(
        y_true,
        scores,
        threshold=threshold,
        groups=groups,
        n_boot=n_boot,
        seed=seed,
        metrics=metrics,
        sensitivity_at=sensitivity_at,
    )
    return {m: _percentile_ci(v, float(alpha)) for m, v in samples.items()}


# --------------------------------------------------------------------------------------------
# Exact intervals of proportions
# --------------------------------------------------------------------------------------------


def clopper_pearson_ci(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper-Pearson) confidence interval of a binomial proportion ``successes / n``.

    The bounds are quantiles of beta distributions: ``Beta(alpha/2; x, n - x + 1)`` and
    ``Beta(1 - alpha/2; x + 1, n - x)``, with 0 below ``x = 0`` and 1 above ``x = n``. At the
    edges they have a closed form: 21 successes out of 21 give ``(0.025 ** (1 / 21), 1)``, i.e.
    ``(0.8389, 1)`` at 95%. The interval guarantees at least the nominal coverage for every true
    proportion (it is conservative), which is what a proportion of 0% or 100% on a few dozen
    images needs: there a percentile bootstrap collapses to the single point ``[1, 1]``, since
    every resample of 21 correct images is again all correct.

    :func:`evaluate_predictions` uses it only where the bootstrap collapses (a proportion at 0%
    or 100%); elsewhere the patient bootstrap is kept, because it accounts for several images per
    patient and an interval over images does not.

    Args:
        successes: Number of successes ``x``, ``0 <= x <= n``.
        n: Number of independent trials.
        alpha: 1 - confidence level (two-sided; 0.05 gives a 95% interval).

    Returns:
        ``(low, high)`` in [0, 1]; ``(nan, nan)`` when ``n == 0``.

    Example:
        >>> low, high = clopper_pearson_ci(21, 21)
        >>> round(low, 4), high
        (0.8389, 1.0)

    References:
        Clopper, Pearson. Biometrika 26(4), 1934.
    """
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1), e.g. 0.05 for 95% intervals; got {alpha}")
    x, n = int(successes), int(n)
    if n < 0 or not 0 <= x <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n; got successes={successes}, n={n}")
    if n == 0:
        return float("nan"), float("nan")
    from scipy.stats import beta  # lazy: scipy.stats is slow to import

    a = float(alpha) / 2.0
    low = 0.0 if x == 0 else float(beta.ppf(a, x, n - x + 1))
    high = 1.0 if x == n else float(beta.ppf(1.0 - a, x + 1, n - x))
    return low, high


def _denominators(
    y: np.ndarray, pred: np.ndarray, inverse: np.ndarray, grouped: bool
) -> dict[str, int]:
    """Independent units behind each proportion: images, or patients with any image in it."""
    masks = {
        "accuracy": np.ones_like(y, dtype=bool),
        "specificity": y == 0,
        "sensitivity": y == 1,
        "precision": pred == 1,
        "sensitivity_at_specificity": y == 1,
    }
    if not grouped:
        return {m: int(mask.sum()) for m, mask in masks.items()}
    return {m: int(np.unique(inverse[mask]).size) for m, mask in masks.items()}


def _exact_where_degenerate(
    metrics: Mapping[str, float],
    ci: dict[str, tuple[float, float]],
    units: Mapping[str, int],
    alpha: float,
) -> dict[str, str]:
    """Replace the collapsed bootstrap interval of a proportion at 0 or 1 by an exact one.

    Returns each metric's interval method: ``"bootstrap"``, ``"exact"`` or ``"degenerate"``
    (a non-proportion whose resamples all gave one value: no interval is printed for it).
    """
    method: dict[str, str] = {}
    for m, (lo, hi) in ci.items():
        value = metrics.get(m, float("nan"))
        if m in PROPORTION_METRICS and value in (0.0, 1.0) and units.get(m, 0) > 0:
            n = units[m]
            ci[m] = clopper_pearson_ci(round(value * n), n, alpha)
            method[m] = "exact"
        elif math.isfinite(lo) and lo == hi:
            method[m] = "degenerate"
        else:
            method[m] = "bootstrap"
    return method


def _mean_ci(
    values: Any,
    groups: Any = None,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[tuple[float, float], str]:
    """Interval of the mean of per-image values (hits, fractions), resampling patients.

    A percentile bootstrap over patients (``groups``) or images, as :func:`bootstrap_samples`
    draws them; when every value is 0 or every value is 1 (a proportion at an edge, where the
    bootstrap collapses) the exact interval over the units instead.

    Args:
        values: Per-image values of shape (n,).
        groups: Optional patient ids of shape (n,).
        n_boot: Resamples (0: no interval).
        alpha: 1 - confidence level.
        seed: Seed of the resampling.

    Returns:
        ``((low, high), method)`` with method ``"bootstrap"``, ``"exact"``, ``"degenerate"``
        (every resample gave one value) or ``"none"`` (no values, or ``n_boot == 0``).
    """
    v = _to_numpy(values).astype(np.float64).reshape(-1)
    nan2 = (float("nan"), float("nan"))
    if v.size == 0:
        return nan2, "none"
    inverse, n_groups = _group_index(groups, v.size)
    for edge in (0.0, 1.0):
        if np.all(v == edge):
            return clopper_pearson_ci(int(edge) * n_groups, n_groups, alpha), "exact"
    if int(n_boot) < 1:
        return nan2, "none"
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(int(n_boot), n_groups))
    flat = (draws + np.arange(int(n_boot))[:, None] * n_groups).ravel()
    mult = np.bincount(flat, minlength=int(n_boot) * n_groups).reshape(int(n_boot), n_groups)
    sums = np.bincount(inverse, weights=v, minlength=n_groups)
    sizes = np.bincount(inverse, minlength=n_groups).astype(np.float64)
    low, high = _percentile_ci((mult @ sums) / (mult @ sizes), float(alpha))
    return (low, high), "degenerate" if low == high else "bootstrap"


def _verdict(low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "undefined"
    if low > 0.0:
        return VERDICTS[0]
    if high < 0.0:
        return VERDICTS[1]
    return VERDICTS[2]


# --------------------------------------------------------------------------------------------
# Paired comparison of two models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedDifference:
    """The difference of one metric between two models scored on the same images.

    Attributes:
        metric: The metric's name (from :data:`BOOTSTRAP_METRICS`).
        value: ``metric(model a) - metric(model b)`` on the full test set.
        ci: ``(low, high)``: percentile interval of the difference over paired resamples.
        verdict: ``"better"`` (the interval lies above 0: model a is better), ``"worse"``
            (below 0), ``"no difference detectable at this size"`` (it holds 0), or
            ``"undefined"`` (no resample defines the metric for both models).
        value_a: The metric of model a.
        value_b: The metric of model b.
        n_boot: Number of paired resamples.
        n_valid: Resamples where the metric is defined for both models.
        alpha: 1 - confidence level.
        resampled_by: ``"patient"`` or ``"image"``.
    """

    metric: str
    value: float
    ci: tuple[float, float]
    verdict: str
    value_a: float
    value_b: float
    n_boot: int
    n_valid: int
    alpha: float
    resampled_by: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``nan`` becomes ``None``)."""
        return {
            "metric": self.metric,
            "value": _json_float(self.value),
            "ci": [_json_float(self.ci[0]), _json_float(self.ci[1])],
            "verdict": self.verdict,
            "value_a": _json_float(self.value_a),
            "value_b": _json_float(self.value_b),
            "n_boot": int(self.n_boot),
            "n_valid": int(self.n_valid),
            "alpha": float(self.alpha),
            "resampled_by": self.resampled_by,
        }

    def __str__(self) -> str:
        """``"<difference> [<low>, <high>] points: <verdict>"``, in percentage points."""
        lo, hi = self.ci

        def pts(v: float) -> str:
            return "n/a" if not math.isfinite(v) else f"{100.0 * v:+.2f}"

        return f"{pts(self.value)} [{pts(lo)}, {pts(hi)}] points: {self.verdict}"


def paired_difference(
    y_true: Any,
    scores_a: Any,
    scores_b: Any,
    *,
    groups: Any = None,
    metric: str = "auc",
    threshold_a: float | None = None,
    threshold_b: float | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    sensitivity_at: float = 0.9,
) -> PairedDifference:
    """Model a minus model b on the same test images, with a paired bootstrap interval.

    Both models are scored on every resample of the *same* patients (with ``groups``) or images,
    so what the two share (an easy patient, a hard one) cancels out of the difference: the
    interval of a paired difference is narrower than the two separate intervals suggest, and it,
    not whether those overlap, says whether one model is better. The verdict reads the interval:
    above 0, a is ``"better"``; below 0, ``"worse"``; holding 0, ``"no difference detectable
    at this size"`` (which is not evidence that the models are equal: a larger test set may
    still separate them).

    The resamples are those of :func:`bootstrap_samples`, which with the same ``seed``,
    ``n_boot`` and ``groups`` draws the same patients for both models. Resamples where either
    model's metric is undefined (a single-class resample, for the AUC) are skipped.

    Args:
        y_true: Test labels of shape (n,), 0 or 1.
        scores_a: Scores of model a, shape (n,), in the same image order as ``y_true``.
        scores_b: Scores of model b, shape (n,).
        groups: Optional patient ids of shape (n,); patients are then resampled with all their
            images (recommended whenever a patient has several images).
        metric: One of :data:`BOOTSTRAP_METRICS` (default ``"auc"``, which needs no threshold).
        threshold_a: Model a's decision threshold, chosen on validation data; required for the
            threshold metrics (accuracy, specificity, sensitivity, precision, F1).
        threshold_b: Model b's threshold, likewise.
        n_boot: Number of paired resamples.
        alpha: 1 - confidence level.
        seed: Seed of the resampling.
        sensitivity_at: Target specificity for ``"sensitivity_at_specificity"``.

    Returns:
        A :class:`PairedDifference`.

    Example:
        >>> d = paired_difference(y, p_ssl, p_scratch, groups=patients, metric="auc")
        >>> d.verdict  # doctest: +SKIP
        'no difference detectable at this size'

    References:
        Efron, Tibshirani. "An Introduction to the Bootstrap." 1993, ch. 13 (percentile
        intervals) and ch. 8 (paired data).
    """
    (name,) = _check_metrics((metric,))
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1), e.g. 0.05 for 95% intervals; got {alpha}")
    y = _labels(y_true)
    s_a = _scores(scores_a, y.shape[0], "scores_a")
    s_b = _scores(scores_b, y.shape[0], "scores_b")
    needs_threshold = name not in ("auc", "sensitivity_at_specificity")
    if needs_threshold and (threshold_a is None or threshold_b is None):
        raise ValueError(
            f"metric {name!r} needs threshold_a= and threshold_b= (each model's threshold, "
            "chosen on validation data with choose_threshold); the AUC needs none"
        )
    t_a = 0.5 if threshold_a is None else _check_threshold(threshold_a)
    t_b = 0.5 if threshold_b is None else _check_threshold(threshold_b)

    def point(s: np.ndarray, t: float) -> float:
        if name == "sensitivity_at_specificity":
            return sensitivity_at_specificity(y, s, sensitivity_at)[0]
        return float(binary_metrics(y, s, t)[name])

    value_a, value_b = point(s_a, t_a), point(s_b, t_b)
    common = {
        "groups": groups,
        "n_boot": n_boot,
        "seed": seed,
        "metrics": (name,),
        "sensitivity_at": sensitivity_at,
    }
    diff = (
        bootstrap_samples(y, s_a, threshold=t_a, **common)[name]
        - bootstrap_samples(y, s_b, threshold=t_b, **common)[name]
    )
    low, high = _percentile_ci(diff, float(alpha))
    return PairedDifference(
        metric=name,
        value=value_a - value_b,
        ci=(low, high),
        verdict=_verdict(low, high),
        value_a=value_a,
        value_b=value_b,
        n_boot=int(n_boot),
        n_valid=int(np.isfinite(diff).sum()),
        alpha=float(alpha),
        resampled_by="image" if groups is None else "patient",
    )


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

_TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("accuracy", "Accuracy"),
    ("specificity", "Specificity"),
    ("sensitivity", "Sensitivity"),
    ("precision", "Precision"),
    ("f1", "F1"),
    ("auc", "AUC"),
    ("sensitivity_at_specificity", "Sens@Spec"),
)


def _json_float(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100.0 * x:.2f}"


@dataclass
class EvaluationReport:
    """Metrics of one model on one split, with bootstrap confidence intervals.

    Attributes:
        metrics: Point estimates: ``accuracy``, ``specificity``, ``sensitivity``,
            ``precision``, ``f1``, ``auc``, ``sensitivity_at_specificity`` (fractions in [0, 1]
            or ``nan``).
        ci: ``{metric: (low, high)}``: percentile bootstrap intervals, except where
            ``ci_method`` says ``"exact"``.
        threshold: The decision threshold applied (chosen on validation data).
        counts: ``tp``, ``fp``, ``tn``, ``fn``, ``n``, ``n_positive``, ``n_negative``,
            ``n_groups`` (patients, or images when no groups were given).
        sensitivity_at: Target specificity of ``sensitivity_at_specificity``.
        threshold_at_specificity: The threshold that reaches it on these data (descriptive only).
        auc_defined: ``False`` when only one class is present (``auc`` is then ``nan``).
        resampled_by: ``"patient"`` or ``"image"``.
        n_boot: Number of bootstrap resamples.
        alpha: 1 - confidence level.
        seed: Bootstrap seed.
        bootstrap_valid: Per metric, how many resamples gave a defined value.
        ci_method: Per metric, how its interval was made: ``"bootstrap"`` (percentile
            bootstrap); ``"exact"`` (a proportion at 0% or 100%, where every resample gives the
            same value: Clopper-Pearson over ``ci_units[metric]`` independent units, patients
            when resampled by patient); ``"degenerate"`` (a metric that is not a proportion,
            e.g. an AUC of 100%, whose resamples all agree: no interval is printed);
            ``"none"`` (no bootstrap was run).
        ci_units: Per proportion, the number of independent units (patients or images) in its
            denominator, the ``n`` of its exact interval.
    """

    metrics: dict[str, float]
    ci: dict[str, tuple[float, float]]
    threshold: float
    counts: dict[str, int]
    sensitivity_at: float = 0.9
    threshold_at_specificity: float = float("nan")
    auc_defined: bool = True
    resampled_by: str = "image"
    n_boot: int = 1000
    alpha: float = 0.05
    seed: int = 0
    bootstrap_valid: dict[str, int] = field(default_factory=dict)
    ci_method: dict[str, str] = field(default_factory=dict)
    ci_units: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``json.dumps`` works; ``nan`` becomes ``None``)."""
        return {
            "metrics": {k: _json_float(v) for k, v in self.metrics.items()},
            "ci": {k: [_json_float(lo), _json_float(hi)] for k, (lo, hi) in self.ci.items()},
            "threshold": _json_float(self.threshold),
            "counts": {k: int(v) for k, v in self.counts.items()},
            "sensitivity_at": float(self.sensitivity_at),
            "threshold_at_specificity": _json_float(self.threshold_at_specificity),
            "auc_defined": bool(self.auc_defined),
            "resampled_by": self.resampled_by,
            "n_boot": int(self.n_boot),
            "alpha": float(self.alpha),
            "seed": int(self.seed),
            "bootstrap_valid": {k: int(v) for k, v in self.bootstrap_valid.items()},
            "ci_method": dict(self.ci_method),
            "ci_units": {k: int(v) for k, v in self.ci_units.items()},
        }

    def format_metric(self, name: str) -> str:
        """``"value [low, high]"`` in percent, e.g. ``"73.85 [68.10, 79.23]"``.

        An exact interval (``ci_method`` ``"exact"``) ends with ``†``, e.g.
        ``"100.00 [83.89, 100.00]†"``; a degenerate one is not printed: ``"100.00 [–]"``.
        """
        value = _pct(self.metrics.get(name, float("nan")))
        if name not in self.ci:
            return value
        method = self.ci_method.get(name, "bootstrap")
        if method == "degenerate":
            return f"{value} [–]"
        lo, hi = self.ci[name]
        return f"{value} [{_pct(lo)}, {_pct(hi)}]" + ("†" if method == "exact" else "")

    def to_markdown_row(self, name: str) -> str:
        """One row of :func:`format_table` for the model called ``name``."""
        c = self.counts
        cells = [name.replace("|", "\\|")]
        cells += [self.format_metric(key) for key, _ in _TABLE_COLUMNS]
        cells.append(f"{c['n']} ({c['n_positive']}/{c['n_negative']})")
        cells.append(f"{c['tp']}/{c['fp']}/{c['tn']}/{c['fn']}")
        return "| " + " | ".join(cells) + " |"


def evaluate_predictions(
    y_true: Any,
    scores: Any,
    *,
    threshold: float,
    groups: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    sensitivity_at: float = 0.9,
    alpha: float = 0.05,
) -> EvaluationReport:
    """Evaluate test-split predictions: point metrics, sensitivity at specificity and CIs.

    Intervals are percentile bootstrap intervals (by patient with ``groups``), with one
    exception. A proportion (:data:`PROPORTION_METRICS`) at 0% or 100% has a bootstrap interval
    of one point (every resample of 21 correctly classified negatives is again 100% specific), so
    it gets the exact Clopper-Pearson interval (:func:`clopper_pearson_ci`) instead. Its ``n`` is
    the number of independent units in the metric's denominator: images without ``groups``, and
    with ``groups`` the *patients* with an image in it. Counting patients treats a patient's
    images as one observation; when all of them are right (or all wrong) that is the most that
    can be claimed without a model of how alike a patient's images are, so the interval is
    conservative: 21 negatives of 7 patients at 100% give a lower bound of 0.59
    (``0.025 ** (1 / 7)``), not the 0.84 of 21 independent images. Between 0% and 100% the
    bootstrap is kept, because it resamples patients and an interval over images would be too
    narrow. ``EvaluationReport.ci_method`` records the choice per metric.

    Args:
        y_true: Test labels of shape (n,), 0 or 1.
        scores: Test scores of the positive class, shape (n,).
        threshold: The decision threshold, chosen beforehand on the validation split with
            :func:`choose_threshold` (required, so that it cannot default to a test-tuned value).
        groups: Optional patient ids of shape (n,); the bootstrap then resamples patients.
        n_boot: Bootstrap resamples (0 skips the intervals; they are then ``(nan, nan)``).
        seed: Bootstrap seed.
        sensitivity_at: Target specificity for the ``sensitivity_at_specificity`` metric.
        alpha: 1 - confidence level.

    Returns:
        An :class:`EvaluationReport`.

    References:
        Chae et al., JIPS 2021, Table 2; Efron & Tibshirani 1993 for the intervals; Clopper &
        Pearson 1934 for the exact interval.
    """
    if not 0.0 <= float(sensitivity_at) <= 1.0:
        raise ValueError(f"sensitivity_at must be a specificity in [0, 1]; got {sensitivity_at}")
    point = binary_metrics(y_true, scores, threshold)
    sens, thr = sensitivity_at_specificity(y_true, scores, sensitivity_at)
    metrics = {key: float(point[key]) for key in BOOTSTRAP_METRICS if key in point}
    metrics["sensitivity_at_specificity"] = sens
    y = _labels(y_true)
    inverse, n_groups = _group_index(groups, y.shape[0])
    counts = {k: int(point[k]) for k in ("tp", "fp", "tn", "fn", "n", "n_positive", "n_negative")}
    counts["n_groups"] = n_groups
    pred = (_scores(scores, y.shape[0]) >= float(point["threshold"])).astype(np.int64)
    units = _denominators(y, pred, inverse, groups is not None)
    if int(n_boot) > 0:
        samples = bootstrap_samples(
            y_true,
            scores,
            threshold=threshold,
            groups=groups,
            n_boot=n_boot,
            seed=seed,
            sensitivity_at=sensitivity_at,
        )
        ci = {m: _percentile_ci(v, float(alpha)) for m, v in samples.items()}
        valid = {m: int(np.isfinite(v).sum()) for m, v in samples.items()}
        method = _exact_where_degenerate(metrics, ci, units, float(alpha))
    else:
        ci = {m: (float("nan"), float("nan")) for m in BOOTSTRAP_METRICS}
        valid = {m: 0 for m in BOOTSTRAP_METRICS}
        method = {m: "none" for m in BOOTSTRAP_METRICS}
    return EvaluationReport(
        metrics=metrics,
        ci=ci,
        threshold=float(point["threshold"]),
        counts=counts,
        sensitivity_at=float(sensitivity_at),
        threshold_at_specificity=thr,
        auc_defined=bool(point["auc_defined"]),
        resampled_by="image" if groups is None else "patient",
        n_boot=int(n_boot),
        alpha=float(alpha),
        seed=int(seed),
        bootstrap_valid=valid,
        ci_method=method,
        ci_units=units,
    )


def format_table(reports: Mapping[str, EvaluationReport]) -> str:
    """A Markdown table with one row per model, metrics in percent as in the paper's Table 2.

    Each metric cell is ``"value [low, high]"`` (point estimate and bootstrap interval, in
    percent; ``n/a`` when undefined). The last columns give the number of images (positive /
    negative) and the confusion matrix ``TP/FP/TN/FN``.

    Args:
        reports: ``{model name: EvaluationReport}``, in display order.

    Returns:
        The table as a string (header, separator, rows), ending with a newline.

    References:
        Chae et al., JIPS 2021, Table 2.
    """
    if not reports:
        raise ValueError("format_table needs at least one report")
    first = next(iter(reports.values()))
    level = round(100 * (1 - first.alpha))
    spec = round(100 * first.sensitivity_at)
    headers = ["Model"]
    for key, title in _TABLE_COLUMNS:
        headers.append(f"Sens@Spec{spec} (%)" if key == "sensitivity_at_specificity" else title)
        if key != "sensitivity_at_specificity":
            headers[-1] += " (%)"
    headers += ["n (pos/neg)", "TP/FP/TN/FN"]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|",
    ]
    lines += [report.to_markdown_row(name) for name, report in reports.items()]
    note = (
        f"Values in percent, [{level}% bootstrap CI, resampled by {first.resampled_by}, "
        f"{first.n_boot} resamples]."
    )
    methods = {m for r in reports.values() for m in r.ci_method.values()}
    if "exact" in methods:
        unit = "patients" if first.resampled_by == "patient" else "images"
        note += (
            f" †: a proportion at 0% or 100%, where every resample gives the same value: exact "
            f"Clopper-Pearson interval over the {unit} in its denominator instead."
        )
    if "degenerate" in methods:
        note += " [–]: every resample gave the same value; this metric has no exact interval."
    return "\n".join(lines) + "\n\n" + note + "\n"


def summarize_folds(reports: Sequence[EvaluationReport]) -> dict[str, Any]:
    """Mean, standard deviation, minimum and maximum of each metric across folds.

    With patient-grouped k-fold cross-validation (:func:`patchssl.data.kfold_records`) each
    fold's model is tested on its own patients; the spread across folds shows how much a number
    moves with the split alone, which one 80/20 split cannot show. A metric undefined in a fold
    (``nan``, e.g. the AUC of a one-class test part) is left out of its statistics, and
    ``n_defined`` says how many folds remained. The counts are summed: with every image tested
    in exactly one fold, they are the counts of the whole labeled set.

    Args:
        reports: One :class:`EvaluationReport` per fold, of the same model.

    Returns:
        ``{"folds": k, "metrics": {name: {"mean", "std", "min", "max", "n_defined"}},
        "counts": {"tp", "fp", "tn", "fn", "n", "n_positive", "n_negative"}}``; ``std`` is the
        sample standard deviation (``ddof=1``), ``nan`` with fewer than two defined folds.

    Raises:
        ValueError: When ``reports`` is empty.
    """
    if not reports:
        raise ValueError("summarize_folds needs at least one fold's report")
    nan = float("nan")
    metrics: dict[str, dict[str, float]] = {}
    for name in reports[0].metrics:
        values = np.array([r.metrics.get(name, nan) for r in reports], dtype=np.float64)
        values = values[np.isfinite(values)]
        stats = {"mean": nan, "std": nan, "min": nan, "max": nan, "n_defined": values.size}
        if values.size:
            stats.update(mean=values.mean(), min=values.min(), max=values.max())
        if values.size > 1:
            stats["std"] = values.std(ddof=1)
        metrics[name] = {k: float(v) if k != "n_defined" else int(v) for k, v in stats.items()}
    keys = ("tp", "fp", "tn", "fn", "n", "n_positive", "n_negative")
    counts = {k: int(sum(r.counts[k] for r in reports)) for k in keys}
    return {"folds": len(reports), "metrics": metrics, "counts": counts}


def format_fold_table(folds: Mapping[str, Sequence[EvaluationReport]]) -> str:
    """A Markdown table of cross-validated models: ``mean ± std [min, max]`` per metric.

    The fold counterpart of :func:`format_table`: one row per model, each metric cell the mean
    and sample standard deviation across folds with the lowest and highest fold, in percent
    (see :func:`summarize_folds`); the last columns give the images (positive / negative) and
    the confusion matrix ``TP/FP/TN/FN`` summed over the folds.

    Args:
        folds: ``{model name: one EvaluationReport per fold}``, in display order.

    Returns:
        The table as a string (header, separator, rows, a note), ending with a newline.

    References:
        Chae et al., JIPS 2021, Table 2 (the metrics).
    """
    if not folds:
        raise ValueError("format_fold_table needs at least one model")
    first_reports = next(iter(folds.values()))
    spec = round(100 * first_reports[0].sensitivity_at)
    titles = [
        f"Sens@Spec{spec}" if k == "sensitivity_at_specificity" else t for k, t in _TABLE_COLUMNS
    ]
    headers = ["Model", *[f"{t} (%)" for t in titles], "n (pos/neg)", "TP/FP/TN/FN"]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|",
    ]
    for name, reports in folds.items():
        summary = summarize_folds(reports)
        cells = [name.replace("|", "\\|")]
        for key, _ in _TABLE_COLUMNS:
            s = summary["metrics"].get(key)
            if s is None or s["n_defined"] == 0:
                cells.append("n/a")
                continue
            spread = f" ± {100.0 * s['std']:.2f}" if math.isfinite(s["std"]) else ""
            cells.append(f"{_pct(s['mean'])}{spread} [{_pct(s['min'])}, {_pct(s['max'])}]")
        c = summary["counts"]
        cells.append(f"{c['n']} ({c['n_positive']}/{c['n_negative']})")
        cells.append(f"{c['tp']}/{c['fp']}/{c['tn']}/{c['fn']}")
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        f"Mean ± standard deviation [lowest, highest fold] over {len(first_reports)} folds, in "
        "percent; counts summed over the folds."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"
