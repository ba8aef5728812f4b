"""Evaluate an exported model on a labelled folder: ``python -m model.evaluate``.

Scores exactly as the pipeline does (the shared preprocessing, the model's own runtime; with
``--tta flip`` each image and its mirror, ``serving.tta``) and writes
``metrics.json`` and a self-contained ``report.html`` (confusion matrix, reliability diagram
with the expected calibration error, most confident right/wrong and least confident images
per class). For a model calibrated at export (``metadata.json``'s ``calibration``) it reports
the same figures and diagram before calibration too: the model's probabilities with its
temperature undone (``model.calibration.before_calibration``). With
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

from model.calibration import before_calibration
from model.data import decoded_batches, labelled_images_for
from model.evaluation_report import render_evaluation_report
from model.metrics import (
    ECE_BINS,
    KAGGLE_EPS,
    accuracy_coverage_curve,
    auroc,
    confusion_matrix,
    error_analysis,
    flagged_share,
    headline_metrics,
    min_confidence_for_accuracy,
    reliability_curve,
)
from model.out_of_scope import image_paths
from serving.metadata import ModelMetadata, read_metadata
from serving.runtimes import Outputs, ServingModel
from serving.tta import TTA_MODES, Views, mean_of_views

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
    add_tta_argument(parser)
    return parser.parse_args(argv)


def add_tta_argument(parser: argparse.ArgumentParser) -> None:
    """``--tta``, shared by ``model.evaluate`` and ``model.compare``."""
    parser.add_argument("--tta", choices=TTA_MODES, default="none",
                        help="flip: score each image as it is and mirrored left-right and average "
                             "the probabilities (serving.tta: one more "
                             "inference per image); none (default): as it is.")


def predict_paths(model: ServingModel, paths: list[str], batch_size: int):
    """Probabilities for every decodable path; returns (kept indices, probabilities, failures)."""
    kept, outputs, failures = predict_outputs_of_paths(model, paths, batch_size)
    return kept, outputs.probabilities, failures


def predict_outputs_of_paths(model: ServingModel, paths: list[str], batch_size: int, tta: str = "none"):
    """(kept indices, ``Outputs`` of every decodable path, ``{path: error}``): probabilities
    float32 [n, classes] (with ``tta="flip"`` the mean of each image's and its mirror's) and
    scope_score float32 [n] (None without a detector)."""
    kept, views, failures = predict_views_of_paths(model, paths, batch_size, tta)
    return kept, Outputs(mean_of_views(views.probabilities), views.scope_score), failures


def predict_views_of_paths(model: ServingModel, paths: list[str], batch_size: int, tta: str = "none",
                           ) -> tuple[list[int], Views, dict[str, str]]:
    """(kept indices, ``Views`` of every decodable path: probabilities float32 [views, n,
    classes] and scope_score float32 [n] or None, ``{path: error}``), each path decoded once
    through the model's own preprocessing (``model.data.decoded_batches``)."""
    kept, views, scopes, failures = [], [], [], {}
    for indices, pixels, errors in decoded_batches(paths, model.metadata, batch_size):
        failures.update({path: f"{type(error).__name__}: {error}" for path, error in errors.items()})
        if pixels is not None:
            kept.extend(indices)
            batch = model.predict_views(pixels, tta)
            views.append(batch.probabilities)
            scopes.append(batch.scope_score)
    count = 2 if tta == "flip" else 1
    probabilities = (np.concatenate(views, axis=1) if views
                     else np.zeros((count, 0, len(model.metadata.class_names)), np.float32))
    scope = (np.concatenate(scopes) if scopes else np.zeros(0, np.float32)) if model.has_scope_score else None
    return kept, Views(probabilities, scope), failures


def calibration_figures(metadata: ModelMetadata, labels: np.ndarray, views: np.ndarray, eps: float,
                        ) -> tuple[dict, dict | None]:
    """(the metrics' ``calibration`` entry, the reliability curve before calibration or None):
    for a model with a temperature, its ``headline_metrics`` before calibration (each view's
    probabilities float [views, n, classes] with the temperature undone, then averaged)."""
    temperature = metadata.temperature
    if temperature is None:
        why = (metadata.calibration or {}).get("reason", "the model was exported without calibration")
        return {"temperature": None, "note": why}, None
    before = before_calibration(views, temperature)
    figures = {name: round(value, 6) for name, value in headline_metrics(labels, before, eps).items()}
    return {"temperature": temperature, "before_calibration": figures}, reliability_curve(labels, before)


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
    data = labelled_images_for(args.data, metadata.class_names)
    kept, views, failures = predict_views_of_paths(model, data.paths, args.batch_size, args.tta)
    probabilities = mean_of_views(views.probabilities)
    labels = np.array([data.labels[i] for i in kept])
    paths = [data.paths[i] for i in kept]
    matrix = confusion_matrix(labels, probabilities, len(metadata.class_names))
    curve = reliability_curve(labels, probabilities)
    coverage = accuracy_coverage_curve(labels, probabilities)
    calibration, curve_before = calibration_figures(metadata, labels, views.probabilities, args.eps)
    metrics = {
        "model_version": metadata.model_version,
        "data": os.path.abspath(args.data),
        "images": len(paths),
        "unreadable": len(failures),
        "tta": args.tta,
        **{name: round(value, 6)
           for name, value in headline_metrics(labels, probabilities, args.eps).items()},
        "log_loss_eps": args.eps,
        "ece_bins": ECE_BINS,
        "calibration": calibration,
    }
    if args.target_accuracy is not None:
        metrics["withholding"] = min_confidence_for_accuracy(coverage, args.target_accuracy) or {
            "target_accuracy": args.target_accuracy, "min_confidence": None,
            "note": "no confidence threshold reaches this accuracy on this data"}
    scope = None
    if args.out_of_scope:
        metrics["out_of_scope"], other_scores, other_kept = out_of_scope_figures(
            model, views.scope_score, other_paths, args.batch_size, args.out_of_scope)
        scope = {"in_scope": views.scope_score, "out_of_scope": other_scores,
                 "out_of_scope_paths": other_kept, "figures": metrics["out_of_scope"]}
    examples = error_analysis(labels, probabilities, metadata.class_names)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "metrics.json"), "w") as handle:
        json.dump({**metrics, "confusion_matrix": matrix.tolist(), "class_names": metadata.class_names,
                   "reliability": curve, "reliability_before_calibration": curve_before,
                   "accuracy_coverage": coverage, "unreadable_files": failures,
                   "examples": {c: {g: [paths[i] for i in idx] for g, idx in groups.items()}
                                for c, groups in examples.items()}}, handle, indent=2)
    with open(os.path.join(args.output, "report.html"), "w") as handle:
        handle.write(render_evaluation_report(
            title=f"petscore evaluation: {metadata.model_version}", metrics=metrics,
            class_names=metadata.class_names, matrix=matrix, curve=curve, curve_before=curve_before,
            coverage=coverage,
            examples=examples, paths=paths, labels=labels, probabilities=probabilities, scope=scope))
    return metrics


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    metrics = evaluate(args)
    mirrored = " (each image and its mirror)" if metrics["tta"] == "flip" else ""
    print(f"{metrics['model_version']} on {metrics['images']} images{mirrored}: accuracy "
          f"{metrics['accuracy']:.4f}, log loss {metrics['log_loss']:.4f}, ECE "
          f"{metrics['expected_calibration_error']:.4f}, {metrics['unreadable']} unreadable -> "
          f"{os.path.join(args.output, 'report.html')}")
    before = metrics["calibration"].get("before_calibration")
    if before:
        print(f"before calibration (temperature {metrics['calibration']['temperature']:.4f} undone): "
              f"accuracy {before['accuracy']:.4f}, log loss {before['log_loss']:.4f}, "
              f"ECE {before['expected_calibration_error']:.4f}")
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
