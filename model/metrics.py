"""Classification metrics used by evaluation: plain numpy, so they are easy to check by hand."""

from __future__ import annotations

import numpy as np

KAGGLE_EPS = 1e-15
# Confidence bins of the expected calibration error: Guo et al. (ICML 2017) used 15.
ECE_BINS = 15


def accuracy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    return float(np.mean(np.argmax(probabilities, axis=1) == labels))


def log_loss(labels: np.ndarray, probabilities: np.ndarray, eps: float = KAGGLE_EPS) -> float:
    """Mean negative log probability of the true class, probabilities clipped to [eps, 1-eps]
    (for two classes this is exactly Kaggle's dogs-vs-cats metric on P(dog))."""
    return float(np.mean(log_losses(labels, probabilities, eps)))


def log_losses(labels: np.ndarray, probabilities: np.ndarray, eps: float = KAGGLE_EPS) -> np.ndarray:
    """Each image's term of ``log_loss`` (for paired comparisons of two models)."""
    true_class = probabilities[np.arange(len(labels)), labels]
    return -np.log(np.clip(true_class, eps, 1 - eps))


def confusion_matrix(labels: np.ndarray, probabilities: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, np.argmax(probabilities, axis=1)), 1)
    return matrix


def _confidence_bins(probabilities: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(each image's confidence, its top-class probability, float64 [n]; its bin, int [n]):
    ``bins`` equal-width bins ((m-1)/M, m/M] as Guo et al. define them (0 joins the first)."""
    confidence = np.asarray(probabilities, np.float64).max(axis=1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    return confidence, np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS,
                               rows: np.ndarray | None = None) -> float | np.ndarray:
    """The expected calibration error (ECE) of Guo et al., "On calibration of modern neural
    networks" (ICML 2017), eq. 3: each image's confidence (its top-class probability) falls in
    one of ``bins`` equal-width bins ((m-1)/M, m/M]; the ECE is the mean over bins of
    |accuracy - mean confidence| weighted by the bin's share of the images, which is
    (1/n) sum over bins of |sum over the bin's images of (correct - confidence)|. In [0, 1]: 0
    when each bin's accuracy equals its mean confidence.

    ``labels`` int [n], ``probabilities`` float [n, classes]: a float. With ``rows`` int
    [resamples, m], indices into the images (a bootstrap's resamples), the ECE of each resample,
    float64 [resamples]."""
    confidence, index = _confidence_bins(probabilities, bins)
    gap = (np.argmax(probabilities, axis=1) == np.asarray(labels)) - confidence
    if rows is None:
        return float(np.abs(np.bincount(index, weights=gap, minlength=bins)).sum() / len(gap))
    rows = np.asarray(rows)
    flat = (index[rows] + bins * np.arange(len(rows))[:, np.newaxis]).ravel()
    sums = np.bincount(flat, weights=gap[rows].ravel(), minlength=bins * len(rows))
    return np.abs(sums.reshape(len(rows), bins)).sum(axis=1) / rows.shape[1]


def reliability_curve(labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> dict:
    """The reliability diagram: per confidence bin (``expected_calibration_error``'s bins), the
    mean confidence and the accuracy (the share of its images whose top class is the true one).
    ``labels`` int [n], ``probabilities`` float [n, classes]. Returns ``{"bins": [{"low", "high",
    "count", "mean_confidence", "accuracy"}, ...] (non-empty bins only), "bin_count": bins,
    "expected_calibration_error": float}``."""
    confidence, index = _confidence_bins(probabilities, bins)
    correct = np.argmax(probabilities, axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = [{"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(np.sum(index == b)),
             "mean_confidence": float(confidence[index == b].mean()),
             "accuracy": float(correct[index == b].mean())}
            for b in range(bins) if np.any(index == b)]
    return {"bins": rows, "bin_count": bins,
            "expected_calibration_error": expected_calibration_error(labels, probabilities, bins)}


def headline_metrics(labels: np.ndarray, probabilities: np.ndarray, eps: float = KAGGLE_EPS) -> dict:
    """Accuracy, log loss (clipped at ``eps``) and expected calibration error (``ECE_BINS``
    bins) of ``probabilities`` float [n, classes] against ``labels`` int [n], as floats."""
    return {"accuracy": accuracy(labels, probabilities), "log_loss": log_loss(labels, probabilities, eps),
            "expected_calibration_error": expected_calibration_error(labels, probabilities)}


def error_analysis(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str],
                   per_group: int = 6) -> dict[str, dict[str, list[int]]]:
    """Per true class, indices of the most confident correct, the least confident (closest to a
    coin toss) and the most confident wrong predictions."""
    predicted = np.argmax(probabilities, axis=1)
    true_prob = probabilities[np.arange(len(labels)), labels]
    result = {}
    for label, name in enumerate(class_names):
        members = np.flatnonzero(labels == label)
        right = members[predicted[members] == label]
        wrong = members[predicted[members] != label]
        top = probabilities[members].max(axis=1)
        result[name] = {
            "most_confident_correct": right[np.argsort(-true_prob[right])][:per_group].tolist(),
            "least_confident": members[np.argsort(top)][:per_group].tolist(),
            "most_confident_wrong": wrong[np.argsort(true_prob[wrong])][:per_group].tolist(),
        }
    return result


def accuracy_coverage_curve(labels: np.ndarray, probabilities: np.ndarray) -> list[dict]:
    """What withholding buys: for every threshold t that the data distinguishes (each distinct
    confidence, highest first), the share of images with confidence >= t (``coverage``: scored
    rather than withheld, as ``--min-confidence t`` would) and the accuracy among them."""
    confidence = probabilities.max(axis=1)
    correct = np.argmax(probabilities, axis=1) == labels
    order = np.argsort(-confidence, kind="stable")
    descending = confidence[order]
    right_so_far = np.cumsum(correct[order])
    thresholds = np.unique(descending)[::-1]
    kept = np.searchsorted(-descending, -thresholds, side="right")  # images with confidence >= t
    return [{"min_confidence": float(t), "coverage": float(k / len(labels)),
             "accuracy": float(right_so_far[k - 1] / k)}
            for t, k in zip(thresholds, kept, strict=True)]


def min_confidence_for_accuracy(curve: list[dict], target: float) -> dict | None:
    """The smallest threshold whose kept images reach ``target`` accuracy (the most coverage at
    that accuracy), with its coverage and the share withheld; None when no threshold reaches it."""
    reaching = [point for point in curve if point["accuracy"] >= target]
    if not reaching:
        return None
    best = min(reaching, key=lambda point: point["min_confidence"])
    return {"target_accuracy": target, **best, "withheld": 1.0 - best["coverage"]}


def auroc(in_scope: np.ndarray, out_of_scope: np.ndarray) -> float:
    """Area under the ROC curve of a score meant to be higher out of scope: the probability that
    an out-of-scope image scores above an in-scope one, ties counting one half. Computed as the
    Mann-Whitney U statistic of the out-of-scope scores over ``len(in) * len(out)`` (scipy; the
    AUROC is that statistic normalised, Hanley & McNeil 1982). Raises ``ValueError`` when either
    side is empty."""
    from scipy.stats import mannwhitneyu

    in_scope, out_of_scope = np.asarray(in_scope, np.float64), np.asarray(out_of_scope, np.float64)
    if not len(in_scope) or not len(out_of_scope):
        raise ValueError("AUROC needs scores of at least one in-scope and one out-of-scope image")
    statistic = mannwhitneyu(out_of_scope, in_scope, alternative="two-sided").statistic
    return float(statistic / (len(in_scope) * len(out_of_scope)))


def threshold_for_share(scores: np.ndarray, share: float) -> float:
    """A threshold that flags (score strictly above it) at most ``share`` of ``scores``: with
    ``m = floor(share * n)`` images to flag, the midpoint between the ``m``-th highest score and
    the next one, so that a runtime that computes a score a few ulps apart does not move an image
    across it; with none to flag (fewer than ``1 / share`` scores), the highest score. With 320
    held-out images and ``share`` 0.01 it flags the 3 highest (0.94%). Raises ``ValueError`` on
    no scores or a share outside [0, 1)."""
    scores = np.sort(np.asarray(scores, np.float64))[::-1]
    if not len(scores) or not 0.0 <= share < 1.0:
        raise ValueError(f"a threshold needs at least one score and a share in [0, 1), got "
                         f"{len(scores)} scores and share {share}")
    flag = int(np.floor(share * len(scores)))
    return float(scores[0] if flag == 0 else (scores[flag - 1] + scores[flag]) / 2)


def flagged_share(scores: np.ndarray, threshold: float) -> float:
    """The share of ``scores`` strictly above ``threshold`` (what scoring flags out of scope)."""
    return float(np.mean(np.asarray(scores) > threshold)) if len(scores) else 0.0
