"""Evaluate an exported model on a labelled folder: ``python -m model.evaluate``.

Scores exactly as the pipeline does (the shared preprocessing, the SavedModel signature) and
writes ``metrics.json`` and a self-contained ``report.html`` (confusion matrix, reliability
curve, most confident right/wrong and least confident images per class). With
``--out-of-scope DIR`` (images of other things) it also measures the model's out-of-scope
detector: the AUROC between the labelled (in-scope) images and those, and the share of each
that the model's own threshold flags.
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
    auroc,
    confusion_matrix,
    error_analysis,
    flagged_share,
    log_loss,
    min_confidence_for_accuracy,
    reliability_curve,
)
from model.out_of_scope import image_paths
from serving.metadata import read_metadata
from serving.runtimes import Outputs, ServingModel

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
    parser.add_argument("--out-of-scope", metavar="DIR", default=None,
                        help="Images of things the model does not classify (under DIR, any depth): "
                             "report the AUROC of the model's scope_score between --data and these "
                             "(the Mann-Whitney statistic) and the share of each its threshold flags.")
    return parser.parse_args(argv)


def predict_paths(model: ServingModel, paths: list[str], batch_size: int):
    """Probabilities for every decodable path; returns (kept indices, probabilities, failures)."""
    kept, outputs, failures = predict_outputs_of_paths(model, paths, batch_size)
    return kept, outputs.probabilities, failures


def predict_outputs_of_paths(model: ServingModel, paths: list[str], batch_size: int):
    """(kept indices, ``Outputs`` of every decodable path, ``{path: error}``): probabilities
    float32 [n, classes] and scope_score float32 [n] (None without a detector)."""
    kept, outputs, failures = [], [], {}
    for indices, pixels, errors in decoded_batches(paths, model.metadata, batch_size):
        failures.update({path: f"{type(error).__name__}: {error}" for path, error in errors.items()})
        if pixels is not None:
            kept.extend(indices)
            outputs.append(model.predict_outputs(pixels))
    probabilities = (np.concatenate([o.probabilities for o in outputs]) if outputs
                     else np.zeros((0, len(model.metadata.class_names)), np.float32))
    scope = (np.concatenate([o.scope_score for o in outputs]) if outputs else np.zeros(0, np.float32)
             ) if model.has_scope_score else None
    return kept, Outputs(probabilities, scope), failures


def out_of_scope_figures(model: ServingModel, in_scope: np.ndarray, paths: list[str], batch_size: int,
                         directory: str) -> tuple[dict, np.ndarray, list[str]]:
    """(figures, out-of-scope scores, their paths): the AUROC between ``in_scope`` scores and
    those of the readable ``paths``, and the shares of each flagged at the model's threshold."""
    kept, outputs, failures = predict_outputs_of_paths(model, paths, batch_size)
    scores = outputs.scope_score
    threshold = model.metadata.out_of_scope["threshold"]
    figures = {
        "data": os.path.abspath(directory), "images": len(kept), "unreadable": len(failures),
        "in_scope_images": len(in_scope), "threshold": threshold,
        "auroc": round(auroc(in_scope, scores), 6),
        "in_scope_flagged": round(flagged_share(in_scope, threshold), 6),
        "out_of_scope_flagged": round(flagged_share(scores, threshold), 6),
        "held_out_at_export": model.metadata.out_of_scope["held_out"],
    }
    return figures, scores, [paths[i] for i in kept]


def evaluate(args: argparse.Namespace) -> dict:
    metadata = read_metadata(args.model_dir)
    if args.out_of_scope and not metadata.has_scope_detector:
        raise ValueError(f"{args.model_dir} has no out-of-scope detector (its metadata.json has no "
                         "out_of_scope): export it again with model.train, or model.package "
                         "--scope-images, to measure one; or leave out --out-of-scope")
    other_paths = image_paths(args.out_of_scope) if args.out_of_scope else []
    model = ServingModel(args.model_dir, metadata)
    data = find_labelled_images(args.data)
    if data.class_names != sorted(metadata.class_names) or any(
            name not in metadata.class_names for name in data.class_names):
        raise ValueError(f"{args.data} has classes {data.class_names}, the model {metadata.class_names}")
    kept, outputs, failures = predict_outputs_of_paths(model, data.paths, args.batch_size)
    probabilities = outputs.probabilities
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
    scope = None
    if args.out_of_scope:
        metrics["out_of_scope"], other_scores, other_kept = out_of_scope_figures(
            model, outputs.scope_score, other_paths, args.batch_size, args.out_of_scope)
        scope = {"in_scope": outputs.scope_score, "out_of_scope": other_scores,
                 "out_of_scope_paths": other_kept, "figures": metrics["out_of_scope"]}
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
            examples=examples, paths=paths, labels=labels, probabilities=probabilities, scope=scope))
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
    scope = metrics.get("out_of_scope")
    if scope:
        print(f"out of scope: AUROC {scope['auroc']:.4f} ({scope['in_scope_images']} in scope, "
              f"{scope['images']} out of scope); at the model's threshold {scope['threshold']:.4f} "
              f"{scope['in_scope_flagged']:.2%} of in-scope and {scope['out_of_scope_flagged']:.2%} "
              "of out-of-scope images are flagged")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
