"""Mirrored scoring (test-time augmentation): each image scored as it is and mirrored left-right.

A photo of a cat is still a cat in a mirror, and a model's errors on the two views are partly
independent, so their mean is a better probability than either (issue 32's measurement on a
real MobileNetV2: log loss 0.0597 -> 0.0560). ``tta="flip"`` scores a batch twice from one
decode: the mirror is made from the decoded batch (``mirrored``), and the class probabilities
of the two views are averaged, by their arithmetic mean (``mean_of_views``): what did best in
the issue's measurement on MobileNetV2; on the real alpha 0.25 models the mean of the logits
(the renormalised geometric mean) was 0.0013-0.0014 lower in log loss, within noise on the 800
model's 400 held-out photos, and mixed in calibration error (docs/training.md,
``bench/calibration.py``). The out-of-scope score is that of the image as it is: a detector's
threshold was set on unmirrored images.

How a runtime runs the second pass: where one call on a larger batch is how it works best (a
GPU, TensorFlow, Keras/JAX), one inference call on the two views concatenated (2n images);
on LiteRT, whose interpreter runs a fixed number of images per invoke anyway, two passes.
Either way it costs one more inference per image and no more decoding.

Wiring: ``ServingModel.predict_outputs(images, tta="flip")`` (or ``predict_views`` for each
view's probabilities); ``TTA_MODES`` are the values a ``--tta`` flag takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

TTA_MODES = ("none", "flip")


class Views(NamedTuple):
    """Each view's probabilities for a batch of n images, and the out-of-scope score."""

    probabilities: np.ndarray  # float32 [views, n, classes]: the images as they are first
    scope_score: np.ndarray | None  # float32 [n], of the images as they are; None without one


def mirrored(images: np.ndarray) -> np.ndarray:
    """The batch uint8 [n, height, width, channels] mirrored left-right (``images[:, :, ::-1]``),
    as a new contiguous array, which every runtime needs: by OpenCV's vectorised flip of the
    batch's rows, not NumPy's copy of the reversed view, which moves 3-byte pixels one byte at a
    time (64 images of 224x224: 3 ms against 173 ms, as much as half of the alpha 0.25
    MobileNet's inference on the 2-core VM)."""
    import cv2

    count, height, width, channels = images.shape
    rows = np.ascontiguousarray(images).reshape(count * height, width, channels)
    return cv2.flip(rows, 1).reshape(images.shape)


def predict_views(predict: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]],
                  images: np.ndarray, tta: str, one_call: bool) -> Views:
    """The views ``tta`` asks for of ``images`` (uint8 [n, height, width, 3]), each scored by
    ``predict`` (uint8 batch -> (probabilities float32 [batch, classes], scope_score float32
    [batch] or None)): one view for ``"none"``; for ``"flip"`` the images and their mirror, in one
    call on the 2n images concatenated when ``one_call``, else in two calls. Raises
    ``ValueError`` for a mode not in ``TTA_MODES``."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta {tta!r} is not one of {TTA_MODES}")
    if tta == "none":
        probabilities, scope_score = predict(images)
        return Views(probabilities[np.newaxis], scope_score)
    count = len(images)
    if one_call:
        probabilities, scope_score = predict(np.concatenate([images, mirrored(images)]))
        return Views(np.stack([probabilities[:count], probabilities[count:]]),
                     None if scope_score is None else scope_score[:count])
    probabilities, scope_score = predict(images)
    flipped, _ = predict(mirrored(images))
    return Views(np.stack([probabilities, flipped]), scope_score)


def mean_of_views(probabilities: np.ndarray) -> np.ndarray:
    """The arithmetic mean over views of probabilities float [views, n, classes]: float32
    [n, classes], rows still summing to 1."""
    return np.mean(np.asarray(probabilities, np.float64), axis=0).astype(np.float32)
