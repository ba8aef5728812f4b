"""Issue 32's table for one exported model on held-out labelled photos: log loss, accuracy and
expected calibration error as exported (before its temperature), calibrated, mirrored
(``--tta flip``) and both; how to average an image and its mirror; what the mirror costs.

    .venv/bin/python bench/calibration.py --model-dir /work/models/a025-800 \
        --data /work/models/data-holdout [--batch-size 64] [--repeats 3] [--output calibration.json]

Every image is decoded once and scored through ``ServingModel.predict_views(images, "flip")``
(the image and its left-right mirror, as ``predict_outputs(images, tta="flip")`` averages them):
"calibrated" is the image's own view, "mirrored" the mean of the two. "As exported" undoes the
model's temperature (``model.calibration.before_calibration``, exact to float32 rounding); a
temperature fitted at export but not applied (it did not lower the held-out log loss there) is
applied here to show what it would have done; a model without one gives the first and third
rows only. Averaging rules compared: the arithmetic mean of the probabilities (what
``serving.tta`` does) and the mean of the logits (the geometric mean of the probabilities,
renormalised), image by image with a paired interval. For reference, the temperature that fits
the held-out photos themselves (an oracle: the most any temperature could do), and a temperature
fitted on the mirrored probabilities (what ``--tta flip`` serves) judged by the export's own
rule, a two-fold cross-fit on these photos (``model.calibration.judge_temperature``: each half
scored by the temperature the other half fitted). Cost: inference
seconds of ``predict_outputs`` on the decoded images with and without ``tta="flip"``,
alternated ``--repeats`` times, the median ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.architecture import SMALLEST_NORMAL_FLOAT32  # noqa: E402
from model.calibration import (  # noqa: E402
    before_calibration,
    fit_temperature,
    judge_temperature,
    temperature_scale,
)
from model.compare import paired_interval  # noqa: E402
from model.data import decoded_batches, labelled_images_for  # noqa: E402
from model.metrics import headline_metrics, log_losses  # noqa: E402
from serving.metadata import read_metadata  # noqa: E402
from serving.runtimes import ServingModel  # noqa: E402
from serving.tta import mean_of_views  # noqa: E402


def mean_of_logits(views: np.ndarray) -> np.ndarray:
    """softmax of the mean over views of log(p) (float [views, n, classes] -> [n, classes]): the
    mean of the logits, up to a constant per row; the geometric mean of p, renormalised."""
    from scipy.special import softmax

    return softmax(np.mean(np.log(np.maximum(views, SMALLEST_NORMAL_FLOAT32)), axis=0), axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--data", required=True, help="Labelled held-out images.")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="Timing rounds (none, flip) alternated.")
    parser.add_argument("--output", default=None, help="Also write the figures here as JSON.")
    args = parser.parse_args(argv)

    metadata = read_metadata(args.model_dir)
    model = ServingModel(args.model_dir, metadata, runtime=args.runtime)
    data = labelled_images_for(args.data, metadata.class_names)
    batches, labels = [], []
    for indices, pixels, _ in decoded_batches(data.paths, metadata, args.batch_size):
        if pixels is not None:
            batches.append(pixels)
            labels.extend(data.labels[i] for i in indices)
    labels = np.asarray(labels)
    views = np.concatenate([model.predict_views(pixels, "flip").probabilities for pixels in batches], axis=1)
    temperature = metadata.temperature
    if temperature:  # applied at export: the model's views are calibrated
        exported, calibrated = np.stack([before_calibration(view[np.newaxis], temperature)
                                         for view in views]), views
    else:  # as exported; a temperature fitted but not applied is measured all the same
        temperature = (metadata.calibration or {}).get("temperature")
        exported = views
        calibrated = (np.stack([temperature_scale(view, temperature) for view in views])
                      if temperature else None)
    rows = {"as exported": exported[0], "mirrored": mean_of_views(exported),
            "mirrored (mean of logits)": mean_of_logits(exported)}
    if calibrated is not None:
        rows.update({"calibrated": calibrated[0], "calibrated + mirrored": mean_of_views(calibrated),
                     "calibrated + mirrored (mean of logits)": mean_of_logits(calibrated)})
    # For reference, not a result: the temperature that fits these very photos best (an oracle).
    oracle = fit_temperature(labels, exported[0])
    rows[f"temperature fitted on these photos (T = {oracle:.3f})"] = temperature_scale(exported[0], oracle)
    figures = {name: {key: round(value, 6) for key, value in headline_metrics(labels, p).items()}
               for name, p in rows.items()}
    # A temperature for the mirrored probabilities themselves, judged held out as an export would.
    refit = judge_temperature(labels, mean_of_views(views))  # what the model serves with --tta flip
    figures[f"mirrored, then a temperature refitted on them (held out, T = {refit['temperature']:.3f})"] = {
        "log_loss": refit["held_out"]["log_loss_after"],
        "accuracy": figures["mirrored"]["accuracy"],  # a temperature never changes the top class
        "expected_calibration_error": refit["held_out"]["ece_after"]}
    plain = figures["as exported"]["log_loss"]
    # The two averaging rules image by image: log loss of the mean of the logits minus that of
    # the mean of the probabilities, with a paired 95% bootstrap interval.
    rules = {}
    for name in ("mirrored", "calibrated + mirrored"):
        if name in rows:
            gap = log_losses(labels, rows[f"{name} (mean of logits)"]) - log_losses(labels, rows[name])
            rules[name] = {"mean": round(float(gap.mean()), 6), "interval": paired_interval(
                lambda indices, gap=gap: gap[indices].mean(axis=1), len(gap), 2000, 0)}

    seconds = {"none": [], "flip": []}
    for _ in range(args.repeats):
        for mode in seconds:
            start = time.perf_counter()
            for pixels in batches:
                model.predict_outputs(pixels, tta=mode)
            seconds[mode].append(time.perf_counter() - start)
    ratio = statistics.median(f / n for f, n in zip(seconds["flip"], seconds["none"], strict=True))

    applied = "applied at export" if metadata.temperature else "fitted at export, not applied"
    print(f"{metadata.model_version} on {len(labels)} images of {args.data}, runtime {model.runtime}, "
          f"temperature {temperature} ({applied if temperature else 'none fitted'})")
    print(f"{'':42} {'log loss':>9} {'change':>7} {'accuracy':>9} {'ECE':>7}")
    for name, values in figures.items():
        print(f"{name:42} {values['log_loss']:9.4f} {values['log_loss'] / plain - 1:+7.1%} "
              f"{values['accuracy']:9.4f} {values['expected_calibration_error']:7.4f}")
    for name, gap in rules.items():
        print(f"{name}: mean of logits - mean of probabilities, log loss {gap['mean']:+.4f} "
              f"(95% interval {gap['interval'][0]:+.4f} to {gap['interval'][1]:+.4f})")
    print(f"inference with tta flip / without: {ratio:.2f}x (median of {args.repeats}; seconds "
          f"{[round(s, 2) for s in seconds['none']]} vs {[round(s, 2) for s in seconds['flip']]})")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"model_version": metadata.model_version, "data": os.path.abspath(args.data),
                       "images": len(labels), "runtime": model.runtime, "temperature": temperature,
                       "temperature_applied_at_export": metadata.temperature is not None,
                       "figures": figures, "logits_minus_probabilities": rules,
                       "mirrored_temperature": refit,
                       "inference_seconds": seconds, "flip_cost_ratio": ratio},
                      handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
