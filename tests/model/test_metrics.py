import math

import numpy as np
import pytest

from model.metrics import (
    accuracy,
    accuracy_coverage_curve,
    auroc,
    confusion_matrix,
    error_analysis,
    expected_calibration_error,
    flagged_share,
    log_loss,
    min_confidence_for_accuracy,
    reliability_curve,
    threshold_for_share,
)

LABELS = np.array([0, 0, 1, 1])
PROBS = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.0, 1.0]])


def test_accuracy_and_confusion_matrix():
    assert accuracy(LABELS, PROBS) == 0.75
    assert confusion_matrix(LABELS, PROBS, 2).tolist() == [[1, 1], [0, 2]]


def test_log_loss_matches_hand_computation_and_clips():
    want = -(math.log(0.9) + math.log(0.4) + math.log(0.8) + math.log(1 - 1e-15)) / 4
    assert math.isclose(log_loss(LABELS, PROBS), want, rel_tol=1e-12)
    confident_wrong = np.array([[0.0, 1.0]])
    assert math.isclose(log_loss(np.array([0]), confident_wrong, eps=1e-15), -math.log(1e-15))
    assert math.isclose(log_loss(np.array([0]), confident_wrong, eps=0.01), -math.log(0.01))


def test_reliability_curve_bins_and_calibration_error():
    curve = reliability_curve(LABELS, PROBS, bins=2)
    # Confidences 0.9, 0.6, 0.8, 1.0 all fall in the upper bin; accuracy there is 3/4.
    assert [b["count"] for b in curve["bins"]] == [4]
    assert math.isclose(curve["bins"][0]["mean_confidence"], 0.825)
    assert math.isclose(curve["expected_calibration_error"], abs(0.75 - 0.825))


def test_expected_calibration_error_by_hand_with_guo_et_als_fifteen_bins():
    # Confidences (top probability) and right/wrong; bins of width 1/15, (m-1)/15 < c <= m/15:
    # 0.91 (right) and 0.92 (wrong) share (13/15, 14/15]: |(1 - 0.91) + (0 - 0.92)| = 0.83;
    # 0.62 (wrong) alone in (9/15, 10/15]: 0.62; 0.55 (right, class 1) in (8/15, 9/15]: 0.45;
    # 1.0 (right) in the last bin: 0. ECE = (0.83 + 0.62 + 0.45 + 0) / 5 = 0.38.
    labels = np.array([0, 1, 0, 1, 0])
    probabilities = np.array([[0.91, 0.09], [0.92, 0.08], [0.38, 0.62], [0.45, 0.55], [1.0, 0.0]])
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.38, abs=1e-12)
    curve = reliability_curve(labels, probabilities)
    assert curve["bin_count"] == 15 and curve["expected_calibration_error"] == pytest.approx(0.38)
    assert [(round(b["low"] * 15), b["count"], b["accuracy"]) for b in curve["bins"]] == [
        (8, 1, 1.0), (9, 1, 0.0), (13, 2, 0.5), (14, 1, 1.0)]
    # Two bins: every confidence is above 0.5, so one bin: |accuracy 3/5 - mean confidence 4/5|.
    assert expected_calibration_error(labels, probabilities, bins=2) == pytest.approx(0.2)
    # A bootstrap's resamples (rows of indices): each resample's own ECE.
    rows = np.array([[0, 0, 1, 4, 4], [2, 3, 3, 1, 0]])
    assert expected_calibration_error(labels, probabilities, rows=rows) == pytest.approx(
        [expected_calibration_error(labels[r], probabilities[r]) for r in rows])
    perfectly_calibrated = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(np.array([0, 0, 0, 1]), perfectly_calibrated) == 0.0


def test_error_analysis_orders_examples():
    groups = error_analysis(LABELS, PROBS, ["cat", "dog"])
    assert groups["cat"]["most_confident_correct"] == [0]
    assert groups["cat"]["most_confident_wrong"] == [1]
    assert groups["dog"]["most_confident_correct"] == [3, 2]
    assert groups["dog"]["least_confident"][0] == 2


def test_accuracy_coverage_curve_and_the_threshold_for_a_target_accuracy():
    # confidences 0.9 (right), 0.6 (wrong), 0.8 (right), 1.0 (right)
    curve = accuracy_coverage_curve(LABELS, PROBS)
    assert [(p["min_confidence"], p["coverage"], p["accuracy"]) for p in curve] == [
        (1.0, 0.25, 1.0), (0.9, 0.5, 1.0), (0.8, 0.75, 1.0), (0.6, 1.0, 0.75)]
    assert min_confidence_for_accuracy(curve, 0.99) == {
        "target_accuracy": 0.99, "min_confidence": 0.8, "coverage": 0.75, "accuracy": 1.0,
        "withheld": 0.25}
    assert min_confidence_for_accuracy(curve, 0.7)["min_confidence"] == 0.6
    wrong_when_sure = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert min_confidence_for_accuracy(accuracy_coverage_curve(np.array([0, 1]), wrong_when_sure),
                                       0.5) is None


def test_auroc_is_the_share_of_out_of_scope_in_scope_pairs_ranked_right_ties_halved():
    rng = np.random.default_rng(0)
    inside = np.round(rng.normal(0.3, 0.1, 40), 2)  # rounded: ties across the two groups
    outside = np.round(rng.normal(0.5, 0.1, 25), 2)
    pairs = outside[:, None] - inside[None, :]
    brute_force = (np.sum(pairs > 0) + 0.5 * np.sum(pairs == 0)) / pairs.size
    assert np.sum(pairs == 0) > 0
    assert auroc(inside, outside) == pytest.approx(brute_force, abs=1e-12)
    assert auroc([0.1, 0.2], [0.3, 0.4]) == 1.0 and auroc([0.3, 0.4], [0.1, 0.2]) == 0.0
    with pytest.raises(ValueError, match="at least one in-scope and one out-of-scope"):
        auroc([], [0.5])


@pytest.mark.parametrize("count, share, flagged", [(320, 0.01, 3), (100, 0.01, 1), (10, 0.01, 0),
                                                   (1000, 0.05, 50), (7, 0.0, 0)])
def test_the_threshold_flags_at_most_the_share_asked(count, share, flagged):
    scores = np.random.default_rng(count).permutation(np.linspace(0.0, 1.0, count))
    threshold = threshold_for_share(scores, share)
    assert np.sum(scores > threshold) == flagged
    assert flagged_share(scores, threshold) == pytest.approx(flagged / count)
    ranked = np.sort(scores)[::-1]
    if flagged:  # midway between the lowest score flagged and the highest left
        assert threshold == pytest.approx((ranked[flagged - 1] + ranked[flagged]) / 2)
    else:
        assert threshold == ranked[0]


def test_a_threshold_needs_scores_and_a_share_below_one():
    with pytest.raises(ValueError, match="share in"):
        threshold_for_share([0.1, 0.2], 1.0)
    with pytest.raises(ValueError, match="at least one score"):
        threshold_for_share([], 0.01)
