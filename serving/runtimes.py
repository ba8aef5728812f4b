"""Load an exported model for scoring and prove it still honours its metadata.

Four runtimes execute the same exported model:
- ``saved_model``: the SavedModel's ``serving_default`` signature through ``tf.saved_model.load``
  (GPU when one is visible). It executes no deserialised Python, but a SavedModel is still a
  TensorFlow graph: load only models from a location you trust (docs/model-contract.md).
- ``keras``: ``model.keras`` on the configured Keras backend (``KERAS_BACKEND``: JAX, PyTorch or
  TensorFlow), loaded with ``safe_mode=True`` and compiled once (XLA on JAX), GPU when the backend
  sees one: a GPU path without TensorFlow (docs/gpu.md).
- ``tflite``: ``model.tflite``, converted from that SavedModel at export and checked against it,
  run by LiteRT's XNNPACK kernels: about 4x faster than TF on CPU for MobileNets.
- ``tflite-int8``: ``model_int8.tflite``, the opt-in full-integer model (``model.quantize``),
  about 2-3x faster again on CPU; its probabilities differ from the float runtimes' (by the
  figures its metadata records), so it runs only when asked for, never by ``auto``.
``auto`` picks ``saved_model`` where TensorFlow sees a GPU, else ``keras`` where the configured
Keras backend (JAX or PyTorch) sees one and the export has ``model.keras``, else ``tflite`` when
the export has one.

A model with an out-of-scope detector (``metadata.out_of_scope``) has a second output,
``scope_score``, that the float runtimes compute in the same inference call
(``ServingModel.predict_outputs``); the integer model does not carry it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Container, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from apache_beam.io.filesystems import FileSystems

from serving.metadata import (
    INT8_TFLITE_FILE,
    KERAS_FILE,
    SAVED_MODEL_DIR,
    SCOPE_SCORE,
    TFLITE_FILE,
    ModelContractError,
    ModelMetadata,
    file_chunks,
)
from serving.reference import REFERENCE_TOLERANCE, SCOPE_REFERENCE_TOLERANCE, reference_batch
from serving.tf_logs import gpu_possible
from serving.tta import Views, mean_of_views, predict_views

_LOG = logging.getLogger(__name__)
RUNTIMES = ("auto", "saved_model", "keras", "tflite", "tflite-int8")
LITERT_FILES = {"tflite": TFLITE_FILE, "tflite-int8": INT8_TFLITE_FILE}
# Images per LiteRT invoke. XNNPACK runs a network layer by layer over the whole invoke, so a
# small one keeps each layer's activations in the CPU's caches. On the 2-vCPU VM, 4 images per
# invoke against 64 (two runs of bench/inference.py --batch-sizes 64): MobileNetV2 1.0 float
# 1.25-1.44x, integer 1.15-1.17x; MobileNet alpha 0.25 float 1.59-1.60x, integer 1.15-1.18x;
# within 10% of the best size for each of the four.
LITERT_INVOKE_BATCH = 4
# Modules whose import registers the custom layers (``@keras.saving.register_keras_serializable``)
# that an exported model.keras may hold: the keras runtime imports them before loading one.
CUSTOM_LAYER_MODULES = ("model.architecture",)
# XLA compiles one program per input shape: the keras runtime on JAX pads each batch up to the next
# power of two (at least KERAS_MIN_PADDED images), so the batch sizes a run sends (--batch-size,
# smaller last batches, the reference check's 4) compile a handful of programs, once each.
KERAS_MIN_PADDED = 8


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


def keras_devices(backend: str) -> str:
    """What Keras's ``backend`` scores on here: "GPU xN", or "CPU" (also when the backend's
    library is not installed), set up to score in full float32 as ``configure_devices`` does for
    TensorFlow (which answers for the ``tensorflow`` backend).

    Asked of the backend's own library, without importing Keras (whose backend is fixed at its
    import), and only where ``gpu_possible``. JAX: its GPU memory grows on demand
    (``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless set; JAX would otherwise take 75% of the GPU
    per process at its first use, so a second SDK process on the worker would fail); TF32 is
    turned off inside the compiled program (``keras_predict``). PyTorch: TF32 off for cuDNN
    convolutions (on by default) and matrix products.
    """
    if backend == "tensorflow":
        return configure_devices()
    if not gpu_possible():
        return "CPU"
    try:
        if backend == "jax":
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
            import jax

            count = jax.device_count() if jax.default_backend() == "gpu" else 0
        elif backend == "torch":
            import torch

            count = torch.cuda.device_count()
            _torch_full_float32(torch)
        else:
            return "CPU"
    except ImportError:
        return "CPU"
    return f"GPU x{count}" if count else "CPU"


def _torch_full_float32(torch) -> None:
    if hasattr(torch.backends.cudnn, "conv"):  # PyTorch 2.9+: a precision per backend and operator
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def keras_backend() -> str:
    """The Keras backend this process scores on: Keras's own answer once it is imported (its
    backend is fixed then), before that the one its import will pick: ``KERAS_BACKEND``, else
    ``backend`` in ``$KERAS_HOME/keras.json`` (``~/.keras``), else ``tensorflow``, in that order
    (``keras/src/backend/config.py``). Learnt without importing Keras, which on its TensorFlow
    backend imports TensorFlow."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as handle:
            return json.load(handle).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def choose_runtime(requested: str, metadata: ModelMetadata, device: str, keras_device: str = "CPU") -> str:
    """The runtime to score with: ``requested``, checked against what the export holds, or for
    ``auto``: ``saved_model`` where TensorFlow sees a GPU (``device``), else ``keras`` where the
    configured Keras backend sees one (``keras_device``: "CPU" when it does not, or the export has
    no ``model.keras``), else ``tflite`` when the export has ``model.tflite``, else ``saved_model``.
    Raises ``ModelContractError`` for a runtime whose file the export lacks."""
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
    if device != "CPU":
        return "saved_model"
    if keras_device != "CPU":
        return "keras"
    return "tflite" if metadata.tflite else "saved_model"


class Outputs(NamedTuple):
    """What one inference call gives for a batch of n images."""

    probabilities: np.ndarray  # float32 [n, classes], in the metadata's class order
    # float32 [n]: the out-of-scope score, flagged above ``metadata.out_of_scope["threshold"]``;
    # None when the model has no detector, or on a runtime that does not carry it (tflite-int8).
    scope_score: np.ndarray | None


class ServingModel:
    """An exported model ready to score: ``predict(uint8 batch) -> probabilities``, or
    ``predict_outputs(uint8 batch) -> Outputs`` for the out-of-scope score as well.

    ``device``: what the chosen runtime scores on ("GPU xN" or "CPU"). Raises
    ``ModelContractError`` (one line, before any scoring) when the export or this machine cannot
    serve the runtime asked for.
    """

    def __init__(self, model_dir: str, metadata: ModelMetadata, runtime: str = "auto",
                 tflite_threads: int = 0, tflite_invoke_batch: int = LITERT_INVOKE_BATCH):
        self.metadata = metadata
        model_dir = model_dir.rstrip("/")
        keras_file = f"{model_dir}/{KERAS_FILE}"
        if runtime == "keras" and not FileSystems.exists(keras_file):
            raise ModelContractError(
                f"runtime 'keras' requested but {model_dir} has no {KERAS_FILE} (a model packaged "
                "from a SavedModel directory has only saved_model/): score it with --runtime "
                "saved_model, or tflite where the export has model.tflite")
        if runtime in LITERT_FILES:  # LiteRT runs on the CPU: nothing to probe (nor to import)
            self.device = keras_device = "CPU"
        elif runtime == "keras":
            self.device = keras_device = keras_devices(keras_backend())
        else:
            self.device = configure_devices()  # TensorFlow's view
            # auto where TensorFlow sees no GPU: does the configured JAX or PyTorch backend?
            keras_device = (keras_devices(keras_backend())
                            if runtime == "auto" and self.device == "CPU" and keras_backend() != "tensorflow"
                            and FileSystems.exists(keras_file) else "CPU")
        self.runtime = choose_runtime(runtime, metadata, self.device, keras_device)
        # The integer model's features are quantized and its export fits no detector to them.
        self.scope_output = (metadata.out_of_scope["output"]
                             if metadata.has_scope_detector and self.runtime != "tflite-int8" else None)
        outputs = [metadata.signature_output, *([self.scope_output] if self.scope_output else [])]
        if self.runtime in LITERT_FILES:
            self._predict = _load_tflite(f"{model_dir}/{LITERT_FILES[self.runtime]}", metadata,
                                         tflite_threads or os.cpu_count(), tflite_invoke_batch, outputs)
        elif self.runtime == "keras":
            self.device = keras_device
            self._predict = keras_predict(load_keras_model(keras_file, metadata), outputs)
        else:
            self._predict = _load_saved_model(model_dir, metadata, outputs)

    @property
    def has_scope_score(self) -> bool:
        """Whether ``predict_outputs`` gives a ``scope_score`` on this runtime."""
        return self.scope_output is not None

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities, float32 (batch, classes), for a uint8 batch (batch, height, width, 3)."""
        return self._predict(images)[0]

    def predict_outputs(self, images: np.ndarray, tta: str = "none") -> Outputs:
        """Both outputs for a uint8 batch (batch, height, width, 3): probabilities float32
        (batch, classes) and scope_score float32 (batch,) or None. ``tta="none"``: one inference
        call; ``"flip"``: the mean of the probabilities of the images and of their left-right
        mirror, the scope score of the images as they are (``serving.tta``: one call on both
        views except on LiteRT, which runs two passes). Raises ``ValueError`` for another mode."""
        if tta != "none":
            views = self.predict_views(images, tta)
            return Outputs(mean_of_views(views.probabilities), views.scope_score)
        results = self._predict(images)
        return Outputs(results[0], results[1] if self.scope_output else None)

    def predict_views(self, images: np.ndarray, tta: str) -> Views:
        """Each view's probabilities, float32 (views, batch, classes), and the scope score of the
        images as they are, for ``tta`` (``serving.tta.TTA_MODES``): what ``predict_outputs``
        averages, for evaluation that needs the views themselves."""
        return predict_views(lambda batch: self.predict_outputs(batch), images, tta,
                             one_call=self.runtime not in LITERT_FILES)

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
        _copy_file(match.path, os.path.join(target, match.path[len(directory):].lstrip("/")))
    return target


def local_file(path: str) -> str:
    """``path`` itself when local, else a copy in a temporary local directory (``local_copy``
    for one file: Keras reads ``model.keras`` only from local disk, or through TensorFlow)."""
    if FileSystems.get_scheme(path) in (None, "file"):
        return path
    return _copy_file(path, os.path.join(tempfile.mkdtemp(prefix="petscore-model-"), os.path.basename(path)))


def _copy_file(source: str, destination: str) -> str:
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    with open(destination, "wb") as copy:
        copy.writelines(file_chunks(source))
    return destination


def _expected_input(metadata: ModelMetadata) -> list:
    return [None, metadata.height, metadata.width, 3]


def _load_saved_model(model_dir: str, metadata: ModelMetadata,
                      outputs: Sequence[str]) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``predict(uint8 batch) -> [each of outputs]`` of the SavedModel's ``serving_default``."""
    try:
        import tensorflow as tf
    except ImportError as error:  # a worker image with LiteRT or JAX alone
        raise ModelContractError(
            f"runtime 'saved_model' needs TensorFlow, which is not installed here ({error}): score "
            "with --runtime keras or tflite, or install TensorFlow (deploy/Dockerfile)") from error

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
    _require_outputs(f"{path}: its signature", outputs, signature.structured_outputs)
    _check_class_count(path, signature.structured_outputs[metadata.signature_output].shape.as_list()[-1],
                       metadata)

    def predict(images: np.ndarray) -> list[np.ndarray]:
        result = signature(**{metadata.signature_input: images})
        return [result[name].numpy() for name in outputs]

    predict.keep_alive = loaded  # the signature needs the loaded object's variables
    return predict


def load_keras_model(path: str, metadata: ModelMetadata):
    """The ``keras.Model`` in ``model.keras`` at ``path`` (any Beam filesystem) on the configured
    Keras backend, loaded with ``safe_mode=True`` (no deserialised Python runs: a Lambda layer is
    refused) and checked against the metadata: one image input of its size, an output named as
    its ``signature_output`` when there are several, the detector's output when the metadata
    describes one, its class count. Raises
    ``ModelContractError`` in one line when it cannot be loaded here, saying what to use instead."""
    backend = keras_backend()
    try:
        import keras
    except ImportError as error:
        raise ModelContractError(
            f"runtime 'keras' cannot start Keras's {backend!r} backend ({error}): install it "
            "(docs/gpu.md), or set KERAS_BACKEND to an installed one (jax, torch, tensorflow)") from error
    wanted = os.environ.get("KERAS_BACKEND")
    if wanted and wanted != keras.backend.backend():
        _LOG.warning("KERAS_BACKEND=%s, but this process imported Keras on %s before it was set: "
                     "the keras runtime runs on %s", wanted, keras.backend.backend(),
                     keras.backend.backend())
    for module in CUSTOM_LAYER_MODULES:
        importlib.import_module(module)
    try:
        with _initial_values_on_host(keras.backend.backend()):
            classifier = keras.saving.load_model(local_file(path), compile=False, safe_mode=True)
    except Exception as error:  # noqa: BLE001 - every loading failure becomes one clear refusal
        cause = error  # Keras wraps the failure of a nested layer in the model's own
        while cause.__cause__ or cause.__context__:
            cause = cause.__cause__ or cause.__context__
        reason = (str(cause).strip().splitlines() or [""])[0].split(". ")[0][:200]
        raise ModelContractError(
            f"{path} does not load on Keras's {keras.backend.backend()} backend ({type(cause).__name__}: "
            f"{reason}): score it with --runtime saved_model or tflite") from error
    if len(classifier.inputs) != 1 or list(classifier.inputs[0].shape) != _expected_input(metadata):
        raise ModelContractError(f"{path}: takes {[list(i.shape) for i in classifier.inputs]}, but the "
                                 f"metadata promises one image input {_expected_input(metadata)}")
    # Outputs in a dict are named by its keys (what the model returns, as the SavedModel's
    # signature does), whatever their last layers are called (a calibrated model's is its
    # temperature); otherwise by their layers' names.
    named = classifier.output if isinstance(classifier.output, dict) else dict(
        zip(classifier.output_names, classifier.outputs, strict=True))
    names = list(named)
    if len(names) > 1 and metadata.signature_output not in names:
        raise ModelContractError(f"{path}: outputs {names}, none named {metadata.signature_output!r} "
                                 "(the metadata's signature_output)")
    if metadata.has_scope_detector:
        _require_outputs(path, [metadata.out_of_scope["output"]], names)
    probabilities = named[metadata.signature_output] if len(names) > 1 else classifier.outputs[0]
    _check_class_count(path, int(probabilities.shape[-1]), metadata)
    _LOG.info("%s on Keras's %s backend", path, keras.backend.backend())
    return classifier


@contextlib.contextmanager
def _initial_values_on_host(backend: str) -> Iterator[None]:
    """While a model loads on JAX, its variables' throwaway initial values come from NumPy.

    Loading builds every layer, which draws each variable's initial value before the file's
    weights replace it (``load_own_variables`` assigns every variable, or raises). Keras's JAX
    backend draws them with ``jax.random``, one XLA program per shape: loading the alpha 0.25
    MobileNet compiled 26 of them, 17-28 s on the 2-core VM, against about a second this way.
    Keras calls its backend's ``random.uniform``/``normal``/``truncated_normal`` at run time, so
    replacing them on that module for the duration of the load is enough; Keras without them
    (another version) loads as it would anyway.
    """
    if backend != "jax":
        yield
        return
    from keras.src.backend.jax import random as jax_random

    def zeros(shape, *args, dtype=None, **kwargs):
        return np.zeros(shape, dtype=dtype or "float32")

    names = [name for name in ("uniform", "normal", "truncated_normal") if hasattr(jax_random, name)]
    drawn = {name: getattr(jax_random, name) for name in names}
    try:
        for name in names:
            setattr(jax_random, name, zeros)
        yield
    finally:
        for name, function in drawn.items():
            setattr(jax_random, name, function)


def keras_predict(classifier, outputs: Sequence[str] = ("probabilities",),
                  full_float32: bool = True) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``predict(uint8 batch [n, height, width, 3]) -> [numpy array [n, ...] per name in
    outputs]`` for a Keras model taking float pixels, on whatever backend Keras runs (a model of
    one output gives it for the first name). The uint8 pixels travel to the device and are cast
    there (a quarter of float32's bytes), as in the SavedModel's signature.

    Compiled once: JAX, one XLA program (the variables passed in, not baked into it as constants)
    per padded batch size (``KERAS_MIN_PADDED``); TensorFlow, one ``tf.function`` for any batch
    size; PyTorch runs eagerly under ``no_grad``, as Keras's own ``predict`` does there
    (``jit_compile="auto"`` is eager on torch: ``torch.compile`` needs a compiler toolchain at
    run time and minutes per model). ``full_float32``: matrix products and convolutions in
    float32, not TF32 (Ampere+ GPUs' default), see ``configure_devices``; on JAX it is set in the
    program itself, on the other backends by ``keras_devices``.
    """
    import keras

    backend = keras.backend.backend()
    names = list(classifier.output_names)
    dtype = classifier.inputs[0].dtype

    def pick(results: Any) -> list:
        if isinstance(results, dict):
            return [results[name] for name in outputs] if len(results) > 1 else list(results.values())
        if isinstance(results, (list, tuple)):
            return [results[names.index(name)] for name in outputs] if len(results) > 1 else [results[0]]
        return [results]

    if backend == "jax":
        import jax

        trainable = [variable.value for variable in classifier.trainable_variables]
        fixed = [variable.value for variable in classifier.non_trainable_variables]

        def forward(trainable, fixed, images):
            precision = jax.default_matmul_precision("float32") if full_float32 else contextlib.nullcontext()
            with precision:
                results, _ = classifier.stateless_call(trainable, fixed, images.astype(dtype),
                                                       training=False)
            return pick(results)

        program = jax.jit(forward)

        def predict(images: np.ndarray) -> list[np.ndarray]:
            images = np.asarray(images, dtype=np.uint8)
            count = len(images)
            padded = max(KERAS_MIN_PADDED, 1 << max(count - 1, 0).bit_length())
            if padded > count:
                images = np.concatenate([images, np.zeros((padded - count, *images.shape[1:]), np.uint8)])
            return [np.asarray(result)[:count] for result in program(trainable, fixed, images)]

        return predict
    if backend == "tensorflow":
        import tensorflow as tf

        program = tf.function(
            lambda images: pick(classifier(tf.cast(images, dtype), training=False)),
            input_signature=[tf.TensorSpec([None, *classifier.inputs[0].shape[1:]], tf.uint8)])
        return lambda images: [result.numpy() for result in program(np.asarray(images, dtype=np.uint8))]
    import torch

    def predict(images: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            pixels = keras.ops.cast(keras.ops.convert_to_tensor(np.asarray(images, dtype=np.uint8)), dtype)
            return [keras.ops.convert_to_numpy(result) for result in pick(classifier(pixels, training=False))]

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
    _require_outputs(path, outputs, named)
    indices = [named[name]["index"] for name in outputs]
    _check_class_count(path, int(named[metadata.signature_output]["shape"][-1]), metadata)
    return litert_predict(interpreter, invoke_batch, indices)


def _require_outputs(model: str, wanted: Sequence[str], available: Container[str]) -> None:
    """Refuse, in one ``ModelContractError`` line, a model lacking an output the metadata names
    (the same words for every runtime: a missing ``scope_score`` is a detector the metadata
    describes and the model does not compute)."""
    missing = [name for name in wanted if name not in available]
    if missing:
        detector = (": the metadata describes an out-of-scope detector the model does not compute "
                    "(metadata.json from another export?)") if missing[0] == SCOPE_SCORE else ""
        raise ModelContractError(f"{model} has no output {missing[0]!r}{detector}")


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
