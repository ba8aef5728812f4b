"""Throughput benchmark: petscore against the baselines, same files, same model, same run.

    .venv/bin/python bench/throughput.py --model-dir MODEL [--images 2000] [--work bench_output]

Generates reproducible photo-like JPEGs (sides 300-500 px, quality 90, like the Kaggle test set),
then measures, each mode in its own process so peak RSS is its own:
  seed       Keras: load_img + predict, one image at a time (the seed notebook's loop)
  tfdata     tuned single-process tf.data: parallel decode_jpeg + resize, batch, prefetch,
             feeding the SavedModel (TensorFlow)
  tfdata-tflite  the same tf.data pipeline feeding the exported model.tflite (LiteRT)
  tfdata-tflite-invoke64  the same in one LiteRT invoke per 64-image batch: the tf.data baseline
             as issue 14 measured it, and as a script that resizes the interpreter to its batch runs
  tfdata-pillow-tflite  the same again, decoding through the model's own preprocessing
             (serving.preprocessing, via tf.numpy_function, as training does): the same pixels
             and runtime as petscore, so the like-for-like single-process limit
  direct-savedmodel  petscore on the DirectRunner, in-process, --runtime saved_model
  direct-int8  petscore on the DirectRunner, in-process, --runtime tflite-int8 (the export's
             model_int8.tflite)
  direct     petscore on the DirectRunner, in-process, default runtime (LiteRT on CPU)
  direct-invoke64  the same with one LiteRT invoke per 64-image batch (--tflite-invoke-batch=64):
             the float default before the small invokes, the baseline of the issue's targets
  direct-mt  petscore on the DirectRunner, multi_threading with one worker per core
  direct-mp  petscore on the DirectRunner, multi_processing with one worker per core
  direct-mp-1t  the same, each worker's LiteRT model on one thread (--tflite-threads=1)
  direct-floor  petscore's default with a free decoder and a free model (zero pixels, uniform
             probabilities): the files are still listed, read and hashed, every output and the
             report written. What a run costs beyond its pixels and its model: no speed of
             decoding or inference takes petscore below it
  direct-free-model  petscore's default with a free model: real reading and decoding, inference
             costs nothing. How fast petscore feeds an accelerator (a GPU worker is nearly this)
  decode     the model's own read + decode + resize alone, one process per core, nothing else:
             what the CPUs can feed at most
  decode-stage  petscore's decode stage alone in one process (``ReadAndDecodeFn``: reads and
             decodes 64-image batches on its thread pool, decode-ahead and per-image bounds
             included), its output dropped: what the stage costs beyond the decoder
  litert     model.tflite alone on pixels already in memory (one interpreter, a thread per core,
             64-image batches): what the model costs at most
A mode ending in ``@before`` runs from the checkout given by ``--baseline-repo`` (a worktree of an
earlier commit): the same mode, files and model, measured in the same run as today's code.

The tf.data modes feed LiteRT through ``serving.runtimes``, as petscore does, so they run each batch
in the same small invokes (``--tflite-invoke-batch``'s default; 1.15-1.6x faster than one invoke
per 64-image batch): the baselines keep every gain of the runtime, and the ratios measure the rest.

Each mode starts from a warm page cache. Two rates per mode:
  work  images / the seconds of the work after imports: for tf.data the model load and the
        loop, for petscore the whole score.run() (model checks, pipeline, outputs); the seed
        loop alone (model load excluded, which flatters that baseline)
  job   images / the whole process's wall time, interpreter start and imports included:
        what a user waits for (TensorFlow's import alone is seconds on a small machine)
Prints both, the ratios petscore/seed and petscore/tf.data on both, peak RSS and model load time.
Each mode also reports the CPU seconds of its work (every thread of the process: ``time.process_time``,
and for ``decode`` its worker processes too, their start-up included).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def peak_rss_mib() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mib": round(own, 1), "largest_child_rss_mib": round(children, 1)}


def generate(folder: str, count: int) -> list[str]:
    from model.synthetic import write_kaggle_test_folder

    paths = sorted(glob.glob(os.path.join(folder, "*.jpg")))
    if len(paths) != count:
        write_kaggle_test_folder(folder, count, seed=7, side_range=(300, 500), quality=90)
        paths = sorted(glob.glob(os.path.join(folder, "*.jpg")))
    return paths


def link_subset(paths: list[str], folder: str) -> str:
    """A folder of symlinks to ``paths`` (a smaller run over the very same files)."""
    os.makedirs(folder, exist_ok=True)
    for path in paths:
        target = os.path.join(folder, os.path.basename(path))
        if not os.path.exists(target):
            os.symlink(os.path.abspath(path), target)
    return folder


def link_photos(photos: list[str], folder: str, count: int) -> str:
    """A folder of ``count`` hard links ``1.jpg`` ... ``<count>.jpg``, image i a link to
    ``photos[(i - 1) % len(photos)]``: a night of any size (10^6 files) from a few real photos,
    without the disk space or time to write that many JPEGs. Distinct Kaggle ids, so every
    image has its CSV row. ext4 allows 65,000 links per file: 50 photos make up to 3.25 M."""
    os.makedirs(folder, exist_ok=True)
    with os.scandir(folder) as entries:
        present = sum(1 for _ in entries)
    if present != count:
        for index in range(present + 1, count + 1):
            os.link(photos[(index - 1) % len(photos)], os.path.join(folder, f"{index}.jpg"))
    return folder


def warm_page_cache(folder: str) -> None:
    """Read every file once, so no mode pays (or is spared) a cold disk; a file hard-linked
    many times (``link_photos``) is read once."""
    seen = set()
    with os.scandir(folder) as entries:
        for entry in entries:
            inode = entry.inode()
            if entry.name.endswith(".jpg") and inode not in seen:
                seen.add(inode)
                with open(entry.path, "rb") as handle:
                    handle.read()


def count_images(folder: str) -> int:
    with os.scandir(folder) as entries:
        return sum(1 for entry in entries if entry.name.endswith(".jpg"))


def run_seed(model_dir: str, paths: list[str]) -> dict:
    import keras
    import numpy as np

    from serving.metadata import read_metadata

    metadata = read_metadata(model_dir)
    started = time.monotonic()
    model = keras.saving.load_model(os.path.join(model_dir, "model.keras"))
    load = time.monotonic() - started
    started = time.monotonic()
    for path in paths:
        image = keras.utils.load_img(path, target_size=tuple(metadata.input_size))
        model.predict(np.asarray(image, dtype="float32")[None], verbose=0)
    return {"seconds": time.monotonic() - started, "model_load_seconds": load}


def run_tfdata(model_dir: str, paths: list[str], runtime: str, pillow: bool, batch_size: int = 64,
               invoke_batch: int | None = None) -> dict:
    import tensorflow as tf

    from serving.metadata import read_metadata
    from serving.preprocessing import decode_and_resize
    from serving.runtimes import LITERT_INVOKE_BATCH, ServingModel

    metadata = read_metadata(model_dir)
    started = time.monotonic()
    model = ServingModel(model_dir, metadata, runtime,
                         tflite_invoke_batch=invoke_batch or LITERT_INVOKE_BATCH)
    load = time.monotonic() - started
    size = tuple(metadata.input_size)

    def decode(path):
        if pillow:  # the model's own preprocessing, as model/data.py feeds training
            pixels = tf.numpy_function(
                lambda p: decode_and_resize(open(p, "rb").read(), size, metadata.resize_method,
                                            preprocessing=metadata.preprocessing),
                [path], tf.uint8, stateful=False)
            return tf.ensure_shape(pixels, (*size, 3))
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.cast(tf.clip_by_value(tf.image.resize(image, size), 0, 255), tf.uint8)

    dataset = (tf.data.Dataset.from_tensor_slices(paths)
               .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
               .batch(batch_size).prefetch(tf.data.AUTOTUNE))
    started = time.monotonic()
    for batch in dataset:
        model.predict(batch.numpy())
    return {"seconds": load + time.monotonic() - started, "model_load_seconds": load}


def run_direct(model_dir: str, pattern: str, output: str, extra: list[str]) -> dict:
    from pipeline import score

    started = time.monotonic()
    summary = score.run(["--input", pattern, "--model-dir", model_dir, "--output", output,
                         "--overwrite", *extra])
    assert summary["accounted"] and summary["errors"] == 0, summary
    return {"seconds": time.monotonic() - started, "summary_images_per_second": summary["images_per_second"]}


def free_model() -> None:
    """direct-free-model: inference costs nothing (uniform probabilities and, for a model with a
    detector, zero scope scores), everything else runs. Both ways a scorer asks: ``predict`` and,
    where the code has it, ``predict_outputs`` (one call for both outputs)."""
    import numpy as np

    from serving import runtimes

    def uniform(self, images):
        return np.full((len(images), len(self.metadata.class_names)), 1 / len(self.metadata.class_names),
                       np.float32)

    runtimes.ServingModel.check_reference_predictions = lambda self: 0.0
    runtimes.ServingModel.predict = uniform
    if hasattr(runtimes, "Outputs"):
        runtimes.ServingModel.predict_outputs = lambda self, images, tta="none": runtimes.Outputs(
            uniform(self, images), np.zeros(len(images), np.float32) if self.has_scope_score else None)


def free_decoder_and_model() -> None:
    """direct-floor: decoding and inference cost nothing, everything else runs as it is."""
    import numpy as np

    from pipeline import decode

    def free_decoder(data, size, *args, out=None, **kwargs):  # writes no pixel
        return np.zeros((*size, 3), np.uint8) if out is None else out

    decode.decode_and_resize = free_decoder
    free_model()


_DECODE_ARGS: tuple = ()


def _read_and_decode(path: str) -> None:
    from serving.preprocessing import decode_and_resize

    with open(path, "rb") as handle:
        decode_and_resize(handle.read(), *_DECODE_ARGS)


def run_decode(model_dir: str, paths: list[str]) -> dict:
    """decode: the model's own read + decode + resize, one process per core (forked, started
    before timing), nothing kept: what the CPUs can feed at most."""
    import multiprocessing

    from serving.metadata import read_metadata

    global _DECODE_ARGS
    metadata = read_metadata(model_dir)
    _DECODE_ARGS = (tuple(metadata.input_size), metadata.resize_method, 64_000_000, metadata.preprocessing)
    cores = os.cpu_count()
    pool = multiprocessing.get_context("fork").Pool(cores)
    pool.map(_read_and_decode, paths[:cores])
    started = time.monotonic()
    pool.map(_read_and_decode, paths, chunksize=16)
    seconds = time.monotonic() - started
    pool.close()
    pool.join()  # reaped: their CPU seconds count in RUSAGE_CHILDREN (child() adds them)
    return {"seconds": seconds}


def run_decode_stage(model_dir: str, paths: list[str], batch_size: int = 64) -> dict:
    """decode-stage: ``ReadAndDecodeFn`` driven as the runner drives it (one bundle of every
    batch), its pool sized as the pipeline sizes it. Only the arguments every version of the
    stage takes, so that ``@before`` runs an earlier checkout's stage the same way."""
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import MIN_TIMESTAMP

    from pipeline.decode import ReadAndDecodeFn
    from pipeline.options import ThreadBudget
    from pipeline.rows import ListedImage, PathBatch
    from serving.metadata import read_metadata

    metadata = read_metadata(model_dir)
    stage = ReadAndDecodeFn(tuple(metadata.input_size), metadata.resize_method, 64_000_000, 64 << 20,
                            "bench", ThreadBudget(), metadata.preprocessing)
    batches = [PathBatch([ListedImage(path) for path in paths[start:start + batch_size]])
               for start in range(0, len(paths), batch_size)]
    stage.setup()
    stage.start_bundle()
    started, cpu_started = time.monotonic(), time.process_time()
    decoded = 0
    for batch in batches:
        decoded += sum(len(out.value) for out in stage.process(batch, GlobalWindow(), MIN_TIMESTAMP)
                       if not hasattr(out, "tag"))
    decoded += sum(len(out.value) for out in stage.finish_bundle() if not hasattr(out, "tag"))
    seconds, cpu_seconds = time.monotonic() - started, time.process_time() - cpu_started
    stage.teardown()
    assert decoded == len(paths), f"{len(paths) - decoded} images not decoded"
    return {"seconds": seconds, "work_cpu_seconds": cpu_seconds}


def run_litert(model_dir: str, paths: list[str], batch_size: int = 64) -> dict:
    """litert: model.tflite alone, a thread per core, on 256 decoded images cycled until every
    path's worth of images has been scored: what the model costs at most."""
    import numpy as np

    from serving.metadata import read_metadata
    from serving.preprocessing import decode_and_resize
    from serving.runtimes import ServingModel

    metadata = read_metadata(model_dir)
    size = tuple(metadata.input_size)
    pixels = np.stack([decode_and_resize(open(path, "rb").read(), size, metadata.resize_method,
                                         preprocessing=metadata.preprocessing) for path in paths[:256]])
    model = ServingModel(model_dir, metadata, "tflite")
    model.predict(pixels[:batch_size])
    started = time.monotonic()
    for start in range(0, len(paths), batch_size):
        count = min(batch_size, len(paths) - start)
        model.predict(pixels[start % 256:][:count])  # 256 is a multiple of the batch size
    return {"seconds": time.monotonic() - started}


def child(args) -> None:
    """One mode, in this process; prints a JSON line. The petscore modes never hold the list of
    paths here: at a million images it alone would add ~100 MiB to the peak RSS they report."""
    pattern = os.path.join(args.images_dir, "*.jpg")
    paths = None if args.mode.startswith("direct") else sorted(glob.glob(pattern))
    images = count_images(args.images_dir) if paths is None else len(paths)
    cpu_started = time.process_time()
    if args.mode == "decode":
        result = run_decode(args.model_dir, paths)
    elif args.mode == "decode-stage":
        result = run_decode_stage(args.model_dir, paths)
    elif args.mode == "litert":
        result = run_litert(args.model_dir, paths)
    elif args.mode == "seed":
        result = run_seed(args.model_dir, paths)
    elif args.mode.startswith("tfdata"):
        runtime = "tflite" if "tflite" in args.mode else "saved_model"
        result = run_tfdata(args.model_dir, paths, runtime, pillow="pillow" in args.mode,
                            invoke_batch=64 if args.mode.endswith("invoke64") else None)
    else:
        if args.mode == "direct-floor":
            free_decoder_and_model()
        if args.mode == "direct-free-model":
            free_model()
        extra = {"direct": [], "direct-floor": [], "direct-free-model": [],
                 "direct-savedmodel": ["--runtime=saved_model"],
                 "direct-int8": ["--runtime=tflite-int8"],
                 "direct-invoke64": ["--tflite-invoke-batch=64"],
                 "direct-mt": ["--direct_running_mode=multi_threading",
                               f"--direct_num_workers={os.cpu_count()}"],
                 "direct-mp": ["--direct_running_mode=multi_processing",
                               f"--direct_num_workers={os.cpu_count()}"],
                 "direct-mp-1t": ["--direct_running_mode=multi_processing",
                                  f"--direct_num_workers={os.cpu_count()}", "--tflite-threads=1"],
                 }[args.mode]
        result = run_direct(args.model_dir, pattern, os.path.join(args.work, f"out-{args.mode}"), extra)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.update(images=images, work_images_per_second=images / result["seconds"],
                  cpu_seconds=time.process_time() - cpu_started + children.ru_utime + children.ru_stime,
                  **peak_rss_mib())
    print("RESULT " + json.dumps(result))


def run_mode(mode: str, images_dir: str, args) -> dict:
    """One mode in a fresh process; its result plus the process's whole wall time. ``MODE@before``
    runs this file's ``MODE`` with the code of ``args.baseline_repo`` (an earlier checkout), in
    that checkout: every path handed to the child is absolute."""
    warm_page_cache(images_dir)
    mode, _, before = mode.partition("@")
    repo = os.path.abspath(args.baseline_repo) if before else REPO
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    process = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--mode", mode,
         "--model-dir", os.path.abspath(args.model_dir), "--images-dir", os.path.abspath(images_dir),
         "--work", os.path.abspath(os.path.join(args.work, before or "now"))],
        capture_output=True, text=True, env=env, cwd=repo)
    job_seconds = time.monotonic() - started
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not lines:
        print(process.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"mode {mode} failed")
    result = json.loads(lines[-1][len("RESULT "):])
    return {**result, "job_seconds": job_seconds, "job_images_per_second": result["images"] / job_seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--work", default=os.path.join(REPO, "bench_output"))
    parser.add_argument("--modes",
                        default="seed,tfdata,tfdata-tflite,tfdata-pillow-tflite,direct-savedmodel,direct,"
                                "direct-mt,direct-mp")
    parser.add_argument("--seed-images", type=int, default=300,
                        help="The seed loop is slow: time it on this many images (rate is per image).")
    parser.add_argument("--baseline-repo", help="A checkout of an earlier commit, for MODE@before modes.")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--images-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return 0
    folder = os.path.join(args.work, f"images-{args.images}")
    paths = generate(folder, args.images)
    seed_folder = link_subset(paths[:args.seed_images], os.path.join(args.work, f"images-{args.images}-seed"))
    print(f"{'mode':21s} {'images':>6s} {'work s':>7s} {'work img/s':>10s} {'job s':>7s} {'job img/s':>9s} "
          f"{'peak RSS MiB':>12s} {'model load s':>12s}")
    results = {}
    for mode in args.modes.split(","):
        got = results[mode] = run_mode(mode, seed_folder if mode == "seed" else folder, args)
        load = got.get("model_load_seconds")
        rss = f"{got['peak_rss_mib']:.0f}"
        if got["largest_child_rss_mib"] > got["peak_rss_mib"]:
            rss += f" (+{got['largest_child_rss_mib']:.0f})"
        print(f"{mode:21s} {got['images']:6d} {got['seconds']:7.1f} {got['work_images_per_second']:10.1f} "
              f"{got['job_seconds']:7.1f} {got['job_images_per_second']:9.1f} {rss:>12s} "
              f"{'' if load is None else f'{load:.2f}':>12s}", flush=True)
    petscore = [mode for mode in results if mode.startswith("direct") and mode != "direct-floor"]
    for rate in ("work_images_per_second", "job_images_per_second"):
        best = max(petscore, key=lambda mode: results[mode][rate], default=None)
        for baseline in ("seed", "tfdata", "tfdata-tflite", "tfdata-tflite-invoke64", "tfdata-pillow-tflite"):
            if best and baseline in results:
                ratio = results[best][rate] / results[baseline][rate]
                print(f"{rate.split('_')[0]:8s} petscore ({best}) / {baseline:20s} = {ratio:.2f}x")
    with open(os.path.join(args.work, f"results-{args.images}.json"), "w") as handle:
        json.dump({"cpu_count": os.cpu_count(), "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
