"""An integer model for CPU scoring, opt-in: ``model_int8.tflite``, kept only if it holds up.

Full-integer post-training quantization (TFLite's converter: int8 weights with one scale per
output channel, int8 activations whose ranges come from calibration images, uint8 pixels in and
float32 probabilities out) runs about 2-3x faster than the float ``model.tflite`` on XNNPACK,
but it rounds every activation to one of 256 levels, so its probabilities differ. The candidate
is therefore scored on labelled validation images beside the float model and kept only if
accuracy drops by at most ``MAX_ACCURACY_DROP`` and log loss rises by at most
``MAX_LOG_LOSS_RISE``; the figures, the verdict and the model's own reference predictions are
recorded in ``metadata.json`` (``tflite_int8``) either way. Calibration and validation images
are read through the model's own preprocessing, so the ranges are those of the pixels it scores.

Its head is re-fitted to the integer base (``refit_head``): rounding moves the pooled features a
base gives (on the real alpha 0.25 MobileNet by about a fifth of their size), and a head trained
on float features reads them a little wrong. So when the model ends in a ``Dense`` head, as every
model ``model.train`` makes does, that head's weights are trained again, from the float ones,
on the integer base's own features of the labelled training images before the whole model is
converted; the float model keeps its head. On held-out real photos this closed the gap to float
(docs/integer-model.md, docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from model.architecture import final_dense_layer
from model.data import readable_batches
from model.metrics import accuracy, log_loss
from model.signature import write_saved_model
from serving.metadata import INT8_TFLITE_FILE, SAVED_MODEL_DIR, ModelMetadata, file_sha256
from serving.reference import INT8_REFERENCE_TOLERANCE, reference_batch, reference_predictions
from serving.runtimes import ServingModel, litert_predict

_LOG = logging.getLogger(__name__)
MAX_ACCURACY_DROP = 0.005
MAX_LOG_LOSS_RISE = 0.01
CALIBRATION_IMAGES = 300
VALIDATION_BATCH = 64
HEAD_FIT_EPOCHS = 10
HEAD_FIT_LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class Int8Request:
    """What an integer export needs: images to calibrate on, labelled images to judge on, and
    labelled training images to re-fit the head on (none: the head stays as trained)."""

    calibration_paths: Sequence[str]
    validation_paths: Sequence[str]
    validation_labels: Sequence[int]
    calibration_source: str
    validation_source: str
    max_accuracy_drop: float = MAX_ACCURACY_DROP
    max_log_loss_rise: float = MAX_LOG_LOSS_RISE
    head_paths: Sequence[str] = ()
    head_labels: Sequence[int] = ()
    head_epochs: int = HEAD_FIT_EPOCHS


def calibration_sample(paths: Sequence[str], seed: int, count: int = CALIBRATION_IMAGES) -> list[str]:
    """A seeded sample of up to ``count`` paths, spread over every class folder and name."""
    rng = np.random.default_rng(seed)
    return [paths[i] for i in sorted(rng.permutation(len(paths))[:count])]


def _images(paths: Sequence[str], metadata: ModelMetadata):
    return readable_batches(paths, metadata, VALIDATION_BATCH, "int8 export")


def _to_integer(model: keras.Model | str, pixels: list[np.ndarray]) -> bytes:
    """``model`` (a Keras model, or the directory of its serving SavedModel) as full integer, its
    activation ranges calibrated on ``pixels``."""
    import tensorflow as tf

    if not isinstance(model, str):  # the Keras model behind the serving signature's uint8 cast
        with tempfile.TemporaryDirectory(prefix="petscore-int8-") as directory:
            write_saved_model(model, directory)
            return _to_integer(directory, pixels)

    def representative_dataset():
        for image in pixels:
            yield [image[np.newaxis]]

    converter = tf.lite.TFLiteConverter.from_saved_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def refit_head(classifier: keras.Model, head: keras.layers.Dense, calibration: list[np.ndarray],
               request: Int8Request, metadata: ModelMetadata) -> dict[str, Any]:
    """Train ``head`` again, starting from its float weights, on the features that the integer
    base gives for the labelled training images (the weights are changed in place; the caller
    puts the float ones back). Returns what the metadata records."""
    from ai_edge_litert.interpreter import Interpreter

    base = litert_predict(Interpreter(
        model_content=_to_integer(keras.Model(classifier.inputs, head.input), calibration)))
    features, labels = [], []
    for indices, images in _images(request.head_paths, metadata):
        features.append(base(images)[0])
        labels.extend(request.head_labels[index] for index in indices)
    if not labels:
        raise ValueError("int8 export: none of the head's training images could be read")
    order = np.random.default_rng(0).permutation(len(labels))  # seeded: the same export twice
    tail = keras.Model(head.input, classifier.output)  # the head and any weight-free layers after it
    tail.compile(optimizer=keras.optimizers.Adam(HEAD_FIT_LEARNING_RATE),
                 loss="sparse_categorical_crossentropy")
    tail.fit(np.concatenate(features)[order], np.asarray(labels)[order], epochs=request.head_epochs,
             batch_size=32, shuffle=False, verbose=0)
    return {"refit": True, "images": len(labels), "epochs": request.head_epochs,
            "source": request.calibration_source}


def quantize(export_dir: str, metadata: ModelMetadata, request: Int8Request,
             classifier: keras.Model | None = None) -> tuple[bytes, int, dict[str, Any]]:
    """(flatbuffer, images calibrated on, head entry): the model converted to full integer, its
    head re-fitted to the integer base when it has a ``Dense`` head and labelled images for it."""
    pixels = [image for _, batch in _images(request.calibration_paths, metadata) for image in batch]
    if not pixels:
        raise ValueError("int8 export: none of the calibration images could be read")
    head = final_dense_layer(classifier)
    if head is None or not request.head_paths:
        why = "no labelled training images were given" if head is not None else (
            "its last layer with weights is not a Dense head")
        # The classifier alone: the exported SavedModel of a model with an out-of-scope detector
        # returns its score too, which the integer model does not carry.
        source = classifier if metadata.has_scope_detector else os.path.join(export_dir, SAVED_MODEL_DIR)
        return _to_integer(source, pixels), len(pixels), {"refit": False, "reason": why}
    trained = [weights.copy() for weights in head.get_weights()]
    try:
        entry = refit_head(classifier, head, pixels, request, metadata)
        return _to_integer(classifier, pixels), len(pixels), entry
    finally:
        head.set_weights(trained)


def validation_figures(float_model: ServingModel, int8_model: ServingModel, paths: Sequence[str],
                       labels: Sequence[int], metadata: ModelMetadata) -> dict[str, Any]:
    """Accuracy and log loss of both models on the readable validation images, in batches so
    that memory does not grow with the validation set."""
    kept, float_rows, int8_rows = [], [], []
    for indices, images in _images(paths, metadata):
        float_rows.append(float_model.predict(images))
        int8_rows.append(int8_model.predict(images))
        kept.extend(labels[index] for index in indices)
    if not kept:
        raise ValueError("int8 export: none of the validation images could be read")
    truth = np.asarray(kept)
    floats, int8s = np.concatenate(float_rows), np.concatenate(int8_rows)
    difference = np.abs(floats.astype(np.float64) - int8s)
    figures = {"images": len(kept), "float_runtime": float_model.runtime,
               "float_accuracy": accuracy(truth, floats), "int8_accuracy": accuracy(truth, int8s),
               "float_log_loss": log_loss(truth, floats), "int8_log_loss": log_loss(truth, int8s),
               "max_abs_diff": float(difference.max()), "mean_abs_diff": float(difference.mean()),
               "p99_abs_diff": float(np.quantile(difference, 0.99))}
    figures["accuracy_drop"] = figures["float_accuracy"] - figures["int8_accuracy"]
    figures["log_loss_rise"] = figures["int8_log_loss"] - figures["float_log_loss"]
    return {name: round(value, 6) if isinstance(value, float) else value
            for name, value in figures.items()}


def acceptance_failures(figures: dict[str, Any], max_accuracy_drop: float,
                        max_log_loss_rise: float) -> list[str]:
    """Why the integer model must not be kept; empty when it may."""
    failures = []
    if figures["accuracy_drop"] > max_accuracy_drop:
        failures.append(f"accuracy drops by {figures['accuracy_drop'] * 100:.2f} points "
                        f"(> {max_accuracy_drop * 100:g})")
    if figures["log_loss_rise"] > max_log_loss_rise:
        failures.append(f"log loss rises by {figures['log_loss_rise']:.4f} (> {max_log_loss_rise:g})")
    return failures


def export_int8(export_dir: str, metadata: ModelMetadata, request: Int8Request,
                classifier: keras.Model | None = None) -> dict[str, Any]:
    """Write ``model_int8.tflite`` into ``export_dir`` if it passes the acceptance rule; return the
    metadata entry, which says why when it was not kept. ``classifier``: the exported Keras model,
    whose head is re-fitted for the integer model (left as it was)."""
    path = os.path.join(export_dir, INT8_TFLITE_FILE)
    flatbuffer, calibrated, head = quantize(export_dir, metadata, request, classifier)
    with open(path, "wb") as handle:
        handle.write(flatbuffer)
    entry: dict[str, Any] = {
        "sha256": file_sha256(path),
        "calibration": {"images": calibrated, "source": request.calibration_source},
        "head": head,
        "acceptance": {"max_accuracy_drop": request.max_accuracy_drop,
                       "max_log_loss_rise": request.max_log_loss_rise},
    }
    candidate = dataclasses.replace(metadata, tflite_int8={**entry, "kept": True})  # on trial
    int8_model = ServingModel(export_dir, candidate, runtime="tflite-int8")
    float_model = ServingModel(export_dir, metadata, runtime="tflite" if metadata.tflite else "saved_model")
    figures = validation_figures(float_model, int8_model, request.validation_paths,
                                 request.validation_labels, metadata)
    entry["validation"] = {"source": request.validation_source, **figures}
    failures = acceptance_failures(figures, request.max_accuracy_drop, request.max_log_loss_rise)
    summary = f"on {figures['images']} validation images: {compared(figures)}"
    if failures:
        os.remove(path)
        reason = f"{' and '.join(failures)} {summary}"
        _LOG.warning("%s not kept: %s; score with the float runtimes", INT8_TFLITE_FILE, reason)
        return {**entry, "kept": False, "reason": reason, "sha256": None}
    probabilities = int8_model.predict(reference_batch(metadata.height, metadata.width))
    _LOG.info("%s kept: %s", INT8_TFLITE_FILE, summary)
    return {**entry, "kept": True, "reference_tolerance": INT8_REFERENCE_TOLERANCE,
            "reference_predictions": reference_predictions(probabilities)}


def describe_int8(entry: dict[str, Any]) -> str:
    """One line for the command's output: kept or not, and why."""
    if not entry["kept"]:
        return f"{INT8_TFLITE_FILE} not kept: {entry['reason']}"
    figures = entry["validation"]
    head = entry.get("head", {})  # models exported before the head was re-fitted have none
    refit = f" (its head re-fitted on {head['images']} training images)" if head.get("refit") else ""
    return (f"{INT8_TFLITE_FILE} kept{refit}: {compared(figures)} on {figures['images']} "
            "validation images")


def compared(figures: dict[str, Any]) -> str:
    """Float against integer, as the log and the commands' output say it."""
    return (f"accuracy {figures['float_accuracy']:.4f} -> {figures['int8_accuracy']:.4f}, "
            f"log loss {figures['float_log_loss']:.4f} -> {figures['int8_log_loss']:.4f}")
