"""Metrics against scikit-learn and the GradNorm/ODIN reference implementation."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import sklearn.metrics as sk
import torch

from gradood import metrics as M
from gradood.errors import InputError


# ------------------------------------------------------------------------------------- references
def _labels_scores(s_id, s_ood):
    s_id, s_ood = np.asarray(s_id, float), np.asarray(s_ood, float)
    return np.r_[np.ones(s_id.size), np.zeros(s_ood.size)], np.r_[s_id, s_ood]


def sk_fpr_at_tpr(s_id, s_ood, tpr):
    """Documented definition: first point of sklearn's full ROC curve with TPR >= tpr."""
    y, s = _labels_scores(s_id, s_ood)
    fpr_c, tpr_c, _ = sk.roc_curve(y, s, drop_intermediate=False)
    return fpr_c[np.argmax(tpr_c >= tpr)]


def sk_detection_error(s_id, s_ood):
    y, s = _labels_scores(s_id, s_ood)
    fpr_c, tpr_c, _ = sk.roc_curve(y, s, drop_intermediate=False)
    return np.min(0.5 * (1 - tpr_c) + 0.5 * fpr_c)


def gradnorm_fpr_and_fdr_at_recall(y_true, y_score, recall_level=0.95, pos_label=1.0):
    """Re-implementation of GradNorm's / Hendrycks' ``fpr_and_fdr_at_recall`` (returns the FPR only)."""
    y_true = y_true == pos_label
    desc = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[desc], y_true[desc]
    distinct_value_indices = np.where(np.diff(y_score))[0]
    threshold_idxs = np.r_[distinct_value_indices, y_true.size - 1]
    tps = np.cumsum(y_true, dtype=np.float64)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    recall = tps / tps[-1]
    last_ind = tps.searchsorted(tps[-1])
    sl = slice(last_ind, None, -1)
    recall, fps = np.r_[recall[sl], 1], np.r_[fps[sl], 0]
    cutoff = np.argmin(np.abs(recall - recall_level))
    return fps[cutoff] / np.sum(np.logical_not(y_true))


def openood_v15_fpr(s_id, s_ood, tpr=0.95):
    """OpenOOD v1.5 ``auc_and_fpr_recall``: OOD positive, negated confidence."""
    y, s = _labels_scores(s_id, s_ood)
    fpr_c, tpr_c, _ = sk.roc_curve(1 - y, -s)
    return fpr_c[np.argmax(tpr_c >= tpr)]


def _cases():
    rng = np.random.default_rng(0)
    yield "gauss", rng.normal(1.0, 1.0, 731), rng.normal(0.0, 1.5, 419)
    yield "gauss_mult20", rng.normal(0.5, 1.0, 1000), rng.normal(0.0, 1.0, 800)
    yield "tied_int", rng.integers(0, 6, 523).astype(float), rng.integers(-2, 4, 311).astype(float)
    yield "tied_coarse", rng.integers(0, 3, 40).astype(float), rng.integers(0, 3, 33).astype(float)
    yield "tiny", np.array([0.3]), np.array([0.1, 0.3])
    yield "float32", rng.normal(0, 1, 300).astype(np.float32), rng.normal(-0.3, 1, 200).astype(np.float32)


CASES = list(_cases())
IDS = [c[0] for c in CASES]


# ------------------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("name,s_id,s_ood", CASES, ids=IDS)
def test_against_sklearn(name, s_id, s_ood):
    y, s = _labels_scores(s_id, s_ood)
    assert M.auroc(s_id, s_ood) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    assert M.aupr_in(s_id, s_ood) == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)
    assert M.aupr_out(s_id, s_ood) == pytest.approx(sk.average_precision_score(1 - y, -s), abs=1e-12)
    for tpr in (0.95, 0.8, 0.5, 1.0, 0.01):
        assert M.fpr_at_tpr(s_id, s_ood, tpr) == sk_fpr_at_tpr(s_id, s_ood, tpr)
    assert M.fpr95(s_id, s_ood) == sk_fpr_at_tpr(s_id, s_ood, 0.95)
    assert M.fpr80(s_id, s_ood) == sk_fpr_at_tpr(s_id, s_ood, 0.80)
    assert M.detection_error(s_id, s_ood) == pytest.approx(sk_detection_error(s_id, s_ood), abs=1e-12)


@pytest.mark.parametrize("name,s_id,s_ood", CASES, ids=IDS)
def test_roc_curve_matches_sklearn(name, s_id, s_ood):
    y, s = _labels_scores(s_id, s_ood)
    f_ref, t_ref, th_ref = sk.roc_curve(y, s, drop_intermediate=False)
    f, t, th = M.roc_curve(s_id, s_ood)
    np.testing.assert_allclose(f, f_ref)
    np.testing.assert_allclose(t, t_ref)
    np.testing.assert_array_equal(th[1:], th_ref[1:].astype(float))  # sklearn's first is +inf (>= 1.3)
    assert th[0] == np.inf


@pytest.mark.parametrize("name,s_id,s_ood", CASES, ids=IDS)
def test_nearest_rule_reproduces_gradnorm(name, s_id, s_ood):
    y, s = _labels_scores(s_id, s_ood)
    for level in (0.95, 0.8, 0.5):
        ref = gradnorm_fpr_and_fdr_at_recall(y, s, level)
        assert M.fpr_at_tpr(s_id, s_ood, level, rule="nearest") == pytest.approx(ref, abs=1e-15)


def test_gradnorm_vs_ours_when_95_is_hit_exactly():
    # n_id = 1000, continuous scores: TPR is exactly 0.95 for any threshold in (s_951, s_950] (the 950th and
    # 951st largest ID scores). Ours takes the strictest such threshold (fewest OOD accepted), GradNorm's
    # tie-break the loosest (every OOD above s_951). They differ by the OOD samples in that gap.
    name, s_id, s_ood = CASES[1]
    y, s = _labels_scores(s_id, s_ood)
    desc = np.sort(s_id)[::-1]
    assert M.fpr95(s_id, s_ood) == np.mean(s_ood >= desc[949])
    assert gradnorm_fpr_and_fdr_at_recall(y, s, 0.95) == np.mean(s_ood > desc[950])
    assert M.fpr_at_tpr(s_id, s_ood, rule="nearest") == np.mean(s_ood > desc[950])


def test_gradnorm_can_sit_below_the_target_and_ours_not():
    # 41 ID samples: TPR steps of 1/41. At target 0.935 the nearest point is 38/41 = 0.927 (below the
    # target), ours is the first point at or above it, 39/41 = 0.951. OOD tied with ID: one ROC point per
    # value, so GradNorm's tie-break toward looser thresholds plays no role here.
    s_id = np.arange(41, dtype=float)
    s_ood = s_id.copy()
    nearest = M.fpr_at_tpr(s_id, s_ood, 0.935, rule="nearest")
    at_least = M.fpr_at_tpr(s_id, s_ood, 0.935)
    assert (nearest, at_least) == (38 / 41, 39 / 41)


def test_openood_and_pytorch_ood_mapping():
    name, s_id, s_ood = CASES[0]
    # OpenOOD v1.5 / pytorch-ood FPR95 (OOD positive) = ours with roles swapped and scores negated
    assert M.fpr_at_tpr(-s_ood, -s_id, 0.95) == openood_v15_fpr(s_id, s_ood)
    # pytorch-ood AUROC: OOD positive, outlier score = -ours: same value
    y, s = _labels_scores(s_id, s_ood)
    assert M.auroc(s_id, s_ood) == pytest.approx(sk.roc_auc_score(1 - y, -s), abs=1e-12)


# ------------------------------------------------------------------------------------- extremes
def test_perfect_separation():
    s_id, s_ood = np.linspace(1, 2, 50), np.linspace(-2, -1, 70)
    r = M.evaluate(s_id, s_ood)
    assert r == {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr80": 0.0,
                 "detection_error": 0.0}


def test_reversed_separation():
    s_id, s_ood = np.linspace(-2, -1, 50), np.linspace(1, 2, 70)
    r = M.evaluate(s_id, s_ood)
    assert r["auroc"] == 0.0
    assert r["fpr95"] == 1.0 and r["fpr80"] == 1.0
    assert r["detection_error"] == 0.5  # never better than rejecting everything
    y, s = _labels_scores(s_id, s_ood)
    assert r["aupr_in"] == pytest.approx(sk.average_precision_score(y, s))


def test_all_tied_is_chance():
    r = M.evaluate(np.zeros(10), np.zeros(7))
    assert r["auroc"] == 0.5 and r["fpr95"] == 1.0 and r["detection_error"] == 0.5
    assert r["aupr_in"] == pytest.approx(10 / 17)


def test_torch_and_list_inputs():
    a, b = [3.0, 2.0, 1.0], [0.5, 2.0]
    ref = M.evaluate(a, b)
    assert M.evaluate(torch.tensor(a), torch.tensor(b)) == ref
    assert M.evaluate(torch.tensor(a, dtype=torch.bfloat16), torch.tensor(b, dtype=torch.float16)) == ref
    assert M.evaluate(torch.tensor(a, requires_grad=True), np.array(b)) == ref
    assert M.evaluate(np.array([3, 2, 1]), np.array([0, 2])) == M.evaluate([3, 2, 1], [0.0, 2.0])


def test_values_are_python_floats():
    r = M.evaluate([1.0, 2.0], [0.0], bootstrap=10)
    assert set(r) == set(M.METRIC_KEYS) | {f"{k}_ci" for k in M.METRIC_KEYS}
    for k in M.METRIC_KEYS:
        assert type(r[k]) is float and 0.0 <= r[k] <= 1.0
        assert isinstance(r[f"{k}_ci"], tuple) and all(type(v) is float for v in r[f"{k}_ci"])


def test_top_level_evaluate():
    import gradood

    assert gradood.evaluate([1.0, 2.0], [0.0]) == M.evaluate([1.0, 2.0], [0.0])


# ------------------------------------------------------------------------------------- bootstrap
def _gauss(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.0, n)


@pytest.mark.parametrize("fn", [M.auroc, M.fpr95, M.fpr80, M.aupr_in, M.aupr_out, M.detection_error,
                                functools.partial(M.fpr_at_tpr, tpr=0.9, rule="nearest")])
def test_bootstrap_ci_contains_point_and_matches_loop(fn):
    s_id, s_ood = _gauss(300)
    lo, hi = M.bootstrap_ci(fn, s_id, s_ood, n_boot=300, seed=3)
    assert lo <= fn(s_id, s_ood) <= hi and lo < hi
    # The vectorised path evaluates exactly the resamples the per-call fallback draws.
    loop = M.bootstrap_ci(lambda a, b: fn(a, b), s_id, s_ood, n_boot=300, seed=3)
    assert (lo, hi) == pytest.approx(loop, abs=1e-12)


def test_bootstrap_ci_shrinks_with_more_samples():
    small = M.bootstrap_ci(M.auroc, *_gauss(200), n_boot=400)
    large = M.bootstrap_ci(M.auroc, *_gauss(5000), n_boot=400)
    assert (large[1] - large[0]) < 0.5 * (small[1] - small[0])


def test_bootstrap_deterministic_and_level():
    s = _gauss(400)
    assert M.bootstrap_ci(M.auroc, *s, seed=1) == M.bootstrap_ci(M.auroc, *s, seed=1)
    wide = M.bootstrap_ci(M.auroc, *s, level=0.99)
    narrow = M.bootstrap_ci(M.auroc, *s, level=0.5)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_evaluate_bootstrap_matches_bootstrap_ci():
    s_id, s_ood = _gauss(500)
    r = M.evaluate(s_id, s_ood, bootstrap=200, seed=7)
    for key, fn in [("auroc", M.auroc), ("fpr95", M.fpr95), ("aupr_out", M.aupr_out)]:
        assert r[f"{key}_ci"] == pytest.approx(M.bootstrap_ci(fn, s_id, s_ood, n_boot=200, seed=7))
        assert r[f"{key}_ci"][0] <= r[key] <= r[f"{key}_ci"][1]


def test_bootstrap_chunking_is_invisible(monkeypatch):
    s_id, s_ood = _gauss(300)
    ref = M.bootstrap_ci(M.auroc, s_id, s_ood, n_boot=50, seed=5)
    loop = M.bootstrap_ci(lambda a, b: M.auroc(a, b), s_id, s_ood, n_boot=50, seed=5)
    monkeypatch.setattr(M, "_BOOT_CELLS", 1000)  # forces one resample per chunk
    assert M.bootstrap_ci(M.auroc, s_id, s_ood, n_boot=50, seed=5) == pytest.approx(ref, abs=1e-12)
    assert ref == pytest.approx(loop, abs=1e-12)


def test_bootstrap_is_fast():
    import time

    s_id, s_ood = _gauss(10_000)
    t0 = time.perf_counter()
    M.evaluate(s_id, s_ood, bootstrap=1000)
    assert time.perf_counter() - t0 < 20  # ~2 s on a 2-core machine; a per-resample loop takes far longer


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("s_id,s_ood,needle", [
    ([], [1.0], "scores_id is empty"),
    ([1.0], np.array([]), "scores_ood is empty"),
    ([1.0, np.nan], [0.0], "scores_id contains 1 NaN"),
    ([1.0], [0.0, np.inf, -np.inf], "scores_ood contains 0 NaN and 2 infinite"),
    (np.ones((3, 2)), [0.0], "must be 1-D"),
    (np.ones((3, 1)), [0.0], "reshape(-1)"),
    (1.0, [0.0], "must be 1-D"),
    (["a", "b"], [0.0], "real numbers"),
    ([1 + 2j], [0.0], "real numbers"),
    ([[1.0], [1.0, 2.0]], [0.0], "scores_id"),
])
def test_bad_input(s_id, s_ood, needle):
    for fn in (M.auroc, M.fpr95, M.evaluate, M.roc_curve):
        with pytest.raises(InputError) as err:
            fn(s_id, s_ood)
        assert needle in str(err.value)


def test_bad_arguments():
    with pytest.raises(InputError, match="fraction"):
        M.fpr_at_tpr([1.0], [0.0], 95)
    with pytest.raises(InputError, match="fraction"):
        M.fpr_at_tpr([1.0], [0.0], 0.0)
    with pytest.raises(InputError, match="rule"):
        M.fpr_at_tpr([1.0], [0.0], rule="closest")
    with pytest.raises(InputError, match="n_boot"):
        M.bootstrap_ci(M.auroc, [1.0], [0.0], n_boot=0)
    with pytest.raises(InputError, match="level"):
        M.bootstrap_ci(M.auroc, [1.0], [0.0], level=95)
    with pytest.raises(InputError, match="n_boot"):
        M.evaluate([1.0], [0.0], bootstrap=-5)
    assert issubclass(InputError, ValueError)
