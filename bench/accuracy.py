"""Held-out accuracy of a real model under each preprocessing version and runtime, cross-validated.

    mkdir -p bench_output/photos  # the class folders only:
    ln -s "$PWD"/../shared/data/real-photos/{cat,dog} bench_output/photos/
    .venv/bin/python bench/accuracy.py --data bench_output/photos --base mobilenet --alpha 0.25 \
        --base-weights ../shared/data/weights/mobilenet_2_5_224_tf_no_top.h5 \
        [--folds 5] [--epochs 30] [--seed 42] [--work bench_output/accuracy]

Why cross-validated: 400 held-out photos cannot tell a 0.5-point difference from noise (one
image is 0.25 points). So the labelled folder is split into ``--folds`` stratified, seeded folds;
for each fold and preprocessing version, ``python -m model.train`` trains on the other folds
(with its own validation split for early stopping), and the fold it never saw is scored by the
float model (``model.tflite``) and by two integer models (``model_int8.tflite``, calibrated on
300 of the fold's training images): plain post-training quantization, and with the head
re-fitted on the integer base's features of all of them, as ``model.train --int8`` exports it.
Their acceptance bars are waived so that they exist to be measured. Every image is thus held out
exactly once per version. Printed and written to ``accuracy.json``: pooled accuracy and log loss
per (version, runtime), and each one's paired difference from the default (v1, float) on the
same images, with a 95% bootstrap interval (``scipy.stats.bootstrap``) and McNemar's exact test
on the images only one of them got right. Trained folds and integer models are kept under
``--work`` and reused when the command is run again with the same settings (``settings.json``
there; other settings are refused: give them another ``--work``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

from model.compare import mcnemar, paired_interval  # noqa: E402
from model.data import LabelledImages, find_labelled_images  # noqa: E402
from model.evaluate import predict_paths  # noqa: E402
from model.metrics import log_losses  # noqa: E402
from model.quantize import Int8Request, calibration_sample, export_int8  # noqa: E402
from serving.metadata import KERAS_FILE, ModelMetadata, read_metadata, write_metadata  # noqa: E402
from serving.preprocessing import CV2_JPEG, PILLOW_DRAFT_CV2, PILLOW_DRAFT_V1  # noqa: E402
from serving.runtimes import ServingModel  # noqa: E402

FLOAT, INT8_PLAIN, INT8_REFIT = "float", "int8 plain", "int8 head refit"
RUNTIMES = (FLOAT, INT8_PLAIN, INT8_REFIT)


def stratified_folds(labels: list[int], folds: int, seed: int) -> np.ndarray:
    """Fold number per image: each class's images dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    assignment = np.empty(len(labels), dtype=int)
    for label in np.unique(labels_array):
        members = rng.permutation(np.flatnonzero(labels_array == label))
        assignment[members] = np.arange(len(members)) % folds
    return assignment


def link_training_folder(data, indices, folder: str) -> str:
    """``folder/<class>/`` of symlinks to the training images, so model.train reads them as is."""
    for index in indices:
        class_dir = os.path.join(folder, data.class_names[data.labels[index]])
        os.makedirs(class_dir, exist_ok=True)
        link = os.path.join(class_dir, os.path.basename(data.paths[index]))
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(data.paths[index]), link)
    return folder


def claim_work_folder(work: str, settings: dict) -> None:
    """Trained folds are reused from ``work``: refuse one filled with other settings, whose models
    (another --epochs, --seed, ...) would otherwise be read back as this run's."""
    path = os.path.join(work, "settings.json")
    if os.path.exists(path):
        with open(path) as handle:
            recorded = json.load(handle)
        if recorded != settings:
            changed = {key: [recorded.get(key), value] for key, value in settings.items()
                       if recorded.get(key) != value}
            raise SystemExit(f"{work} holds folds trained with other settings ([then, now]: "
                             f"{changed}); pass another --work")
        return
    os.makedirs(work, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(settings, handle, indent=2, sort_keys=True)


def train_fold(args, train_dir: str, preprocessing: str, output: str) -> LabelledImages:
    """Train through the real command; return its training images (to calibrate and re-fit on)."""
    if not os.path.exists(os.path.join(output, "metadata.json")):
        subprocess.run([sys.executable, "-m", "model.train", "--data", train_dir, "--output", output,
                        "--base", args.base, "--alpha", str(args.alpha), "--base-weights", args.base_weights,
                        "--input-size", str(args.input_size), "--epochs", str(args.epochs),
                        "--seed", str(args.seed), "--preprocessing", preprocessing],
                       check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return find_labelled_images(train_dir)


def integer_variant(output: str, training: LabelledImages, held_out: list[str], labels: list[int],
                    refit: bool) -> tuple[str, ModelMetadata]:
    """A copy of the trained model with an integer model, its head re-fitted or not; the bars are
    waived so that it exists to be measured."""
    variant = f"{output}-int8-{'refit' if refit else 'plain'}"
    if not os.path.exists(os.path.join(variant, "metadata.json")):
        shutil.rmtree(variant, ignore_errors=True)
        shutil.copytree(output, variant)
        metadata = read_metadata(variant)
        request = Int8Request(calibration_sample(training.paths, seed=0), held_out, labels,
                              "training folds", "held-out fold (bars waived: measured here)",
                              max_accuracy_drop=math.inf, max_log_loss_rise=math.inf,
                              head_paths=training.paths if refit else (),
                              head_labels=training.labels if refit else ())
        classifier = keras.saving.load_model(os.path.join(variant, KERAS_FILE))
        write_metadata(variant, dataclasses.replace(
            metadata, tflite_int8=export_int8(variant, metadata, request, classifier)))
    return variant, read_metadata(variant)


def held_out_probabilities(output: str, training: LabelledImages, paths: list[str],
                           labels: list[int]) -> dict[str, np.ndarray]:
    """Each runtime's probabilities on the held-out paths (in their order)."""
    models = {FLOAT: (output, read_metadata(output), "tflite")}
    for name, refit in ((INT8_PLAIN, False), (INT8_REFIT, True)):
        models[name] = (*integer_variant(output, training, paths, labels, refit), "tflite-int8")
    result = {}
    for name, (model_dir, metadata, runtime) in models.items():
        _, probabilities, failures = predict_paths(ServingModel(model_dir, metadata, runtime), paths, 64)
        if failures:
            raise ValueError(f"unreadable held-out images: {failures}")
        result[name] = probabilities
    return result


def per_image(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right or wrong, log loss) of each image."""
    return (np.argmax(probabilities, axis=1) == labels).astype(float), log_losses(labels, probabilities)


def paired_difference(candidate: np.ndarray, baseline: np.ndarray, seed: int) -> dict:
    """Mean of candidate - baseline over the same images, with a 95% bootstrap interval
    (``model.compare.paired_interval``, as ``model.compare`` computes its own)."""
    difference = candidate - baseline
    low, high = paired_interval(lambda rows: difference[rows].mean(axis=1), len(difference), 10_000, seed)
    return {"mean": float(difference.mean()), "low": low, "high": high}


def mcnemar_p(candidate_right: np.ndarray, baseline_right: np.ndarray) -> float:
    """Exact McNemar test: are the images only one of the two got right split evenly?"""
    return mcnemar(baseline_right, candidate_right)["p_value"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Labelled images: <class>/*.jpg folders.")
    parser.add_argument("--base", default="mobilenet")
    parser.add_argument("--alpha", type=float, default=0.25)
    parser.add_argument("--base-weights", required=True)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30,
                        help="model.train's --epochs (default 30, its own): a limit, early stopping ends it")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--preprocessing", action="append",
                        help=f"versions to compare, the first the baseline (default "
                             f"{PILLOW_DRAFT_V1}, {PILLOW_DRAFT_CV2} and {CV2_JPEG})")
    parser.add_argument("--work", default="bench_output/accuracy")
    args = parser.parse_args()
    if os.path.exists(args.base_weights):  # model.train runs from the repository root
        args.base_weights = os.path.abspath(args.base_weights)
    versions = args.preprocessing or [PILLOW_DRAFT_V1, PILLOW_DRAFT_CV2, CV2_JPEG]
    work = os.path.abspath(args.work)
    claim_work_folder(work, {"data": os.path.abspath(args.data), "base": args.base, "alpha": args.alpha,
                             "base_weights": args.base_weights, "input_size": args.input_size,
                             "folds": args.folds, "seed": args.seed, "epochs": args.epochs})
    data = find_labelled_images(args.data)
    labels = np.asarray(data.labels)
    folds = stratified_folds(data.labels, args.folds, args.seed)
    pooled = {(version, runtime): np.zeros((len(labels), len(data.class_names)))
              for version in versions for runtime in RUNTIMES}
    for fold in range(args.folds):
        held_out = np.flatnonzero(folds == fold)
        train_dir = link_training_folder(data, np.flatnonzero(folds != fold),
                                         os.path.join(work, f"fold-{fold}", "train"))
        for version in versions:
            output = os.path.join(work, f"fold-{fold}", version)
            training = train_fold(args, train_dir, version, output)
            got = held_out_probabilities(output, training, [data.paths[i] for i in held_out],
                                         labels[held_out].tolist())
            for runtime, probabilities in got.items():
                pooled[(version, runtime)][held_out] = probabilities
            print(f"fold {fold} {version}: " + ", ".join(
                f"{runtime} accuracy {np.mean(np.argmax(p, 1) == labels[held_out]):.4f}"
                for runtime, p in got.items()), flush=True)

    baseline = per_image(labels, pooled[(versions[0], RUNTIMES[0])])
    rows = []
    print(f"\n{len(labels)} images, each held out once, {args.folds} folds; "
          f"differences against {versions[0]} float on the same images, 95% bootstrap intervals")
    for (version, runtime), probabilities in pooled.items():
        right, losses = per_image(labels, probabilities)
        row = {"preprocessing": version, "runtime": runtime, "images": len(labels),
               "accuracy": float(right.mean()), "log_loss": float(losses.mean()),
               "accuracy_difference": paired_difference(right, baseline[0], args.seed),
               "log_loss_difference": paired_difference(losses, baseline[1], args.seed),
               "mcnemar_p": mcnemar_p(right, baseline[0]),
               "per_fold_accuracy": [float(right[folds == fold].mean()) for fold in range(args.folds)]}
        rows.append(row)
        accuracy_gap, loss_gap = row["accuracy_difference"], row["log_loss_difference"]
        print(f"  {version:22s} {runtime:15s} accuracy {row['accuracy']:.4f} "
              f"({accuracy_gap['mean'] * 100:+.2f} points, [{accuracy_gap['low'] * 100:+.2f}, "
              f"{accuracy_gap['high'] * 100:+.2f}], McNemar p {row['mcnemar_p']:.3f})  log loss "
              f"{row['log_loss']:.4f} ({loss_gap['mean']:+.4f}, "
              f"[{loss_gap['low']:+.4f}, {loss_gap['high']:+.4f}])")
    with open(os.path.join(work, "accuracy.json"), "w") as handle:
        json.dump({"folds": args.folds, "seed": args.seed, "epochs": args.epochs, "rows": rows},
                  handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
