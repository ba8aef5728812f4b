"""Evaluate an exported model on a labelled folder: ``python -m model.evaluate``.

Scores exactly as the pipeline does (the shared preprocessing, the SavedModel signature) and
writes ``metrics.json`` and a self-contained ``report.html`` (confusion matrix, reliability
curve, most confident right/wrong and least confident images per class).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

from model.data import decoded_batches, find_labelled_images
from model.evaluation_report import render_evaluation_report
from model.metrics import (
    KAGGLE_EPS,
    accuracy,
    accuracy_coverage_curve,
    confusion_matrix,
    error_analysis,
    log_loss,
    min_confidence_for_accuracy,
    reliability_curve,
)
from serving.metadata import read_metadata
from serving.runtimes import ServingModel

_LOG = logging.getLogger("petscore.evaluate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="Exported model directory.")
    parser.add_argument("--data", required=True,
                        help="Labelled images: <class>/*.jpg folders, or cat.1.jpg-style names.")
    parser.add_argument("--output", required=True, help="Directory for metrics.json and report.html.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eps", type=float, default=KAGGLE_EPS,
                        help="Log-loss clipping (Kaggle uses 1e-15).")
    parser.add_argument("--target-accuracy", type=float, default=None,
                        help="Report the smallest --min-confidence whose scored (not withheld) "
                             "images reach this accuracy, e.g. 0.99, and the share it withholds.")
    return parser.parse_args(argv)


def predict_paths(model: ServingModel, paths: list[str], batch_size: int):
    """Probabilities for every decodable path; returns (kept indices, probabilities, failures)."""
    kept, outputs, failures = [], [], {}
    for indices, pixels, errors in decoded_batches(paths, model.metadata, batch_size):
        failures.update({path: f"{type(error).__name__}: {error}" for path, error in errors.items()})
        if pixels is not None:
            kept.extend(indices)
            outputs.append(model.predict(pixels))
    probabilities = np.concatenate(outputs) if outputs else np.zeros((0, len(model.metadata.class_names)))
    return kept, probabilities, failures


def evaluate(args: argparse.Namespace) -> dict:
    metadata = read_metadata(args.model_dir)
    model = ServingModel(args.model_dir, metadata)
    data = find_labelled_images(args.data)
    if data.class_names != sorted(metadata.class_names) or any(
            name not in metadata.class_names for name in data.class_names):
        raise ValueError(f"{args.data} has classes {data.class_names}, the model {metadata.class_names}")
    kept, probabilities, failures = predict_paths(model, data.paths, args.batch_size)
    # Map the folder's class indices onto the model's output order.
    labels = np.array([metadata.class_names.index(data.class_names[data.labels[i]]) for i in kept])
    paths = [data.paths[i] for i in kept]
    matrix = confusion_matrix(labels, probabilities, len(metadata.class_names))
    curve = reliability_curve(labels, probabilities)
    coverage = accuracy_coverage_curve(labels, probabilities)
    metrics = {
        "model_version": metadata.model_version,
        "data": os.path.abspath(args.data),
        "images": len(paths),
        "unreadable": len(failures),
        "accuracy": round(accuracy(labels, probabilities), 6),
        "log_loss": round(log_loss(labels, probabilities, args.eps), 6),
        "log_loss_eps": args.eps,
        "expected_calibration_error": round(curve["expected_calibration_error"], 6),
    }
    if args.target_accuracy is not None:
        metrics["withholding"] = min_confidence_for_accuracy(coverage, args.target_accuracy) or {
            "target_accuracy": args.target_accuracy, "min_confidence": None,
            "note": "no confidence threshold reaches this accuracy on this data"}
    examples = error_analysis(labels, probabilities, metadata.class_names)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "metrics.json"), "w") as handle:
        json.dump({**metrics, "confusion_matrix": matrix.tolist(), "class_names": metadata.class_names,
                   "reliability": curve, "accuracy_coverage": coverage, "unreadable_files": failures,
                   "examples": {c: {g: [paths[i] for i in idx] for g, idx in groups.items()}
                                for c, groups in examples.items()}}, handle, indent=2)
    with open(os.path.join(args.output, "report.html"), "w") as handle:
        handle.write(render_evaluation_report(
            title=f"petscore evaluation: {metadata.model_version}", metrics=metrics,
            class_names=metadata.class_names, matrix=matrix, curve=curve, coverage=coverage,
            examples=examples, paths=paths, labels=labels, probabilities=probabilities))
    return metrics


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    metrics = evaluate(args)
    print(f"{metrics['model_version']} on {metrics['images']} images: accuracy {metrics['accuracy']:.4f}, "
          f"log loss {metrics['log_loss']:.4f}, ECE {metrics['expected_calibration_error']:.4f}, "
          f"{metrics['unreadable']} unreadable -> {os.path.join(args.output, 'report.html')}")
    withholding = metrics.get("withholding")
    if withholding and withholding["min_confidence"] is not None:
        print(f"accuracy {withholding['target_accuracy']:g} is reached with --min-confidence "
              f"{withholding['min_confidence']!r}: {withholding['accuracy']:.4f} on the "
              f"{withholding['coverage']:.1%} of images it scores, {withholding['withheld']:.1%} withheld")
    elif withholding:
        print(f"accuracy {withholding['target_accuracy']:g}: {withholding['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
