"""Load an exported model for scoring and prove it still honours its metadata.

Two runtimes execute the same exported model:
- ``saved_model``: the SavedModel's ``serving_default`` signature through ``tf.saved_model.load``
  (GPU when one is visible). It executes no deserialised Python, but a SavedModel is still a
  TensorFlow graph: load only models from a location you trust (docs/model-contract.md).
- ``tflite``: ``model.tflite``, converted from that SavedModel at export and checked against it,
  run by LiteRT's XNNPACK kernels: about 4x faster than TF on CPU for MobileNets.
- ``tflite-int8``: ``model_int8.tflite``, the opt-in full-integer model (``model.quantize``),
  about 2-3x faster again on CPU; its probabilities differ from the float runtimes' (by the
  figures its metadata records), so it runs only when asked for, never by ``auto``.
``auto`` picks ``saved_model`` on a GPU and ``tflite`` on a CPU when the export has one.

A model with an out-of-scope detector (``metadata.out_of_scope``) has a second output,
``scope_score``, that the float runtimes compute in the same inference call
(``ServingModel.predict_outputs``); the integer model does not carry it.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from apache_beam.io.filesystems import FileSystems

from serving.metadata import (
    INT8_TFLITE_FILE,
    SAVED_MODEL_DIR,
    SCOPE_SCORE,
    TFLITE_FILE,
    ModelContractError,
    ModelMetadata,
    file_chunks,
)
from serving.reference import REFERENCE_TOLERANCE, SCOPE_REFERENCE_TOLERANCE, reference_batch

_LOG = logging.getLogger(__name__)
RUNTIMES = ("auto", "saved_model", "tflite", "tflite-int8")
LITERT_FILES = {"tflite": TFLITE_FILE, "tflite-int8": INT8_TFLITE_FILE}
# Images per LiteRT invoke. XNNPACK runs a network layer by layer over the whole invoke, so a
# small one keeps each layer's activations in the CPU's caches. On the 2-vCPU VM, 4 images per
# invoke against 64 (two runs of bench/inference.py --batch-sizes 64): MobileNetV2 1.0 float
# 1.25-1.44x, integer 1.15-1.17x; MobileNet alpha 0.25 float 1.59-1.60x, integer 1.15-1.18x;
# within 10% of the best size for each of the four.
LITERT_INVOKE_BATCH = 4


def gpu_possible() -> bool:
    """False when TensorFlow cannot see a GPU here: on Linux, no ``/dev/nvidiaN`` device node.

    Answering that without importing TensorFlow spares CPU workers on the LiteRT runtime
    TensorFlow's import: seconds of start-up and about 500 MiB per process.
    """
    return sys.platform != "linux" or bool(glob.glob("/dev/nvidia[0-9]*"))


def configure_devices() -> str:
    """Set up GPUs for scoring and say what runs: "GPU xN", or "CPU" (also when TensorFlow is
    not installed: a slim worker image with LiteRT alone scores on its CPU).

    Memory growth lets co-located processes share a GPU. TF32 is turned off: Ampere and newer
    GPUs run float32 convolutions in TF32 by default, which on an H100 moved a MobileNet's
    probabilities by up to 4.4e-3 from the CPU runtimes (8e-4 on the reference images, near
    the 1e-3 check) and a ResNet50's by up to 1.3e-2, where float32 stays within 6e-6
    (bench/inference.py, bench/gpu_precision.py). Float32 costs ResNet50 two thirds of its
    GPU rate (9,500 -> 3,100 images/s on an H100), still above what 16 cores decode.
    """
    if not gpu_possible():
        return "CPU"
    try:
        import tensorflow as tf
    except ImportError:
        return "CPU"
    tf.config.experimental.enable_tensor_float_32_execution(False)

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised in this process: growth was set then
            pass
    return f"GPU x{len(gpus)}" if gpus else "CPU"


def choose_runtime(requested: str, metadata: ModelMetadata, device: str) -> str:
    if requested not in RUNTIMES:
        raise ValueError(f"runtime {requested!r} is not one of {RUNTIMES}")
    if requested == "tflite" and not metadata.tflite:
        raise ModelContractError("runtime 'tflite' requested but the export has no model.tflite")
    if requested == "tflite-int8" and not metadata.int8_kept:
        reason = (metadata.tflite_int8 or {}).get("reason")
        raise ModelContractError(
            f"runtime 'tflite-int8' requested but the export has no {INT8_TFLITE_FILE}"
            + (f": it was not kept at export because {reason}" if reason else
               ": export it with `model.train --int8` or `model.package --int8-images DIR`")
            + "; score with --runtime auto")
    if requested != "auto":
        return requested
    return "tflite" if metadata.tflite and device == "CPU" else "saved_model"


class Outputs(NamedTuple):
    """What one inference call gives for a batch of n images."""

    probabilities: np.ndarray  # float32 [n, classes], in the metadata's class order
    # float32 [n]: the out-of-scope score, flagged above ``metadata.out_of_scope["threshold"]``;
    # None when the model has no detector, or on a runtime that does not carry it (tflite-int8).
    scope_score: np.ndarray | None


class ServingModel:
    """An exported model ready to score: ``predict(uint8 batch) -> probabilities``, or
    ``predict_outputs(uint8 batch) -> Outputs`` for the out-of-scope score as well."""

    def __init__(self, model_dir: str, metadata: ModelMetadata, runtime: str = "auto",
                 tflite_threads: int = 0, tflite_invoke_batch: int = LITERT_INVOKE_BATCH):
        self.metadata = metadata
        # LiteRT runs on the CPU: an explicit request for it needs no device probing (nor TF).
        self.device = "CPU" if runtime in LITERT_FILES else configure_devices()
        self.runtime = choose_runtime(runtime, metadata, self.device)
        # The integer model's features are quantized and its export fits no detector to them.
        self.scope_output = (metadata.out_of_scope["output"]
                             if metadata.has_scope_detector and self.runtime != "tflite-int8" else None)
        outputs = [metadata.signature_output, *([self.scope_output] if self.scope_output else [])]
        if self.runtime in LITERT_FILES:
            self._predict = _load_tflite(f"{model_dir.rstrip('/')}/{LITERT_FILES[self.runtime]}",
                                         metadata, tflite_threads or os.cpu_count(), tflite_invoke_batch,
                                         outputs)
        else:
            self._predict = _load_saved_model(model_dir.rstrip("/"), metadata, outputs)

    @property
    def has_scope_score(self) -> bool:
        """Whether ``predict_outputs`` gives a ``scope_score`` on this runtime."""
        return self.scope_output is not None

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities, float32 (batch, classes), for a uint8 batch (batch, height, width, 3)."""
        return self._predict(images)[0]

    def predict_outputs(self, images: np.ndarray) -> Outputs:
        """Both outputs of one inference call for a uint8 batch (batch, height, width, 3):
        probabilities float32 (batch, classes) and scope_score float32 (batch,) or None."""
        results = self._predict(images)
        return Outputs(results[0], results[1] if self.scope_output else None)

    def check_reference_predictions(self) -> float:
        """Re-predict the metadata's reference images (the integer model's own, within its
        tolerance, for ``tflite-int8``); return the largest absolute difference."""
        refs, tolerance = self.metadata.reference_predictions, REFERENCE_TOLERANCE
        if self.runtime == "tflite-int8":
            refs, tolerance = (self.metadata.tflite_int8["reference_predictions"],
                               self.metadata.tflite_int8["reference_tolerance"])
        if not refs:
            return 0.0
        seeds = [ref["seed"] for ref in refs]
        got = self.predict_outputs(reference_batch(self.metadata.height, self.metadata.width, seeds))
        want = np.array([ref["probabilities"] for ref in refs], dtype=np.float64)
        worst = float(np.max(np.abs(got.probabilities - want)))
        if worst > tolerance:
            raise ModelContractError(
                f"{self.runtime}: reference predictions differ from metadata by {worst:.2e} "
                f"(> {tolerance:.3g}): the model or its preprocessing changed since export"
            )
        if got.scope_score is not None:
            scope = float(np.max(np.abs(got.scope_score - np.array([ref[SCOPE_SCORE] for ref in refs]))))
            if scope > SCOPE_REFERENCE_TOLERANCE:
                raise ModelContractError(
                    f"{self.runtime}: reference {SCOPE_SCORE}s differ from metadata by {scope:.2e} "
                    f"(> {SCOPE_REFERENCE_TOLERANCE:.3g}): the model or its preprocessing changed "
                    "since export")
            worst = max(worst, scope)
        _LOG.info("%s reference predictions match metadata (max abs diff %.2e) on %s",
                  self.runtime, worst, self.device)
        return worst


def local_copy(directory: str) -> str:
    """``directory`` itself when local, else a copy in a temporary local directory.

    Reading through Beam's filesystems lets a SavedModel live wherever Beam reads (gs://, s3://,
    azfs://...), not only where TensorFlow's own filesystems reach.
    """
    if FileSystems.get_scheme(directory) in (None, "file"):
        return directory
    target = tempfile.mkdtemp(prefix="petscore-model-")
    for match in FileSystems.match([FileSystems.join(directory, "**")])[0].metadata_list:
        destination = os.path.join(target, match.path[len(directory):].lstrip("/"))
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        with open(destination, "wb") as copy:
            copy.writelines(file_chunks(match.path))
    return target


def _expected_input(metadata: ModelMetadata) -> list:
    return [None, metadata.height, metadata.width, 3]


def _load_saved_model(model_dir: str, metadata: ModelMetadata,
                      outputs: Sequence[str]) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``predict(uint8 batch) -> [each of outputs]`` of the SavedModel's ``serving_default``."""
    import tensorflow as tf

    path = f"{model_dir}/{SAVED_MODEL_DIR}"
    try:
        loaded = tf.saved_model.load(local_copy(path))
    except (OSError, ValueError) as exc:
        raise ModelContractError(f"cannot load SavedModel at {path}: {exc}") from exc
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise ModelContractError(f"{path} has no serving_default signature")
    _, inputs = signature.structured_input_signature
    spec = inputs.get(metadata.signature_input)
    if spec is None or spec.dtype != tf.uint8 or spec.shape.as_list() != _expected_input(metadata):
        raise ModelContractError(
            f"{path}: signature input {metadata.signature_input!r} is {spec}, but the "
            f"metadata promises uint8 {_expected_input(metadata)}")
    missing = [name for name in outputs if name not in signature.structured_outputs]
    if missing:
        raise ModelContractError(f"{path}: signature has no output {missing[0]!r}"
                                 f"{_MISSING_SCOPE if missing[0] == SCOPE_SCORE else ''}")
    _check_class_count(path, signature.structured_outputs[metadata.signature_output].shape.as_list()[-1],
                       metadata)

    def predict(images: np.ndarray) -> list[np.ndarray]:
        result = signature(**{metadata.signature_input: images})
        return [result[name].numpy() for name in outputs]

    predict.keep_alive = loaded  # the signature needs the loaded object's variables
    return predict


def _load_tflite(path: str, metadata: ModelMetadata, threads: int, invoke_batch: int,
                 outputs: Sequence[str]) -> Callable[[np.ndarray], list[np.ndarray]]:
    """LiteRT's ``predict(uint8 batch) -> [each of outputs]`` for the flatbuffer at ``path``,
    checked against the metadata; outputs are found by their names in the flatbuffer's
    ``serving_default`` signature (the converter orders them by its own rules)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=b"".join(file_chunks(path)), num_threads=threads)
    source = interpreter.get_input_details()[0]
    if source["dtype"] != np.uint8 or list(source["shape"][1:]) != _expected_input(metadata)[1:]:
        raise ModelContractError(f"{path}: input is {source['dtype'].__name__} {list(source['shape'])}, "
                                 f"the metadata promises uint8 {_expected_input(metadata)}")
    named = _litert_outputs(interpreter)
    missing = [name for name in outputs if name not in named]
    if missing:
        raise ModelContractError(f"{path} has no output {missing[0]!r}"
                                 f"{_MISSING_SCOPE if missing[0] == SCOPE_SCORE else ''}")
    indices = [named[name]["index"] for name in outputs]
    _check_class_count(path, int(named[metadata.signature_output]["shape"][-1]), metadata)
    return litert_predict(interpreter, invoke_batch, indices)


_MISSING_SCOPE = (": the metadata describes an out-of-scope detector the model does not compute "
                  "(metadata.json from another export?)")


def _litert_outputs(interpreter) -> dict[str, dict]:
    """``{output name: tensor details}`` from the ``serving_default`` signature a SavedModel's
    conversion keeps; a flatbuffer without signatures has one output, taken as ``probabilities``."""
    if "serving_default" in interpreter.get_signature_list():
        details = interpreter.get_signature_runner("serving_default").get_output_details()
        by_index = {detail["index"]: detail for detail in interpreter.get_output_details()}
        return {name: by_index[detail["index"]] for name, detail in details.items()}
    return {"probabilities": interpreter.get_output_details()[0]}


def litert_predict(interpreter, invoke_batch: int = LITERT_INVOKE_BATCH,
                   outputs: Sequence[int] | None = None) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``predict(uint8 batch) -> [each output]`` for a LiteRT interpreter, any batch size:
    the tensors at ``outputs`` (indices; default its first output). The interpreter's tensors are
    planned once, at load, for ``invoke_batch`` images, and each batch runs that many at a time
    (the last part padded): faster than one invoke for the whole batch (see
    ``LITERT_INVOKE_BATCH``), and the interpreter's memory is fixed from the start, whatever the
    batch sizes a run brings."""
    source = interpreter.get_input_details()[0]
    targets = list(outputs) if outputs is not None else [interpreter.get_output_details()[0]["index"]]
    interpreter.resize_tensor_input(source["index"], [invoke_batch, *source["shape"][1:]])
    interpreter.allocate_tensors()
    padded = np.zeros([invoke_batch, *source["shape"][1:]], np.uint8)
    lock = threading.Lock()  # one interpreter per process; its tensors are not thread-safe

    def predict(images: np.ndarray) -> list[np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        parts: list[list[np.ndarray]] = [[] for _ in targets]
        with lock:
            for start in range(0, len(images), invoke_batch):
                part = images[start:start + invoke_batch]
                if len(part) < invoke_batch:
                    padded[:len(part)] = part
                    part = padded
                interpreter.set_tensor(source["index"], part)
                interpreter.invoke()
                for collected, target in zip(parts, targets, strict=True):
                    collected.append(interpreter.get_tensor(target)[:len(images) - start].copy())
        return [np.concatenate(collected) for collected in parts]

    return predict


def _check_class_count(path: str, outputs: int, metadata: ModelMetadata) -> None:
    if outputs != len(metadata.class_names):
        raise ModelContractError(f"{path}: the model outputs {outputs} classes, the metadata names "
                                 f"{len(metadata.class_names)}: {metadata.class_names}")
