import math

import numpy as np

from model.metrics import (
    accuracy,
    accuracy_coverage_curve,
    confusion_matrix,
    error_analysis,
    log_loss,
    min_confidence_for_accuracy,
    reliability_curve,
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
