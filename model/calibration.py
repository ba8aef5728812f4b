"""Temperature scaling fitted at export, so that a probability means what it says.

A network's probabilities are often too confident (or, after heavy regularisation, too timid).
Temperature scaling (Guo et al., "On calibration of modern neural networks", ICML 2017) divides
the logits by one number T, fitted on labelled images the model was not trained on by
minimising the log loss: T > 1 softens, T < 1 sharpens, the top class never changes. The
exported model carries it as its last layer (``model.architecture.TemperatureScaling``), so the
SavedModel, ``model.tflite`` and ``model.keras`` all give the calibrated probabilities, and
``metadata.json`` records it (``calibration``).

A temperature is applied only when it lowers the log loss on images it was not fitted on: the
labelled images are split into two seeded halves, stratified by class; a temperature fitted on
one half is judged on the other, and the other way round (two-fold cross-fitting), so every
image is judged once by a temperature that did not see it. Only if that held-out log loss is
lower than the uncalibrated one is the temperature fitted on all the images put in the model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from model.architecture import SMALLEST_NORMAL_FLOAT32, TemperatureScaling
from model.data import readable_batches
from model.metrics import ECE_BINS, expected_calibration_error, log_loss
from serving.metadata import CALIBRATION_METHODS, ModelMetadata

_LOG = logging.getLogger(__name__)
# Fewer images than this cannot both fit and judge a temperature (two halves of at least 10).
MIN_IMAGES = 20
# log T is searched in this range: beyond it a model is hopeless, not miscalibrated.
TEMPERATURE_BOUNDS = (0.05, 20.0)
LAYER_NAME = "temperature_scaling"
PREDICT_BATCH = 64
HELD_OUT_METHOD = ("two-fold cross-fit: a seeded half of the images (stratified by class) fits a "
                   "temperature that the other half judges, and the other way round")


@dataclasses.dataclass(frozen=True)
class CalibrationRequest:
    """Labelled images to fit a temperature on: ``labels`` are indices into the model's class
    order; ``source`` says in the metadata and the log where they came from."""

    paths: Sequence[str]
    labels: Sequence[int]
    source: str
    seed: int = 0


def temperature_scale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(p) / temperature)`` per row of ``probabilities`` [n, classes], in float64:
    what ``TemperatureScaling`` computes inside the model. With ``1 / T`` it undoes a model's
    temperature ``T`` (the uncalibrated probabilities from the calibrated ones), exact up to
    float32 rounding of the model's outputs."""
    from scipy.special import softmax

    logits = np.log(np.maximum(np.asarray(probabilities, np.float64), SMALLEST_NORMAL_FLOAT32))
    return softmax(logits / temperature, axis=1)


def before_calibration(views: np.ndarray, temperature: float) -> np.ndarray:
    """What a model with ``temperature`` inside would give without it: for its probabilities
    float [views, n, classes] (one view, or an image and its mirror: ``serving.tta``), the
    mean over views of each view's probabilities with the temperature undone, float64
    [n, classes]. Undone per view, since the mean of the views is not a temperature away."""
    return np.mean([temperature_scale(view, 1.0 / temperature) for view in views], axis=0)


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The temperature in ``TEMPERATURE_BOUNDS`` minimising the log loss of
    ``temperature_scale(probabilities, T)`` on ``labels`` (int [n], the true classes): SciPy's
    bounded scalar search over log T (the loss is smooth and convex in 1 / T)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logits = np.log(np.maximum(np.asarray(probabilities, np.float64), SMALLEST_NORMAL_FLOAT32))
    rows = np.arange(len(labels))

    def loss(log_temperature: float) -> float:
        return float(-np.mean(log_softmax(logits / np.exp(log_temperature), axis=1)[rows, labels]))

    low, high = np.log(TEMPERATURE_BOUNDS)
    result = minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(result.x))


def halves(labels: np.ndarray, seed: int) -> np.ndarray:
    """Fold (0 or 1) of each image: per class, a seeded permutation of its images alternates."""
    folds = np.zeros(len(labels), np.int64)
    rng = np.random.default_rng(seed)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        folds[members[1::2]] = 1
    return folds


def judge_temperature(labels: np.ndarray, probabilities: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Fit a temperature on ``probabilities`` [n, classes] (the uncalibrated model's) against
    ``labels`` int [n] and judge it held out (the module's two-fold cross-fit): the metadata's
    ``calibration`` entry without its ``fit.source``. ``applied`` is true only when the held-out
    log loss is lower; ``temperature`` is then the one fitted on all images; with fewer than
    ``MIN_IMAGES`` nothing is fitted. Log loss with Kaggle's clipping, ECE with ``ECE_BINS``."""
    labels = np.asarray(labels, np.int64)
    entry: dict[str, Any] = {"method": CALIBRATION_METHODS[0], "applied": False, "temperature": None,
                             "fit": {"images": int(len(labels))}}
    if len(labels) < MIN_IMAGES:
        return {**entry, "reason": f"{len(labels)} labelled images, too few to fit a temperature "
                                   f"on half and judge it on the other (at least {MIN_IMAGES})"}
    folds = halves(labels, seed)
    held_out = np.empty_like(np.asarray(probabilities, np.float64))
    fold_temperatures = []
    for fold in (0, 1):
        fit, judged = folds == fold, folds != fold
        temperature = fit_temperature(labels[fit], probabilities[fit])
        held_out[judged] = temperature_scale(probabilities[judged], temperature)
        fold_temperatures.append(round(temperature, 6))
    before = log_loss(labels, np.asarray(probabilities, np.float64))
    after = log_loss(labels, held_out)
    temperature = fit_temperature(labels, probabilities)
    entry.update(temperature=round(temperature, 6), layer=LAYER_NAME, held_out={
        "method": HELD_OUT_METHOD, "images": int(len(labels)), "seed": seed,
        "fold_temperatures": fold_temperatures,
        "log_loss_before": round(before, 6), "log_loss_after": round(after, 6),
        "ece_before": round(expected_calibration_error(labels, probabilities), 6),
        "ece_after": round(expected_calibration_error(labels, held_out), 6), "ece_bins": ECE_BINS})
    if after < before:
        return {**entry, "applied": True}
    return {**entry, "reason": f"held out, the temperature raises the log loss from {before:.4f} to "
                               f"{after:.4f} (or leaves it): the model is kept as it is"}


def with_temperature(classifier: keras.Model, temperature: float) -> keras.Model:
    """``classifier`` (float pixels -> probabilities [batch, classes]) followed by a
    ``TemperatureScaling`` layer: the same inputs, calibrated probabilities out."""
    scaled = TemperatureScaling(temperature, name=LAYER_NAME)(classifier.output)
    return keras.Model(classifier.inputs, scaled, name=classifier.name)


def calibrate(classifier: keras.Model, request: CalibrationRequest, metadata: ModelMetadata,
              ) -> tuple[keras.Model, dict[str, Any]]:
    """``(model, entry)``: the probabilities-only ``classifier`` with the temperature judged on
    ``request``'s readable images (``judge_temperature``) as its last layer when it is applied,
    else ``classifier`` itself; and the metadata's ``calibration`` entry, logged either way.
    Images are read through ``metadata``'s preprocessing, as the scorer reads them. Raises
    ``ValueError`` when none of them can be read."""
    rows, labels = [], []
    for indices, pixels in readable_batches(request.paths, metadata, PREDICT_BATCH, "calibration"):
        rows.append(np.asarray(classifier.predict_on_batch(pixels.astype(np.float32)), np.float64))
        labels.extend(request.labels[index] for index in indices)
    if not rows:
        raise ValueError("calibration: none of the labelled images could be read")
    entry = judge_temperature(np.asarray(labels), np.concatenate(rows), request.seed)
    entry["fit"]["source"] = request.source
    _LOG.info("%s", describe(entry))
    if not entry["applied"]:
        return classifier, entry
    return with_temperature(classifier, entry["temperature"]), entry


def describe(entry: dict[str, Any]) -> str:
    """One line for the log and the commands' output: the temperature, applied or not, and why."""
    source = f"{entry['fit']['images']} images of {entry['fit'].get('source', 'labelled images')}"
    if entry["temperature"] is None:
        return f"calibration: not applied: {entry['reason']}"
    held_out = entry["held_out"]
    figures = (f"held out (two-fold cross-fit) log loss {held_out['log_loss_before']:.4f} -> "
               f"{held_out['log_loss_after']:.4f}, ECE {held_out['ece_before']:.4f} -> "
               f"{held_out['ece_after']:.4f}")
    if entry["applied"]:
        return f"calibration: temperature {entry['temperature']:.4f} fitted on {source}, applied: {figures}"
    return (f"calibration: temperature {entry['temperature']:.4f} fitted on {source}, not applied: "
            f"{figures}: {entry['reason']}")
