from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from patchssl.metrics import (
    BOOTSTRAP_METRICS,
    VERDICTS,
    EvaluationReport,
    binary_metrics,
    bootstrap_ci,
    bootstrap_samples,
    choose_threshold,
    clopper_pearson_ci,
    confusion_counts,
    evaluate_predictions,
    format_fold_table,
    format_table,
    paired_difference,
    sensitivity_at_specificity,
    summarize_folds,
)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@st.composite
def _labelled_scores(draw: st.DrawFn, min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(min_size, 40))
    y = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    # A coarse grid of scores produces many ties, which is where AUC implementations differ.
    coarse = draw(st.booleans())
    if coarse:
        s = np.array(draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))) / 5.0
    else:
        s = np.array(
            draw(
                st.lists(
                    st.floats(0, 1, allow_nan=False, allow_subnormal=False),
                    min_size=n,
                    max_size=n,
                )
            )
        )
    return y, s


def _sklearn_reference(y: np.ndarray, s: np.ndarray, t: float) -> dict[str, float]:
    pred = (s >= t).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    ref = {
        "accuracy": accuracy_score(y, pred),
        "sensitivity": recall_score(y, pred, zero_division=np.nan),
        "specificity": recall_score(y, pred, pos_label=0, zero_division=np.nan),
        "precision": precision_score(y, pred, zero_division=np.nan),
        "f1": f1_score(y, pred, zero_division=np.nan),
        "auc": roc_auc_score(y, s) if len(set(y.tolist())) == 2 else float("nan"),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }
    return {k: float(v) for k, v in ref.items()}


@settings(max_examples=150, deadline=None)
@given(data=_labelled_scores(), t=st.sampled_from([0.0, 0.2, 0.5, 0.6, 1.0]))
def test_binary_metrics_match_sklearn(data: tuple[np.ndarray, np.ndarray], t: float) -> None:
    y, s = data
    out = binary_metrics(y, s, threshold=t)
    ref = _sklearn_reference(y, s, t)
    for key, value in ref.items():
        assert _same(float(out[key]), value), (key, out[key], value)
    assert out["n"] == len(y)
    assert out["n_positive"] == int(y.sum())
    assert out["n_negative"] == len(y) - int(y.sum())
    assert out["auc_defined"] == (0 < y.sum() < len(y))


def test_confusion_counts_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    tn, fp, fn, tp = confusion_matrix(y, p, labels=[0, 1]).ravel()
    assert confusion_counts(y, p) == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert confusion_counts([True, False], [True, True]) == {"tp": 1, "fp": 1, "tn": 0, "fn": 0}


def test_torch_inputs_match_numpy() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 30)
    s = rng.random(30).astype(np.float32)
    a = binary_metrics(torch.from_numpy(y), torch.from_numpy(s).requires_grad_(), 0.4)
    b = binary_metrics(y, s, 0.4)
    assert a == b
    assert (
        binary_metrics(torch.from_numpy(y).bool(), torch.from_numpy(s).bfloat16(), 0.4)["n"] == 30
    )


def test_nan_instead_of_exceptions() -> None:
    # Only negatives: sensitivity and AUC undefined.
    out = binary_metrics([0, 0, 0], [0.1, 0.7, 0.2], 0.5)
    assert math.isnan(out["sensitivity"]) and math.isnan(out["auc"])
    assert out["auc_defined"] is False
    assert out["specificity"] == pytest.approx(2 / 3)
    # Nothing predicted positive: precision undefined, F1 defined (= 0) since there are positives.
    out = binary_metrics([0, 1, 1], [0.1, 0.2, 0.3], 0.9)
    assert math.isnan(out["precision"])
    assert out["f1"] == 0.0 and out["sensitivity"] == 0.0
    # Empty input: every ratio nan.
    out = binary_metrics([], [], 0.5)
    assert all(math.isnan(out[k]) for k in ("accuracy", "specificity", "precision", "auc"))
    assert out["n"] == 0


def test_bad_inputs_are_explained() -> None:
    with pytest.raises(ValueError, match="binary"):
        binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"probs\[:, 1\]"):
        binary_metrics([0, 1], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        binary_metrics([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="3 entries"):
        binary_metrics([0, 1], [0.1, 0.2, 0.3])


def _slow_sens_at_spec(y: np.ndarray, s: np.ndarray, target: float) -> float:
    best = 0.0
    for t in [*np.unique(s).tolist(), math.inf]:
        pred = s >= t
        spec = np.sum(~pred & (y == 0)) / np.sum(y == 0)
        sens = np.sum(pred & (y == 1)) / np.sum(y == 1)
        if spec >= target - 1e-12:
            best = max(best, sens)
    return best


@settings(max_examples=100, deadline=None)
@given(data=_labelled_scores(min_size=2), target=st.sampled_from([0.0, 0.5, 0.8, 0.9, 1.0]))
def test_sensitivity_at_specificity_matches_reference(
    data: tuple[np.ndarray, np.ndarray], target: float
) -> None:
    y, s = data
    sens, thr = sensitivity_at_specificity(y, s, target)
    if y.sum() in (0, len(y)):
        assert math.isnan(sens) and math.isnan(thr)
        return
    assert sens == pytest.approx(_slow_sens_at_spec(y, s, target))
    applied = binary_metrics(y, s, thr)
    assert applied["sensitivity"] == pytest.approx(sens)
    assert applied["specificity"] >= target - 1e-12


def test_choose_threshold_on_separable_toy_set() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    s = np.array([0.05, 0.1, 0.2, 0.3, 0.7, 0.8, 0.95])
    for criterion, target in [("youden", None), ("f1", None), ("specificity", 0.9)]:
        t = choose_threshold(y, s, criterion=criterion, target=target)
        assert 0.3 < t <= 0.7, criterion
        out = binary_metrics(y, s, t)
        assert out["accuracy"] == 1.0
    # Youden puts it in the middle of the gap.
    assert choose_threshold(y, s) == pytest.approx(0.5)


@settings(max_examples=60, deadline=None)
@given(data=_labelled_scores(min_size=2))
def test_choose_threshold_reaches_the_best_objective(data: tuple[np.ndarray, np.ndarray]) -> None:
    y, s = data
    if y.sum() in (0, len(y)):
        with pytest.raises(ValueError, match="both classes"):
            choose_threshold(y, s)
        return
    candidates = [*np.unique(s).tolist(), math.inf]
    best_j = max(
        binary_metrics(y, s, t)["sensitivity"] + binary_metrics(y, s, t)["specificity"] - 1
        for t in candidates
    )
    got = binary_metrics(y, s, choose_threshold(y, s))
    assert got["sensitivity"] + got["specificity"] - 1 == pytest.approx(best_j)
    best_f1 = max(np.nan_to_num(binary_metrics(y, s, t)["f1"], nan=-1) for t in candidates)
    assert binary_metrics(y, s, choose_threshold(y, s, criterion="f1"))["f1"] == pytest.approx(
        best_f1
    )


def test_choose_threshold_argument_errors() -> None:
    y, s = [0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]
    with pytest.raises(ValueError, match="target="):
        choose_threshold(y, s, criterion="specificity")
    with pytest.raises(ValueError, match="criterion"):
        choose_threshold(y, s, criterion="accuracy")
    with pytest.raises(ValueError, match="only used"):
        choose_threshold(y, s, target=0.9)


def _toy(n_patients: int = 40, per_patient: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients), per_patient)
    patient_label = rng.integers(0, 2, n_patients)
    y = patient_label[groups]
    # Images of one patient share a patient effect: they are correlated.
    effect = rng.normal(0, 1.0, n_patients)[groups]
    s = 1 / (1 + np.exp(-(1.5 * (2 * y - 1) + effect + 0.3 * rng.normal(size=y.size))))
    return y, s, groups


def test_bootstrap_is_deterministic_with_a_seed() -> None:
    y, s, g = _toy()
    a = bootstrap_ci(y, s, threshold=0.5, groups=g, n_boot=200, seed=7)
    b = bootstrap_ci(y, s, threshold=0.5, groups=g, n_boot=200, seed=7)
    c = bootstrap_ci(y, s, threshold=0.5, groups=g, n_boot=200, seed=8)
    assert a == b
    assert a != c
    assert set(a) == set(BOOTSTRAP_METRICS)


def test_ci_contains_point_estimate() -> None:
    y, s, g = _toy(n_patients=60)
    point = binary_metrics(y, s, 0.5)
    ci = bootstrap_ci(y, s, threshold=0.5, groups=g, n_boot=500)
    for name in ("accuracy", "specificity", "sensitivity", "precision", "f1", "auc"):
        low, high = ci[name]
        assert low <= point[name] <= high, name
        assert high - low > 0


def _slow_bootstrap(y, s, groups, threshold, n_boot, seed, target):
    """Reference: explicit resamples built patient by patient, scored with sklearn."""
    keys, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(keys))]
    draws = np.random.default_rng(seed).integers(0, len(keys), size=(n_boot, len(keys)))
    rows = []
    for d in draws:
        idx = np.concatenate([members[k] for k in d])  # every drawn patient, all their images
        yy, ss = y[idx], s[idx]
        row = _sklearn_reference(yy, ss, threshold)
        row["sensitivity_at_specificity"] = (
            _slow_sens_at_spec(yy, ss, target) if 0 < yy.sum() < len(yy) else float("nan")
        )
        rows.append(row)
    return rows


@pytest.mark.parametrize("grouped", [True, False])
def test_bootstrap_matches_slow_resampling_reference(grouped: bool) -> None:
    rng = np.random.default_rng(1)
    n_patients = 9
    sizes = rng.integers(1, 5, n_patients)  # unequal numbers of images per patient
    groups = np.repeat(np.array([f"p{i}" for i in range(n_patients)]), sizes)
    y = rng.integers(0, 2, groups.size)
    s = rng.integers(0, 6, groups.size) / 5.0  # ties
    n_boot = 60
    fast = bootstrap_samples(
        y, s, threshold=0.5, groups=groups if grouped else None, n_boot=n_boot, seed=3
    )
    ref_groups = groups if grouped else np.arange(groups.size)
    slow = _slow_bootstrap(y, s, ref_groups, 0.5, n_boot, 3, 0.9)
    for name in BOOTSTRAP_METRICS:
        expected = np.array([row[name] for row in slow])
        np.testing.assert_allclose(fast[name], expected, rtol=1e-9, atol=1e-12, err_msg=name)


def test_patient_resampling_is_wider_for_correlated_images() -> None:
    # 30 patients x 6 near-identical images: the effective sample size is 30, not 180.
    y, s, g = _toy(n_patients=30, per_patient=6, seed=2)
    by_patient = bootstrap_ci(y, s, threshold=0.5, groups=g, n_boot=400)
    by_image = bootstrap_ci(y, s, threshold=0.5, n_boot=400)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(by_patient["accuracy"]) > 1.5 * width(by_image["accuracy"])


def test_bootstrap_skips_single_class_resamples_for_auc() -> None:
    y = np.array([0, 0, 0, 0, 0, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.9])
    samples = bootstrap_samples(y, s, threshold=0.5, n_boot=300, seed=0)
    assert np.isnan(samples["auc"]).any()  # some resamples miss the positive image
    assert np.isfinite(samples["auc"]).any()
    low, high = bootstrap_ci(y, s, threshold=0.5, n_boot=300, seed=0)["auc"]
    assert math.isfinite(low) and math.isfinite(high)
    all_neg = bootstrap_ci([0, 0, 0], [0.1, 0.2, 0.3], threshold=0.5, n_boot=50)
    assert all(math.isnan(v) for v in all_neg["auc"])


def test_bootstrap_argument_errors() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        bootstrap_ci([0, 1], [0.2, 0.8], threshold=0.5, metrics=("auroc",))
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([0, 1], [0.2, 0.8], threshold=0.5, alpha=5)
    with pytest.raises(ValueError, match="groups"):
        bootstrap_ci([0, 1], [0.2, 0.8], threshold=0.5, groups=[1, 2, 3])


def test_evaluate_predictions_report_and_table() -> None:
    y, s, g = _toy()
    report = evaluate_predictions(y, s, threshold=0.5, groups=g, n_boot=200, sensitivity_at=0.8)
    assert isinstance(report, EvaluationReport)
    point = binary_metrics(y, s, 0.5)
    assert report.metrics["accuracy"] == point["accuracy"]
    assert report.metrics["sensitivity_at_specificity"] == sensitivity_at_specificity(y, s, 0.8)[0]
    assert report.counts["n_groups"] == 40 and report.resampled_by == "patient"
    assert report.counts["tp"] == point["tp"]
    d = report.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["ci"]["accuracy"][0] <= d["metrics"]["accuracy"] <= d["ci"]["accuracy"][1]

    degenerate = evaluate_predictions([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.9], threshold=0.5, n_boot=20)
    assert degenerate.auc_defined is False
    d = degenerate.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["metrics"]["auc"] is None

    table = format_table({"SSL+AL": report, "Baseline": degenerate})
    lines = table.splitlines()
    assert lines[0].startswith("| Model | Accuracy (%)")
    assert "Sens@Spec80" in lines[0]
    assert lines[2].startswith("| SSL+AL | ")
    acc = report.metrics["accuracy"] * 100
    lo, hi = (100 * v for v in report.ci["accuracy"])
    assert f"{acc:.2f} [{lo:.2f}, {hi:.2f}]" in lines[2]
    assert "n/a" in lines[3]
    assert f"{len(y)} ({int(y.sum())}/{len(y) - int(y.sum())})" in lines[2]
    assert report.to_markdown_row("SSL+AL") == lines[2]


def test_evaluate_without_bootstrap() -> None:
    report = evaluate_predictions([0, 1, 0, 1], [0.1, 0.9, 0.4, 0.6], threshold=0.5, n_boot=0)
    assert report.metrics["accuracy"] == 1.0
    assert all(math.isnan(lo) and math.isnan(hi) for lo, hi in report.ci.values())
    assert report.format_metric("accuracy") == "100.00 [n/a, n/a]"


# --------------------------------------------------------------------------------------------
# Exact intervals
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("x", "n"), [(21, 21), (0, 21), (0, 1), (7, 20), (1, 3), (50, 51)])
def test_clopper_pearson_matches_scipy(x: int, n: int) -> None:
    from scipy.stats import binomtest

    expected = binomtest(x, n).proportion_ci(confidence_level=0.95, method="exact")
    assert clopper_pearson_ci(x, n) == pytest.approx((expected.low, expected.high), abs=1e-12)


def test_clopper_pearson_edges_in_closed_form() -> None:
    low, high = clopper_pearson_ci(21, 21)
    assert (
        high == 1.0
        and low == pytest.approx(0.025 ** (1 / 21))
        and low == pytest.approx(0.8389, abs=1e-4)
    )
    assert clopper_pearson_ci(0, 21) == pytest.approx((0.0, 1 - 0.025 ** (1 / 21)))
    assert all(math.isnan(v) for v in clopper_pearson_ci(0, 0))
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson_ci(5, 3)


def test_import_patchssl_does_not_load_scipy_stats() -> None:
    import subprocess
    import sys

    code = "import sys, patchssl, patchssl.metrics; print('scipy.stats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_report_replaces_a_degenerate_interval_by_an_exact_one() -> None:
    # 21 negatives of 7 patients, all correctly negative; positives partly missed.
    groups = np.repeat(np.arange(12), 3)
    y = (groups >= 7).astype(int)  # patients 7..11 positive: 15 images
    s = np.where(y == 1, np.tile([0.9, 0.8, 0.2], 12), 0.1)
    by_image = evaluate_predictions(y, s, threshold=0.5, n_boot=300)
    assert by_image.metrics["specificity"] == 1.0
    assert by_image.ci_method["specificity"] == "exact" and by_image.ci_units["specificity"] == 21
    assert by_image.ci["specificity"] == pytest.approx((0.025 ** (1 / 21), 1.0))
    assert by_image.ci_method["sensitivity"] == "bootstrap"
    # The raw percentile bootstrap is the collapsed point that the report must not print.
    assert bootstrap_ci(y, s, threshold=0.5, n_boot=300)["specificity"] == (1.0, 1.0)
    # Resampled by patient: the exact interval counts the 7 negative patients, not 21 images.
    by_patient = evaluate_predictions(y, s, threshold=0.5, groups=groups, n_boot=300)
    assert by_patient.ci_units["specificity"] == 7
    assert by_patient.ci["specificity"] == pytest.approx((0.025 ** (1 / 7), 1.0))
    assert by_patient.metrics["precision"] == 1.0 and by_patient.ci_units["precision"] == 5
    table = format_table({"model": by_patient})
    assert "100.00 [100.00, 100.00]" not in table and "0.00 [0.00, 0.00]" not in table
    assert f"100.00 [{100 * 0.025 ** (1 / 7):.2f}, 100.00]†" in table
    assert "Clopper-Pearson" in table
    d = by_patient.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["ci_method"]["specificity"] == "exact" and d["ci_units"]["specificity"] == 7


def test_report_never_prints_a_degenerate_interval() -> None:
    # Perfect separation: every proportion at 100%, and AUC / F1 at 100% with no exact interval.
    groups = np.repeat(np.arange(8), 2)
    y = (groups % 2).astype(int)
    s = np.where(y == 1, 0.8, 0.2)
    report = evaluate_predictions(y, s, threshold=0.5, groups=groups, n_boot=200)
    row = report.to_markdown_row("perfect")
    for lo_hi in ("[100.00, 100.00]", "[0.00, 0.00]"):
        assert lo_hi not in row
    assert report.format_metric("auc") == "100.00 [–]" and report.ci_method["auc"] == "degenerate"
    assert report.ci_method["accuracy"] == "exact"
    assert "[–]" in format_table({"perfect": report})


# --------------------------------------------------------------------------------------------
# Paired comparison
# --------------------------------------------------------------------------------------------


def _direct_paired_auc(y, a, b, groups, n_boot, seed, alpha=0.05):
    """Reference: resample patients by hand, score both models with sklearn on each resample."""
    keys, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(keys))]
    draws = np.random.default_rng(seed).integers(0, len(keys), size=(n_boot, len(keys)))
    diffs = []
    for d in draws:
        idx = np.concatenate([members[k] for k in d])
        if 0 < y[idx].sum() < len(idx):
            diffs.append(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
    diffs = np.array(diffs)
    value = roc_auc_score(y, a) - roc_auc_score(y, b)
    return value, tuple(np.quantile(diffs, [alpha / 2, 1 - alpha / 2])), len(diffs)


def test_paired_difference_matches_a_direct_computation() -> None:
    y, s, g = _toy(n_patients=15, per_patient=3, seed=4)
    rng = np.random.default_rng(5)
    other = np.clip(s + rng.normal(0, 0.25, s.size), 0, 1)
    out = paired_difference(y, s, other, groups=g, metric="auc", n_boot=300, seed=2)
    value, (lo, hi), n_valid = _direct_paired_auc(y, s, other, g, 300, 2)
    assert out.value == pytest.approx(value)
    assert out.ci == pytest.approx((lo, hi))
    assert out.n_valid == n_valid and out.resampled_by == "patient"
    assert out.value_a == pytest.approx(roc_auc_score(y, s))
    expected = "better" if lo > 0 else "worse" if hi < 0 else VERDICTS[2]
    assert out.verdict == expected
    json.dumps(out.to_dict(), allow_nan=False)


def test_paired_difference_verdicts() -> None:
    y, s, g = _toy(n_patients=60, per_patient=2, seed=1)
    noise = np.random.default_rng(0).random(s.size)  # a useless model
    better = paired_difference(y, s, noise, groups=g, n_boot=300)
    assert better.verdict == "better" and better.ci[0] > 0
    worse = paired_difference(y, noise, s, groups=g, n_boot=300)
    assert worse.verdict == "worse" and worse.ci[1] < 0
    assert worse.value == pytest.approx(-better.value)
    same = paired_difference(y, s, s, groups=g, n_boot=100)
    assert same.value == 0.0 and same.ci == (0.0, 0.0) and same.verdict == VERDICTS[2]
    assert "no difference detectable at this size" in str(same)
    # Threshold metrics: each model's own threshold; paired on the same resamples.
    acc = paired_difference(
        y, s, noise, groups=g, metric="accuracy", threshold_a=0.5, threshold_b=0.5, n_boot=200
    )
    expected = binary_metrics(y, s, 0.5)["accuracy"] - binary_metrics(y, noise, 0.5)["accuracy"]
    assert acc.value == pytest.approx(expected)
    samples_a = bootstrap_samples(y, s, threshold=0.5, groups=g, n_boot=200, metrics=("accuracy",))
    samples_b = bootstrap_samples(
        y, noise, threshold=0.5, groups=g, n_boot=200, metrics=("accuracy",)
    )
    diff = samples_a["accuracy"] - samples_b["accuracy"]
    assert acc.ci == pytest.approx(tuple(np.quantile(diff, [0.025, 0.975])))


def test_paired_difference_argument_errors() -> None:
    with pytest.raises(ValueError, match="threshold_a"):
        paired_difference([0, 1], [0.2, 0.8], [0.3, 0.7], metric="accuracy")
    with pytest.raises(ValueError, match="scores_b has 3 entries"):
        paired_difference([0, 1], [0.2, 0.8], [0.3, 0.7, 0.1])
    with pytest.raises(ValueError, match="unknown metric"):
        paired_difference([0, 1], [0.2, 0.8], [0.3, 0.7], metric="auroc")
    undefined = paired_difference([0, 0, 0], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1], n_boot=20)
    assert undefined.verdict == "undefined"


# ------------------------------------------------------------------------------------- folds
def _fold_reports(num_folds: int, seed: int) -> list[EvaluationReport]:
    rng = np.random.default_rng(seed)
    reports = []
    for _ in range(num_folds):
        y = rng.integers(0, 2, 20)
        y[:2] = [0, 1]
        reports.append(evaluate_predictions(y, rng.uniform(size=20), threshold=0.5, n_boot=0))
    return reports


def test_summarize_folds_matches_a_python_reference() -> None:
    reports = _fold_reports(3, seed=0)
    summary = summarize_folds(reports)
    assert summary["folds"] == 3
    for metric in ("accuracy", "sensitivity", "auc"):
        values = [r.metrics[metric] for r in reports]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        s = summary["metrics"][metric]
        assert s["mean"] == pytest.approx(mean) and s["std"] == pytest.approx(std)
        assert (s["min"], s["max"], s["n_defined"]) == (min(values), max(values), 3)
    c = summary["counts"]
    assert c["n"] == 60 and c["tp"] + c["fp"] + c["tn"] + c["fn"] == 60
    assert c["n_positive"] == sum(r.counts["n_positive"] for r in reports)


def test_summarize_folds_leaves_out_undefined_folds() -> None:
    reports = _fold_reports(2, seed=1)
    # A one-class test fold has no AUC and no sensitivity.
    reports.append(evaluate_predictions([0, 0, 0], [0.1, 0.7, 0.4], threshold=0.5, n_boot=0))
    s = summarize_folds(reports)["metrics"]
    assert s["auc"]["n_defined"] == 2
    assert s["auc"]["mean"] == pytest.approx(np.mean([r.metrics["auc"] for r in reports[:2]]))
    assert s["specificity"]["n_defined"] == 3
    one = summarize_folds(reports[:1])["metrics"]["accuracy"]
    assert math.isnan(one["std"]) and one["mean"] == reports[0].metrics["accuracy"]
    with pytest.raises(ValueError, match="at least one"):
        summarize_folds([])


def test_format_fold_table_rows_and_cells() -> None:
    folds = {"scratch": _fold_reports(3, seed=2), "ssl | al": _fold_reports(3, seed=3)}
    markdown = format_fold_table(folds)
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(rows) == 3  # the header and one line per model
    assert rows[2].startswith("| ssl \\| al |")  # a pipe in a name is escaped
    acc = [100 * r.metrics["accuracy"] for r in folds["scratch"]]
    cell = rows[1].split(" | ")[1]
    assert cell == (
        f"{np.mean(acc):.2f} ± {np.std(acc, ddof=1):.2f} [{min(acc):.2f}, {max(acc):.2f}]"
    )
    n_pos = sum(r.counts["n_positive"] for r in folds["scratch"])
    assert rows[1].split(" | ")[-2] == f"60 ({n_pos}/{60 - n_pos})"
    assert "over 3 folds" in markdown
