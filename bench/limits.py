"""The machine's limit, moved: every figure of issue 14 for several models, in one run.

    .venv/bin/python bench/limits.py --model NAME=MODEL_DIR [--model NAME=DIR ...]
        [--images 2000] [--rss-images 1000,10000] [--photos 'GLOB'] [--work bench_output]

For each model (its ``model.keras``) the bench exports three variants, one per preprocessing
version (``pillow-rgb-draft-v1``, today's default, ``pillow-draft-cv2-v2`` and ``cv2-jpeg-v3``),
each with a ``model_int8.tflite``. The integer models are exported for speed only: their acceptance bars are
waived here (their figures are printed), where ``model.train --int8`` keeps one only if it holds.
Then, on the same files, each in its own process (``bench/throughput.py``'s modes):
  tfdata-tflite         tf.data with TF's own JPEG decoder feeding model.tflite (baseline)
  tfdata-tflite-invoke64  the same in one LiteRT invoke per 64-image batch: the baseline as the
                        issue measured it, before serving.runtimes's small invokes (which the
                        baseline above shares)
  tfdata-pillow-tflite  tf.data through the model's own preprocessing feeding model.tflite
  direct                petscore's default (LiteRT float) on the DirectRunner, in-process
  direct-invoke64       the same in one LiteRT invoke per 64-image batch, the float default the
                        issue measured against (v1 and v3)
  direct-int8           the same as direct with --runtime tflite-int8
  direct-floor          petscore with a free decoder and a free model (v3): what a run costs
                        beyond its pixels and its model, the floor of any petscore ratio
and the float direct mode again at each ``--rss-images`` count, for peak RSS, with v1 (existing
directories) and v3 (what ``model.train`` gives new models), with the TF-decoder baseline beside
it, and the floor, at each count: two counts split each work time into a per-run cost and a per-image rate, so
the comparison with tf.data can be read apart from the run's size. Also the decode +
resize cost per image of each preprocessing version (``bench/pixels.py``) on the same files.
Prints the table and the ratios the issue targets; writes ``limits.json`` under ``--work``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import multiprocessing
import os
import sys
import types
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.pixels import time_versions  # noqa: E402
from bench.throughput import generate, link_subset, run_mode  # noqa: E402
from serving.preprocessing import CV2_JPEG, PILLOW_DRAFT_CV2, PILLOW_DRAFT_V1  # noqa: E402

MODES = {PILLOW_DRAFT_V1: ("tfdata-tflite", "tfdata-tflite-invoke64", "tfdata-pillow-tflite", "direct",
                           "direct-invoke64", "direct-int8"),
         PILLOW_DRAFT_CV2: ("tfdata-pillow-tflite", "direct", "direct-int8"),
         CV2_JPEG: ("tfdata-pillow-tflite", "direct", "direct-invoke64", "direct-int8", "direct-floor")}
NEW_VERSIONS = (PILLOW_DRAFT_CV2, CV2_JPEG)
RSS_VERSIONS = (PILLOW_DRAFT_V1, CV2_JPEG)


def export_variant(model_dir: str, preprocessing: str, output: str, images: list[str]) -> dict:
    """``model_dir``'s Keras model exported again with ``preprocessing`` and an integer model
    calibrated on ``images`` (bars waived: speed only); returns its int8 entry."""
    import keras

    from model.export import export_model
    from model.quantize import Int8Request, calibration_sample
    from serving.metadata import read_metadata

    if os.path.exists(os.path.join(output, "metadata.json")):
        return read_metadata(output).tflite_int8
    metadata = read_metadata(model_dir)
    classifier = keras.saving.load_model(os.path.join(model_dir, "model.keras"))
    sample = calibration_sample(images, seed=0)
    labels = [index % len(metadata.class_names) for index in range(len(sample))]  # unlabelled
    exported = export_model(
        classifier, output, class_names=metadata.class_names, base=metadata.base,
        base_weights=metadata.base_weights, model_version=f"{metadata.model_version}-{preprocessing}",
        preprocessing=preprocessing,
        int8=Int8Request(sample, sample, labels, "bench images", "bench images (unlabelled: speed only)",
                         max_accuracy_drop=math.inf, max_log_loss_rise=math.inf))
    return exported.tflite_int8


def per_run_and_per_image(low: dict, high: dict) -> tuple[float, float]:
    """Work seconds = per_run + images * per_image, through two runs of one mode."""
    per_image = (high["seconds"] - low["seconds"]) / (high["images"] - low["images"])
    return low["seconds"] - low["images"] * per_image, per_image


def run(args, model_dir: str, mode: str, folder: str) -> dict:
    got = run_mode(mode, folder, types.SimpleNamespace(model_dir=model_dir, work=args.work))
    print(f"  {mode:21s} {got['images']:6d} {got['work_images_per_second']:9.1f} "
          f"{got['job_images_per_second']:9.1f} {got['peak_rss_mib']:8.0f}", flush=True)
    return got


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=MODEL_DIR")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rss-images", default="1000,10000")
    parser.add_argument("--photos", help="glob of real images to use instead of generated ones")
    parser.add_argument("--work", default="bench_output")
    args = parser.parse_args()
    work = os.path.abspath(args.work)
    args.work = work
    if args.photos:
        folder = link_subset(sorted(glob.glob(args.photos))[:args.images], os.path.join(work, "photos"))
        paths = sorted(glob.glob(os.path.join(folder, "*")))
    else:
        folder = os.path.join(work, f"images-{args.images}")
        paths = generate(folder, args.images)
    rss_counts = [int(count) for count in args.rss_images.split(",") if count]
    rss_folders = {count: os.path.join(work, f"images-{count}") for count in rss_counts}
    for count, rss_folder in rss_folders.items():
        generate(rss_folder, count)

    datas = []
    for path in paths:
        with open(path, "rb") as handle:
            datas.append(handle.read())
    pixels = {version: min(ms) for version, ms in time_versions(datas, (224, 224), rounds=3).items()}
    print(f"decode + resize, ms/image on {len(datas)} images, one core: "
          + ", ".join(f"{version} {ms:.3f}" for version, ms in pixels.items()))

    results: dict = {"pixels_ms_per_image": pixels, "models": {}}
    print(f"  {'mode':21s} {'images':>6s} {'work/s':>9s} {'job/s':>9s} {'RSS MiB':>8s}")
    for spec in args.model:
        name, model_dir = spec.split("=", 1)
        entry = results["models"][name] = {}
        for preprocessing, modes in MODES.items():
            variant = os.path.join(work, "variants", f"{name}-{preprocessing}")
            # In a process of its own: a child inherits its parent's peak RSS, and TF's is ~1 GiB.
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                int8 = pool.submit(export_variant, model_dir, preprocessing, variant, paths).result()
            figures = int8["validation"]
            print(f"{name} {preprocessing} (int8 vs float on the bench images: max |diff| "
                  f"{figures['max_abs_diff']:.3f}, mean {figures['mean_abs_diff']:.4f})")
            entry[preprocessing] = {mode: run(args, variant, mode, folder) for mode in modes}
        # petscore's float with v1 and v3, its floor and the TF-decoder baseline, at each
        # --rss-images count.
        scaled = {**{f"direct {version}": (version, "direct") for version in RSS_VERSIONS},
                  "direct floor": (CV2_JPEG, "direct-floor"),
                  "tfdata-tflite": (PILLOW_DRAFT_V1, "tfdata-tflite")}
        entry["by_count"] = {
            label: {count: run(args, os.path.join(work, "variants", f"{name}-{version}"), mode, rss_folder)
                    for count, rss_folder in rss_folders.items()}
            for label, (version, mode) in scaled.items()}

    print("\nratios (work time unless said)")
    for version in NEW_VERSIONS:
        print(f"  {version}, decode + resize per image: "
              f"{pixels[PILLOW_DRAFT_V1] / pixels[version]:.2f}x v1 (target >= 2)")
    for name, entry in results["models"].items():
        v1 = entry[PILLOW_DRAFT_V1]

        def rate(modes, mode, kind="work"):
            return modes[mode][f"{kind}_images_per_second"]

        baseline = max(rate(v1, "tfdata-tflite"), rate(v1, "tfdata-pillow-tflite"))
        then = rate(v1, "tfdata-tflite-invoke64")  # the baseline as the issue measured it
        print(f"  {name}: v1 float / fastest tf.data->TFLite "
              f"{rate(v1, 'direct') / baseline:.2f}x (target >= 1.0)")
        for version in (PILLOW_DRAFT_V1, CV2_JPEG):
            modes = entry[version]
            print(f"  {name}: {version}: small invokes / one per batch, float, job "
                  f"{rate(modes, 'direct', 'job') / rate(modes, 'direct-invoke64', 'job'):.2f}x, work "
                  f"{rate(modes, 'direct') / rate(modes, 'direct-invoke64'):.2f}x")
        for version in (PILLOW_DRAFT_V1, *NEW_VERSIONS):
            modes = entry[version]
            print(f"  {name}: {version}: int8 / v1 float, end to end (job) "
                  f"{rate(modes, 'direct-int8', 'job') / rate(v1, 'direct', 'job'):.2f}x, work "
                  f"{rate(modes, 'direct-int8') / rate(v1, 'direct'):.2f}x; int8 / v1 float in one "
                  f"invoke per batch (the issue's default), job "
                  f"{rate(modes, 'direct-int8', 'job') / rate(v1, 'direct-invoke64', 'job'):.2f}x "
                  f"(target >= 1.5 for MobileNetV2); int8 / its own float, job "
                  f"{rate(modes, 'direct-int8', 'job') / rate(modes, 'direct', 'job'):.2f}x")
        for version in NEW_VERSIONS:
            new = entry[version]
            print(f"  {name}: {version} / v1, float {rate(new, 'direct') / rate(v1, 'direct'):.2f}x; "
                  f"float / fastest tf.data->TFLite {rate(new, 'direct') / baseline:.2f}x, int8 "
                  f"{rate(new, 'direct-int8') / baseline:.2f}x; float / TF-decoder tf.data->TFLite in one "
                  f"invoke per batch (the issue's baseline) {rate(new, 'direct') / then:.2f}x")
        print(f"  {name}: petscore's floor (free decoder and model) / fastest tf.data->TFLite "
              f"{rate(entry[CV2_JPEG], 'direct-floor') / baseline:.2f}x: the most any float run can reach")
        if len(rss_counts) < 2:
            continue
        low, high = min(rss_counts), max(rss_counts)
        fits = {label: per_run_and_per_image(by_count[low], by_count[high])
                for label, by_count in entry["by_count"].items()}
        for label, by_count in entry["by_count"].items():
            low_mib, high_mib = by_count[low]["peak_rss_mib"], by_count[high]["peak_rss_mib"]
            per_run, per_image = fits[label]
            versus = ("" if label == "tfdata-tflite" else
                      f", {fits['tfdata-tflite'][1] / per_image:.2f}x tf.data's per-image rate")
            print(f"  {name} {label}: peak RSS {low} -> {high} images {low_mib:.0f} -> {high_mib:.0f} MiB "
                  f"({high_mib / low_mib:.2f}x, target <= 1.10 for petscore); work time = "
                  f"{per_run:.2f} s a run + {1 / per_image:.0f} images/s{versus}")
    with open(os.path.join(work, "limits.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
