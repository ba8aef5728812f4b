"""Model-only inference rates per runtime and batch size, against the decode rate that feeds them.

    .venv/bin/python bench/inference.py --model-dir MODEL [--images 2000] [--work bench_output]
    KERAS_BACKEND=jax python3 bench/inference.py --model-dir MODEL --runtimes keras,keras-exact,tflite

Answers "what does an accelerator buy for this model": decodes the benchmark JPEGs once (the
model's own preprocessing, one process per core, timed: that is the most a machine's CPUs can
feed), then times each runtime on those pixels, already in memory:
  tflite       model.tflite on LiteRT (XNNPACK), one interpreter with a thread per core, at
               each of --invoke-batches images per invoke (``serving.runtimes.LITERT_INVOKE_BATCH``)
  tflite-int8  the same for the export's integer model
  saved_model  the SavedModel through TensorFlow (GPU when TensorFlow sees one)
  keras        model.keras on the configured Keras backend, compiled (XLA on JAX), GPU when the
               backend sees one; float32 at the backend's default precision (TF32 on Ampere+)
  keras-exact  the same with TF32 turned off (full float32 matrix products)
and the largest difference of each from the metadata's reference predictions and from the first
runtime listed, on 256 benchmark images.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.throughput import generate  # noqa: E402
from serving.metadata import KERAS_FILE, read_metadata  # noqa: E402
from serving.preprocessing import decode_and_resize  # noqa: E402
from serving.reference import reference_batch  # noqa: E402
from serving.runtimes import LITERT_FILES, ServingModel  # noqa: E402

_SIZE: tuple[int, int] = (0, 0)


def _decode(path: str) -> np.ndarray:
    with open(path, "rb") as handle:
        return decode_and_resize(handle.read(), _SIZE)


def decode_all(paths: list[str], size: tuple[int, int], processes: int) -> tuple[np.ndarray, float]:
    global _SIZE
    _SIZE = size
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(_decode, paths[:processes])  # start the workers before timing
        started = time.monotonic()
        pixels = pool.map(_decode, paths, chunksize=16)
        return np.stack(pixels), time.monotonic() - started


def keras_predictor(model_dir: str, exact: bool):
    """model.keras behind a uint8 input (the cast runs on the device, as in the SavedModel)."""
    import keras

    import model.architecture  # registers the custom layers

    if exact and keras.backend.backend() == "jax":
        import jax
        jax.config.update("jax_default_matmul_precision", "highest")
    elif exact and keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        tf.config.experimental.enable_tensor_float_32_execution(False)
    classifier = model.architecture.probabilities_only(
        keras.saving.load_model(os.path.join(model_dir, KERAS_FILE)))
    return uint8_predictor(classifier), _keras_device()


def uint8_predictor(classifier):
    """``classifier`` behind a uint8 input (cast on the device, as in the SavedModel), compiled."""
    import keras

    images = keras.Input(classifier.input_shape[1:], dtype="uint8")
    wrapped = keras.Model(images, classifier(keras.ops.cast(images, "float32"), training=False))
    if keras.backend.backend() != "jax":
        return lambda batch: np.asarray(wrapped.predict_on_batch(batch))
    import jax

    # One XLA function, variables passed in: predict_on_batch adds ~0.1 s per call on JAX.
    trainable = [v.value for v in wrapped.trainable_variables]
    fixed = [v.value for v in wrapped.non_trainable_variables]
    infer = jax.jit(lambda t, f, x: wrapped.stateless_call(t, f, x, training=False)[0])
    return lambda batch: np.asarray(infer(trainable, fixed, batch))


def _keras_device() -> str:
    import keras

    if keras.backend.backend() == "jax":
        import jax
        return f"jax {jax.devices()[0].device_kind}"
    return keras.backend.backend()


def time_batches(predict, pixels: np.ndarray, batch: int, min_seconds: float) -> float:
    """Images per second over consecutive batches of ``pixels`` (after two warm-up batches)."""
    for _ in range(2):
        predict(pixels[:batch])
    done, started = 0, time.monotonic()
    while time.monotonic() - started < min_seconds:
        start = done % (len(pixels) - batch + 1)
        predict(pixels[start:start + batch])
        done += batch
    return done / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--work", default="bench_output")
    parser.add_argument("--runtimes", default="tflite,saved_model,keras")
    parser.add_argument("--batch-sizes", default="16,64,256,1024")
    parser.add_argument("--invoke-batches", default="1,2,4,8,16,64",
                        help="LiteRT runtimes: images per invoke, each timed at every batch size")
    parser.add_argument("--min-seconds", type=float, default=3.0)
    args = parser.parse_args()
    metadata = read_metadata(args.model_dir)
    paths = generate(os.path.join(args.work, f"images-{args.images}"), args.images)
    size = tuple(metadata.input_size)
    cores = os.cpu_count()
    pixels, seconds = decode_all(paths, size, cores)
    print(f"decode + resize (serving.preprocessing), {cores} processes: {len(paths) / seconds:.1f} images/s")
    references = reference_batch(*size)
    sample = pixels[:256]
    baseline = None
    print(f"{'runtime':12s} {'device':24s} {'load s':>6s} {'invoke':>6s} {'batch':>5s} {'images/s':>9s} "
          f"{'vs ref':>8s} {'vs 1st':>9s}")
    for runtime in args.runtimes.split(","):
        invoke_batches = [int(b) for b in args.invoke_batches.split(",")] if runtime in LITERT_FILES else [0]
        for invoke_batch in invoke_batches:
            started = time.monotonic()
            if runtime.startswith("keras"):
                predict, device = keras_predictor(args.model_dir, exact=runtime == "keras-exact")
            else:
                model = ServingModel(args.model_dir, metadata, runtime, tflite_invoke_batch=invoke_batch)
                predict, device = model.predict, f"{model.runtime} {model.device}"
            load = time.monotonic() - started
            refs = (metadata.tflite_int8["reference_predictions"] if runtime == "tflite-int8"
                    else metadata.reference_predictions)
            want = np.array([ref["probabilities"] for ref in refs])
            vs_ref = float(np.max(np.abs(predict(references) - want)))
            got = predict(sample)
            baseline = got if baseline is None else baseline
            vs_first = float(np.max(np.abs(got - baseline)))
            for batch in [int(b) for b in args.batch_sizes.split(",")]:
                rate = time_batches(predict, pixels, batch, args.min_seconds)
                print(f"{runtime:12s} {device[:24]:24s} {load:6.2f} {invoke_batch or '':>6} {batch:5d} "
                      f"{rate:9.1f} {vs_ref:8.1e} {vs_first:9.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
