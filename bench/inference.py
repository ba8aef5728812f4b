"""Model-only inference rates per runtime and batch size, against the decode rate that feeds them.

    .venv/bin/python bench/inference.py --model-dir MODEL [--images 2000] [--work bench_output]
    KERAS_BACKEND=jax python3 bench/inference.py --model-dir MODEL --runtimes keras,keras-tf32,tflite

Answers "what does an accelerator buy for this model": decodes the benchmark JPEGs once (the
model's own preprocessing, one process per core, timed: that is the most a machine's CPUs can
feed), then times each runtime on those pixels, already in memory:
  tflite       model.tflite on LiteRT (XNNPACK), one interpreter with a thread per core, at
               each of --invoke-batches images per invoke (``serving.runtimes.LITERT_INVOKE_BATCH``)
  tflite-int8  the same for the export's integer model
  tflite-no-scope  for a model with an out-of-scope detector: the same model without it (its
               model.keras's probabilities alone, converted as the export converts it), run as
               tflite is; the tflite runtimes time ``predict_outputs`` (both outputs, as scoring
               calls it), so the two give the detector's cost (``--rounds 3`` alternates them)
  scope-only   the detector alone (its KnnCosineDistance layer and bank, converted to LiteRT) on
               random features: what it adds per image, without the network's time around it
  saved_model  the SavedModel through TensorFlow (GPU when TensorFlow sees one)
  keras        model.keras on the configured Keras backend as ``--runtime keras`` runs it:
               compiled (XLA on JAX), GPU when the backend sees one, full float32
  keras-tf32   the same on JAX at its default precision (TF32 on Ampere and newer GPUs)
each runtime's wall-clock rate and this process's CPU milliseconds per image (with ``--threads 1``
the work an image costs, which stays put on a machine other jobs share, where the rate does not),
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
from serving.runtimes import (  # noqa: E402
    LITERT_FILES,
    ServingModel,
    keras_backend,
    keras_devices,
    keras_predict,
    litert_predict,
    load_keras_model,
)

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


def keras_tf32_predictor(model_dir: str, metadata):
    """``--runtime keras``'s model and compiled function, at JAX's default matrix precision."""
    classifier = load_keras_model(os.path.join(model_dir, KERAS_FILE), metadata)
    run = keras_predict(classifier, [metadata.signature_output], full_float32=False)
    return (lambda batch: run(batch)[0]), \
        f"keras {keras_devices(keras_backend())}"


def paired_cpu(predicts: dict, pixels: np.ndarray, batch: int, seconds: float) -> dict[str, float]:
    """CPU milliseconds per image of each of ``predicts`` (name -> function), timed in turns, one
    batch each, for ``seconds``: what the machine does to one, it does to the other within a
    batch's time, so their ratio holds where separate timings drift with other jobs' load. The
    order turns round every batch (the one timed first ran about 1% slower in an A/A check)."""
    spent = dict.fromkeys(predicts, 0.0)
    done, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        start = done % (len(pixels) - batch + 1)
        turn = list(predicts.items())
        for name, predict in turn if (done // batch) % 2 == 0 else turn[::-1]:
            cpu = time.process_time()
            predict(pixels[start:start + batch])
            spent[name] += time.process_time() - cpu
        done += batch
    return {name: total * 1000 / done for name, total in spent.items()}


def without_scope(model_dir: str) -> bytes:
    """``model.tflite``'s flatbuffer for the same model without its out-of-scope detector: the
    probabilities of its ``model.keras`` alone, written and converted as the export does."""
    import tempfile

    import keras
    import tensorflow as tf

    from model.architecture import probabilities_only
    from model.signature import write_saved_model

    classifier = probabilities_only(keras.saving.load_model(os.path.join(model_dir, KERAS_FILE)))
    with tempfile.TemporaryDirectory() as directory:
        write_saved_model(classifier, directory)
        return tf.lite.TFLiteConverter.from_saved_model(directory).convert()


def scope_only(model_dir: str, threads: int, invoke_batch: int):
    """``predict(batch) -> scores`` of the model's out-of-scope layer alone on LiteRT, fed random
    features of its width (its cost does not depend on their values), in invokes of
    ``invoke_batch`` as scoring runs the whole model."""
    import keras
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from model.architecture import KnnCosineDistance

    served = keras.saving.load_model(os.path.join(model_dir, KERAS_FILE))
    layer = next(layer for layer in served.layers if isinstance(layer, KnnCosineDistance))
    dim = int(layer.bank.shape[0])
    features = keras.Input((dim,), batch_size=invoke_batch)
    alone = KnnCosineDistance(layer.bank_size, layer.k)
    detector = keras.Model(features, alone(features))
    alone.bank.assign(layer.bank.numpy())
    interpreter = Interpreter(model_content=tf.lite.TFLiteConverter.from_keras_model(detector).convert(),
                              num_threads=threads)
    interpreter.allocate_tensors()
    source, target = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 6, (invoke_batch, dim)).astype(np.float32)

    def predict(images: np.ndarray) -> np.ndarray:
        for _ in range(0, len(images), invoke_batch):
            interpreter.set_tensor(source, values)
            interpreter.invoke()
        return interpreter.get_tensor(target)

    return predict


def time_batches(predict, pixels: np.ndarray, batch: int, min_seconds: float) -> float:
    """Images per second over consecutive batches of ``pixels`` (after two warm-up batches)."""
    return time_and_cpu(predict, pixels, batch, min_seconds)[0]


def time_and_cpu(predict, pixels: np.ndarray, batch: int, min_seconds: float) -> tuple[float, float]:
    """(images per second, this process's CPU milliseconds per image) over consecutive batches
    of ``pixels``, after two warm-up batches. CPU time barely moves when other jobs share the
    machine, where the wall-clock rate does; on one thread it is the work an image costs."""
    for _ in range(2):
        predict(pixels[:batch])
    done, started, cpu = 0, time.monotonic(), time.process_time()
    while time.monotonic() - started < min_seconds:
        start = done % (len(pixels) - batch + 1)
        predict(pixels[start:start + batch])
        done += batch
    return done / (time.monotonic() - started), (time.process_time() - cpu) * 1000 / done


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
    parser.add_argument("--rounds", type=int, default=1, help="Time the --runtimes list this many times.")
    parser.add_argument("--threads", type=int, default=0, help="LiteRT threads (default: one per core).")
    parser.add_argument("--paired-seconds", type=float, default=0.0,
                        help="For a model with a detector: also time tflite and tflite-no-scope in "
                             "turns, a batch each, for this long (the first --batch-sizes and "
                             "--invoke-batches), and print their CPU ms per image and its ratio.")
    args = parser.parse_args()
    metadata = read_metadata(args.model_dir)
    paths = generate(os.path.join(args.work, f"images-{args.images}"), args.images)
    size = tuple(metadata.input_size)
    cores = os.cpu_count()
    threads = args.threads or cores
    pixels, seconds = decode_all(paths, size, cores)
    print(f"decode + resize (serving.preprocessing), {cores} processes: {len(paths) / seconds:.1f} images/s")
    references = reference_batch(*size)
    sample = pixels[:256]
    baseline = None
    print(f"{'runtime':15s} {'device':24s} {'load s':>6s} {'invoke':>6s} {'batch':>5s} {'images/s':>9s} "
          f"{'CPU ms/im':>9s} {'vs ref':>8s} {'vs 1st':>9s}")
    litert = {*LITERT_FILES, "tflite-no-scope", "scope-only"}
    wanted = "tflite-no-scope" in args.runtimes.split(",") or args.paired_seconds
    plain = without_scope(args.model_dir) if wanted else None
    for runtime in args.runtimes.split(",") * args.rounds:
        invoke_batches = [int(b) for b in args.invoke_batches.split(",")] if runtime in litert else [0]
        for invoke_batch in invoke_batches:
            started = time.monotonic()
            if runtime == "keras-tf32":
                predict, device = keras_tf32_predictor(args.model_dir, metadata)
            elif runtime == "scope-only":
                predict, device = scope_only(args.model_dir, threads, invoke_batch), "tflite CPU"
            elif runtime == "tflite-no-scope":
                from ai_edge_litert.interpreter import Interpreter

                run = litert_predict(Interpreter(model_content=plain, num_threads=threads), invoke_batch)
                predict, device = (lambda batch, run=run: run(batch)[0]), "tflite CPU"
            else:
                model = ServingModel(args.model_dir, metadata, runtime, tflite_threads=threads,
                                     tflite_invoke_batch=invoke_batch)
                predict = lambda batch, model=model: model.predict_outputs(batch).probabilities  # noqa: E731
                device = f"{model.runtime} {model.device}"
            load = time.monotonic() - started
            vs_ref = vs_first = ""
            if runtime != "scope-only":  # scores, not probabilities: nothing to compare
                refs = (metadata.tflite_int8["reference_predictions"] if runtime == "tflite-int8"
                        else metadata.reference_predictions)
                want = np.array([ref["probabilities"] for ref in refs])
                vs_ref = f"{float(np.max(np.abs(predict(references) - want))):.1e}"
                got = predict(sample)
                baseline = got if baseline is None else baseline
                vs_first = f"{float(np.max(np.abs(got - baseline))):.1e}"
            for batch in [int(b) for b in args.batch_sizes.split(",")]:
                rate, cpu = time_and_cpu(predict, pixels, batch, args.min_seconds)
                print(f"{runtime:15s} {device[:24]:24s} {load:6.2f} {invoke_batch or '':>6} {batch:5d} "
                      f"{rate:9.1f} {cpu:9.3f} {vs_ref:>8s} {vs_first:>9s}", flush=True)
    if args.paired_seconds:
        from ai_edge_litert.interpreter import Interpreter

        batch, invoke_batch = int(args.batch_sizes.split(",")[0]), int(args.invoke_batches.split(",")[0])
        scoped = ServingModel(args.model_dir, metadata, "tflite", tflite_threads=threads,
                              tflite_invoke_batch=invoke_batch)
        run = litert_predict(Interpreter(model_content=plain, num_threads=threads), invoke_batch)
        cpu = paired_cpu({"tflite": scoped.predict_outputs, "tflite-no-scope": run}, pixels, batch,
                         args.paired_seconds)
        print(f"in turns, {args.paired_seconds:g} s, batch {batch}, invoke {invoke_batch}, {threads} "
              f"thread(s): CPU ms/image with the detector {cpu['tflite']:.4f}, without "
              f"{cpu['tflite-no-scope']:.4f}: {cpu['tflite'] / cpu['tflite-no-scope']:.4f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
