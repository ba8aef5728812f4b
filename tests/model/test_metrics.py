import math

import numpy as np

from model.metrics import accuracy, confusion_matrix, error_analysis, log_loss, reliability_curve

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
