"""Export a trained Keras classifier under the model contract (see ``serving.metadata``)."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import shutil
import tempfile
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from model.architecture import probabilities_only
from model.calibration import CalibrationRequest, calibrate
from model.data import readable_batches
from model.out_of_scope import FEATURE_BATCH, ScopeRequest, attach_detector, set_threshold
from model.quantize import Int8Request, export_int8
from model.signature import write_saved_model
from serving.metadata import (
    KERAS_FILE,
    METADATA_FILE,
    SAVED_MODEL_DIR,
    TFLITE_FILE,
    ModelMetadata,
    file_sha256,
    saved_model_sha256,
    write_metadata,
)
from serving.preprocessing import PREPROCESSING_VERSION
from serving.reference import reference_batch, reference_predictions
from serving.runtimes import ServingModel

_LOG = logging.getLogger(__name__)
TFLITE_TOLERANCE = 1e-4
TFLITE_CHECK_SEEDS = tuple(range(100, 116))


def export_tflite(export_dir: str, metadata: ModelMetadata,
                  saved_model: ServingModel) -> dict[str, Any] | None:
    """Convert the SavedModel to ``model.tflite`` and keep it only if it agrees with the loaded
    ``saved_model`` within ``TFLITE_TOLERANCE`` on 16 generated images, in probabilities and in
    the out-of-scope score when the model has one; return its metadata entry."""
    path = os.path.join(export_dir, TFLITE_FILE)
    converter = tf.lite.TFLiteConverter.from_saved_model(os.path.join(export_dir, SAVED_MODEL_DIR))
    try:
        flatbuffer = converter.convert()
    except Exception as error:  # noqa: BLE001 - an op LiteRT lacks: the SavedModel still serves
        _LOG.warning("model.tflite not exported: the converter failed (%s: %s); the model scores "
                     "on the SavedModel runtime", type(error).__name__, str(error).splitlines()[0])
        return None
    with open(path, "wb") as handle:
        handle.write(probabilities_first(flatbuffer))
    entry = {"sha256": file_sha256(path)}
    candidate = dataclasses.replace(metadata, tflite=entry)
    images = reference_batch(metadata.height, metadata.width, TFLITE_CHECK_SEEDS)
    want = saved_model.predict_outputs(images)
    got = ServingModel(export_dir, candidate, runtime="tflite").predict_outputs(images)
    worst = max(float(np.max(np.abs(mine - theirs)))
                for mine, theirs in zip(got, want, strict=True) if theirs is not None)
    if worst > TFLITE_TOLERANCE:
        _LOG.warning("model.tflite differs from the SavedModel by %.2e (> %g): not exported",
                     worst, TFLITE_TOLERANCE)
        os.remove(path)
        return None
    return {**entry, "max_abs_diff_vs_saved_model": worst}


def probabilities_first(flatbuffer: bytes) -> bytes:
    """The flatbuffer with ``probabilities`` as its first output. The converter lists a detector's
    ``scope_score`` first; every petscore scorer before the detector reads output 0, so with the
    probabilities there an older worker scores a newer model as before (without its score).
    Outputs are named in the ``serving_default`` signature, which this leaves as it is."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    signature = next((s for s in model.signatureDefs or [] if s.signatureKey == b"serving_default"), None)
    if signature is None or len(signature.outputs) < 2:
        return flatbuffer
    subgraph = model.subgraphs[signature.subgraphIndex]
    first = next(t.tensorIndex for t in signature.outputs if t.name == b"probabilities")
    subgraph.outputs = [first, *(index for index in subgraph.outputs if index != first)]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def check_export_dir(export_dir: str) -> None:
    """Refuse, before any work, an ``export_dir`` that an export would destroy without meaning
    to: an existing file, or a directory holding anything but a model (no ``metadata.json``).
    An earlier model there is replaced (a re-export under the same name), which is logged.
    Raises ``ValueError`` in one line saying what to do."""
    if os.path.isfile(export_dir):
        raise ValueError(f"--output {export_dir} is a file: give a directory for the model")
    if not os.path.isdir(export_dir) or not os.listdir(export_dir):
        return
    if not os.path.exists(os.path.join(export_dir, METADATA_FILE)):
        raise ValueError(f"--output {export_dir} holds files that are not a petscore model (no "
                         f"{METADATA_FILE}), which the export would delete: give a new or empty "
                         "directory")
    _LOG.info("%s holds a model: the export replaces it", export_dir)


def export_model(
    classifier: keras.Model,
    export_dir: str,
    *,
    class_names: list[str],
    base: str,
    base_weights: str,
    model_version: str,
    resize_method: str = "bilinear",
    preprocessing: str = PREPROCESSING_VERSION,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    save_keras: bool = True,
    int8: Int8Request | None = None,
    scope: ScopeRequest | None = None,
    calibration: CalibrationRequest | None = None,
) -> ModelMetadata:
    """Write ``saved_model/``, ``model.keras`` (unless ``save_keras`` is false: a model wrapping
    another SavedModel), ``model.tflite``, with ``int8`` ``model_int8.tflite`` if it passes its
    validation (``model.quantize``), and ``metadata.json``. ``classifier`` maps float pixels
    [batch, height, width, 3] in [0, 255] to probabilities; one exported with a detector and
    loaded back counts as its probabilities alone.

    The SavedModel's ``serving_default`` takes ``images``: uint8 [batch, height, width, 3]
    and returns ``probabilities``: float32 [batch, classes]. With ``scope``, an out-of-scope
    detector is fitted on the classifier's own features (``model.out_of_scope``; none, with a
    log line, when the classifier does not end in a ``Dense`` layer): every float artefact also
    returns ``scope_score`` float32 [batch], its threshold is set on ``scope.held_out_paths`` as
    the exported SavedModel scores them, and ``metadata.json`` records it (``out_of_scope``). The
    integer model does not carry it. With ``calibration``, a temperature is fitted on its labelled
    images and, when it lowers their log loss held out, becomes the classifier's last layer
    (``model.calibration``), before the detector is attached (which reads the head's input, not
    its output) and in every artefact, the integer model's too; ``metadata.json`` records the fit
    either way (``calibration``). Everything is written to a sibling temporary directory
    first and moved into place, so a reader never sees half a model; ``check_export_dir``
    refuses a directory that holds anything else.
    """
    check_export_dir(export_dir)
    classifier = probabilities_only(classifier)  # a re-export fits its own detector, or none
    height, width = classifier.input_shape[1:3]
    parent = os.path.dirname(os.path.abspath(export_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        draft = ModelMetadata(
            model_version=model_version,
            class_names=list(class_names),
            input_size=[int(height), int(width)],
            resize_method=resize_method,
            preprocessing=preprocessing,
            base=base,
            base_weights=base_weights,
            sha256="",
            training=training or {},
            metrics=metrics or {},
            created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )
        calibrated = None
        if calibration is not None:
            classifier, calibrated = calibrate(classifier, calibration, draft)
        served, detector = attach_detector(classifier, scope, draft) if scope else (classifier, None)
        keras_entry = None
        if save_keras:
            served.save(os.path.join(staging, KERAS_FILE))
            keras_entry = {"sha256": file_sha256(os.path.join(staging, KERAS_FILE))}
        write_saved_model(served, os.path.join(staging, SAVED_MODEL_DIR))
        draft = dataclasses.replace(draft, sha256=saved_model_sha256(staging), keras=keras_entry,
                                    out_of_scope=detector, calibration=calibrated)
        # Reference predictions and the threshold come from the exported artefact itself, as a
        # scorer will load it.
        saved_model = ServingModel(staging, draft, runtime="saved_model")
        if detector is not None:
            draft = dataclasses.replace(draft, out_of_scope=set_threshold(
                detector, _scope_scores(saved_model, scope.held_out_paths), scope))
        references = saved_model.predict_outputs(reference_batch(height, width))
        tflite = export_tflite(staging, draft, saved_model)
        metadata = dataclasses.replace(draft, tflite=tflite,
                                       reference_predictions=reference_predictions(*references))
        if int8 is not None:
            metadata = dataclasses.replace(
                metadata, tflite_int8=export_int8(staging, metadata, int8, classifier))
        write_metadata(staging, metadata)
        if os.path.exists(export_dir):
            shutil.rmtree(export_dir)
        os.replace(staging, export_dir)
        return metadata
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)


def _scope_scores(model: ServingModel, paths) -> np.ndarray:
    """The exported model's own ``scope_score`` for every readable image of ``paths``."""
    batches = readable_batches(paths, model.metadata, FEATURE_BATCH, "out-of-scope threshold")
    scores = [model.predict_outputs(pixels).scope_score for _, pixels in batches]
    if not scores:
        raise ValueError("out-of-scope threshold: none of the held-out images could be read")
    return np.concatenate(scores)
