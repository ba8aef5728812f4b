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
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable

import numpy as np
from apache_beam.io.filesystems import FileSystems

from serving.metadata import (
    INT8_TFLITE_FILE,
    SAVED_MODEL_DIR,
    TFLITE_FILE,
    ModelContractError,
    ModelMetadata,
    file_chunks,
)
from serving.reference import REFERENCE_TOLERANCE, reference_batch

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


class ServingModel:
    """An exported model ready to score: ``predict(uint8 batch) -> probabilities``."""

    def __init__(self, model_dir: str, metadata: ModelMetadata, runtime: str = "auto",
                 tflite_threads: int = 0, tflite_invoke_batch: int = LITERT_INVOKE_BATCH):
        self.metadata = metadata
        # LiteRT runs on the CPU: an explicit request for it needs no device probing (nor TF).
        self.device = "CPU" if runtime in LITERT_FILES else configure_devices()
        self.runtime = choose_runtime(runtime, metadata, self.device)
        if self.runtime in LITERT_FILES:
            self._predict = _load_tflite(f"{model_dir.rstrip('/')}/{LITERT_FILES[self.runtime]}",
                                         metadata, tflite_threads or os.cpu_count(), tflite_invoke_batch)
        else:
            self._predict = _load_saved_model(model_dir.rstrip("/"), metadata)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities, shape (batch, classes), for a uint8 batch (batch, height, width, 3)."""
        return self._predict(images)

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
        got = self.predict(reference_batch(self.metadata.height, self.metadata.width, seeds))
        want = np.array([ref["probabilities"] for ref in refs], dtype=np.float64)
        worst = float(np.max(np.abs(got - want)))
        if worst > tolerance:
            raise ModelContractError(
                f"{self.runtime}: reference predictions differ from metadata by {worst:.2e} "
                f"(> {tolerance:.3g}): the model or its preprocessing changed since export"
            )
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


def _load_saved_model(model_dir: str, metadata: ModelMetadata) -> Callable[[np.ndarray], np.ndarray]:
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
    outputs = signature.structured_outputs
    if metadata.signature_output not in outputs:
        raise ModelContractError(f"{path}: signature has no output {metadata.signature_output!r}")
    _check_class_count(path, outputs[metadata.signature_output].shape.as_list()[-1], metadata)

    def predict(images: np.ndarray) -> np.ndarray:
        result = signature(**{metadata.signature_input: images})
        return result[metadata.signature_output].numpy()

    predict.keep_alive = loaded  # the signature needs the loaded object's variables
    return predict


def _load_tflite(path: str, metadata: ModelMetadata, threads: int,
                 invoke_batch: int) -> Callable[[np.ndarray], np.ndarray]:
    """LiteRT's predict function for the flatbuffer at ``path``, checked against the metadata."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=b"".join(file_chunks(path)), num_threads=threads)
    source = interpreter.get_input_details()[0]
    if source["dtype"] != np.uint8 or list(source["shape"][1:]) != _expected_input(metadata)[1:]:
        raise ModelContractError(f"{path}: input is {source['dtype'].__name__} {list(source['shape'])}, "
                                 f"the metadata promises uint8 {_expected_input(metadata)}")
    _check_class_count(path, int(interpreter.get_output_details()[0]["shape"][-1]), metadata)
    return litert_predict(interpreter, invoke_batch)


def litert_predict(interpreter,
                   invoke_batch: int = LITERT_INVOKE_BATCH) -> Callable[[np.ndarray], np.ndarray]:
    """``predict(uint8 batch) -> first output`` for a LiteRT interpreter, any batch size. The
    interpreter's tensors are planned once, at load, for ``invoke_batch`` images, and each batch
    runs that many at a time (the last part padded): faster than one invoke for the whole batch
    (see ``LITERT_INVOKE_BATCH``), and the interpreter's memory is fixed from the start, whatever
    the batch sizes a run brings."""
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(source["index"], [invoke_batch, *source["shape"][1:]])
    interpreter.allocate_tensors()
    padded = np.zeros([invoke_batch, *source["shape"][1:]], np.uint8)
    lock = threading.Lock()  # one interpreter per process; its tensors are not thread-safe

    def predict(images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        parts = []
        with lock:
            for start in range(0, len(images), invoke_batch):
                part = images[start:start + invoke_batch]
                if len(part) < invoke_batch:
                    padded[:len(part)] = part
                    part = padded
                interpreter.set_tensor(source["index"], part)
                interpreter.invoke()
                parts.append(interpreter.get_tensor(target["index"])[:len(images) - start].copy())
        return np.concatenate(parts)

    return predict


def _check_class_count(path: str, outputs: int, metadata: ModelMetadata) -> None:
    if outputs != len(metadata.class_names):
        raise ModelContractError(f"{path}: the model outputs {outputs} classes, the metadata names "
                                 f"{len(metadata.class_names)}: {metadata.class_names}")
