"""Which of two models is better on labelled images, and is the difference more than noise:
``python -m model.compare --model A --model B --data DIR --output DIR``.

Both models score the same labelled images (``<class>/*.jpg`` folders or ``cat.1.jpg`` names),
each decoding them through its own metadata (input size, loader, preprocessing), so two models
of different sizes or preprocessing compare; they must have the same classes. Images either
model cannot read are left out of both, so every figure is paired. For each model: accuracy
with its Wilson score interval, log loss and expected calibration error (ECE) with paired
bootstrap intervals; for B against A: the differences with paired bootstrap intervals (the
same seeded resamples of the images for every figure), McNemar's exact test on the images one
model gets right and the other wrong, the images they decide differently, and a verdict
(``verdict``). Writes ``compare.json`` and ``compare.html``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import numpy as np

from model.data import labelled_images_for
from model.evaluate import add_tta_argument, calibration_figures, predict_views_of_paths
from model.evaluation_report import reliability_plot
from model.metrics import (
    ECE_BINS,
    KAGGLE_EPS,
    expected_calibration_error,
    headline_metrics,
    log_losses,
    reliability_curve,
)
from reports.html import cards, esc, image, key_values, page, plots, section, table, thumbnail
from serving.metadata import ModelContractError, read_metadata
from serving.runtimes import ServingModel
from serving.tta import mean_of_views

ALPHA = 0.05  # McNemar's significance level; the intervals are 1 - ALPHA
RESAMPLES = 2000
# Log loss per image, in nats, that a difference must clear (its whole interval beyond it) to
# count: far below what separates models on a leaderboard, far above float rounding between
# runtimes (1e-6), so that copies of one model never differ.
LOG_LOSS_MARGIN = 0.001
SHOWN_DISAGREEMENTS = 60
# Image indices per vectorised call of a statistic (resamples x images): bounds the bootstrap's
# memory (BCa's jackknife alone would hold images^2 of them) at a few tens of MB.
BOOTSTRAP_INDICES = 4_000_000
VERDICT_RULE = (
    "B better when at least one test favours B and none favours A: McNemar's exact test on the "
    "images exactly one model gets right (p < {alpha}, B right on more of them), or the paired "
    "bootstrap {level:.0%} interval of the log-loss difference B - A lying wholly below "
    "-{margin}; B worse the other way round; no evidence otherwise (neither test, or they "
    "disagree)")


class NothingToCompare(ValueError):
    """Fewer than two of the labelled images could be read by both models."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="DIR",
                        help="An exported model directory; give it twice: A (the one in use), then B.")
    parser.add_argument("--data", required=True,
                        help="Labelled images: <class>/*.jpg folders, or cat.1.jpg-style names.")
    parser.add_argument("--output", required=True, help="Directory for compare.json and compare.html.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eps", type=float, default=KAGGLE_EPS, help="Log-loss clipping (Kaggle: 1e-15).")
    parser.add_argument("--resamples", type=int, default=RESAMPLES,
                        help=f"Bootstrap resamples of the images (default {RESAMPLES}).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap resamples.")
    parser.add_argument("--margin", type=float, default=LOG_LOSS_MARGIN,
                        help=f"Log-loss difference (nats per image) an interval must lie beyond to "
                             f"count for the verdict (default {LOG_LOSS_MARGIN:g}).")
    add_tta_argument(parser)
    return parser.parse_args(argv)


def check_pair(model_dirs: list[str]):
    """The two models' metadata; refuses (``ValueError``, one line) anything but two models of
    the same classes, before any model is loaded."""
    if len(model_dirs) != 2:
        raise ValueError(f"--model given {len(model_dirs)} times: give it twice, A then B")
    a, b = (read_metadata(directory) for directory in model_dirs)
    if sorted(a.class_names) != sorted(b.class_names):
        raise ValueError(f"A's classes {a.class_names} are not B's {b.class_names}: only models of "
                         "the same classes compare")
    return a, b


def paired_interval(statistic: Callable[[np.ndarray], np.ndarray], count: int, resamples: int,
                    seed: int) -> list[float]:
    """[low, high]: the ``1 - ALPHA`` bootstrap interval of ``statistic`` (int indices
    [resamples, count] of the images -> float [resamples]) over ``resamples`` seeded resamples
    of the ``count`` images: SciPy's ``bootstrap``, BCa (bias-corrected and accelerated: the
    ECE of a resample is biased upward, its repeated images fill fewer bins, and a percentile
    interval can miss the estimate); where BCa is undefined, every resample giving the same
    value (copies of one model), the percentile interval, that value. Every figure with the
    same seed sees the same resamples, so the interval of a difference is paired."""
    import warnings

    from scipy.stats import bootstrap

    def vectorised(indices, axis=-1):
        return statistic(np.atleast_2d(np.moveaxis(indices, axis, -1))).reshape(np.shape(indices)[:-1])

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SciPy warns where BCa is undefined: then percentile
            interval = bootstrap((np.arange(count),), vectorised, vectorized=True, n_resamples=resamples,
                                 batch=max(1, BOOTSTRAP_INDICES // count), confidence_level=1 - ALPHA,
                                 method=method, rng=np.random.default_rng(seed)).confidence_interval
        if np.isfinite(interval.low) and np.isfinite(interval.high):
            break
    return [round(float(interval.low), 6), round(float(interval.high), 6)]


def mcnemar(a_right: np.ndarray, b_right: np.ndarray) -> dict:
    """McNemar's exact test: of the images exactly one model gets right (bool or 0/1 [n] each), is B's
    share different from one half? (SciPy's two-sided ``binomtest``; p = 1 when there are none.)"""
    from scipy.stats import binomtest

    a_right, b_right = np.asarray(a_right, bool), np.asarray(b_right, bool)
    only_a, only_b = int(np.sum(a_right & ~b_right)), int(np.sum(b_right & ~a_right))
    p = binomtest(only_b, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"only_a_right": only_a, "only_b_right": only_b, "p_value": float(p)}


def verdict(test: dict, log_loss_interval: list[float], margin: float) -> dict:
    """The verdict by ``VERDICT_RULE``: "B better", "B worse" or "no evidence", with a line
    saying why."""
    decisions = (0 if test["p_value"] >= ALPHA else 1 if test["only_b_right"] > test["only_a_right"] else -1)
    low, high = log_loss_interval
    probabilities = 1 if high < -margin else -1 if low > margin else 0
    votes = {decisions, probabilities} - {0}
    answer = {frozenset({1}): "B better", frozenset({-1}): "B worse"}.get(frozenset(votes), "no evidence")
    why = (f"McNemar p = {test['p_value']:.3g} (B alone right on {test['only_b_right']}, A alone on "
           f"{test['only_a_right']}); log loss B - A in [{low:+.4f}, {high:+.4f}] "
           f"({1 - ALPHA:.0%}, margin {margin:g})")
    if len(votes) == 2:
        why += ": the tests disagree"
    return {"verdict": answer, "line": f"{answer}: {why}",
            "rule": VERDICT_RULE.format(alpha=ALPHA, level=1 - ALPHA, margin=margin),
            "alpha": ALPHA, "log_loss_margin": margin}


def model_figures(labels: np.ndarray, probabilities: np.ndarray, losses: np.ndarray, args) -> dict:
    """Accuracy (Wilson interval), log loss and ECE (paired bootstrap intervals) of one model."""
    from scipy.stats import binomtest

    right = int(np.sum(np.argmax(probabilities, axis=1) == labels))
    wilson = binomtest(right, len(labels)).proportion_ci(confidence_level=1 - ALPHA, method="wilson")
    figures = {name: round(value, 6)
               for name, value in headline_metrics(labels, probabilities, args.eps).items()}
    return {**figures, "accuracy_interval": [round(wilson.low, 6), round(wilson.high, 6)],
            "log_loss_interval": paired_interval(lambda rows: losses[rows].mean(axis=1), len(labels),
                                                 args.resamples, args.seed),
            "expected_calibration_error_interval": paired_interval(
                lambda rows: expected_calibration_error(labels, probabilities, rows=rows), len(labels),
                args.resamples, args.seed)}


def check_inputs(args: argparse.Namespace):
    """(the two models' metadata, the labelled images in A's class order), or ``ValueError`` in
    one line: what ``main`` refuses before any model is loaded."""
    metadata = check_pair(args.model)
    return metadata, labelled_images_for(args.data, metadata[0].class_names)


def compare(args: argparse.Namespace, metadata, data) -> dict:
    """Score the images ``data`` (``model.data.LabelledImages`` in A's class order) with both
    models (``metadata``: theirs, from ``check_inputs``), compare, write ``compare.json`` and
    ``compare.html``; returns the JSON's dict."""
    classes = metadata[0].class_names
    scored = []
    for directory, meta in zip(args.model, metadata, strict=True):
        kept, views, failures = predict_views_of_paths(ServingModel(directory, meta), data.paths,
                                                       args.batch_size, args.tta)
        order = [meta.class_names.index(name) for name in classes]  # B's columns in A's order
        scored.append((dict(zip(kept, range(len(kept)), strict=True)), views.probabilities[..., order],
                       failures))
    common = sorted(set(scored[0][0]) & set(scored[1][0]))
    if len(common) < 2:
        raise NothingToCompare(f"{len(common)} of the {len(data.paths)} images could be read by both "
                               "models: nothing to compare")
    labels = np.array([data.labels[i] for i in common])
    views = [probabilities[:, [rows[i] for i in common]] for rows, probabilities, _ in scored]
    probabilities = [mean_of_views(view) for view in views]
    losses = [log_losses(labels, p, args.eps) for p in probabilities]
    right = [np.argmax(p, axis=1) == labels for p in probabilities]
    models = {}
    for name, directory, meta, view, p, loss in zip("AB", args.model, metadata, views, probabilities,
                                                    losses, strict=True):
        calibration, _ = calibration_figures(meta, labels, view, args.eps)
        models[name] = {"model_dir": os.path.abspath(directory), "model_version": meta.model_version,
                        "model_sha256": meta.sha256, "input_size": meta.input_size,
                        "preprocessing": meta.preprocessing,
                        **model_figures(labels, p, loss, args), "calibration": calibration}
    count = len(labels)
    differences = {
        "accuracy": round(models["B"]["accuracy"] - models["A"]["accuracy"], 6),
        "accuracy_interval": paired_interval(
            lambda rows: right[1][rows].mean(axis=1) - right[0][rows].mean(axis=1), count,
            args.resamples, args.seed),
        "log_loss": round(float(np.mean(losses[1] - losses[0])), 6),
        "log_loss_interval": paired_interval(lambda rows: (losses[1] - losses[0])[rows].mean(axis=1),
                                             count, args.resamples, args.seed),
        "expected_calibration_error": round(models["B"]["expected_calibration_error"]
                                            - models["A"]["expected_calibration_error"], 6),
        "expected_calibration_error_interval": paired_interval(
            lambda rows: (expected_calibration_error(labels, probabilities[1], rows=rows)
                          - expected_calibration_error(labels, probabilities[0], rows=rows)),
            count, args.resamples, args.seed),
    }
    test = mcnemar(*right)
    paths = [data.paths[i] for i in common]
    decided = [np.argmax(p, axis=1) for p in probabilities]
    disagreements = [
        {"path": paths[i], "label": classes[labels[i]],
         **{f"{name}_decision": classes[decided[k][i]] for k, name in enumerate("ab")},
         **{f"{name}_probabilities": [round(float(v), 6) for v in probabilities[k][i]]
            for k, name in enumerate("ab")}}
        for i in np.flatnonzero(decided[0] != decided[1])]
    result = {
        "data": os.path.abspath(args.data), "class_names": classes, "images": count, "tta": args.tta,
        "log_loss_eps": args.eps, "ece_bins": ECE_BINS,
        "bootstrap": {"resamples": args.resamples, "seed": args.seed, "confidence_level": 1 - ALPHA,
                      "method": "BCa (percentile where BCa is undefined), paired: the same seeded "
                                "resamples of the images for every figure"},
        "unreadable": {name: sorted(failures) for name, (_, _, failures) in zip("AB", scored, strict=True)},
        "models": models, "differences": differences, "mcnemar": test,
        "verdict": verdict(test, differences["log_loss_interval"], args.margin),
        "disagreements": disagreements,
    }
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "compare.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    with open(os.path.join(args.output, "compare.html"), "w") as handle:
        handle.write(render(result, labels, probabilities, views, metadata))
    return result


def render(result: dict, labels: np.ndarray, probabilities: list[np.ndarray], views: list[np.ndarray],
           metadata) -> str:
    """``compare.html``: the verdict, each model's figures and the differences with their
    intervals, McNemar's test, both reliability diagrams (and before calibration for a
    calibrated model), and thumbnails of the images the models decide differently."""
    def interval(values: list[float]) -> str:
        return f"[{values[0]:.4f}, {values[1]:.4f}]"

    def cell(figures: dict, figure: str, sign: str = "") -> str:
        return f"{figures[figure]:{sign}.4f} {interval(figures[f'{figure}_interval'])}"

    rows = [[figure.replace("_", " "), *(cell(result["models"][name], figure) for name in "AB"),
             cell(result["differences"], figure, "+")]
            for figure in ("accuracy", "log_loss", "expected_calibration_error")]
    diagrams = [image(reliability_plot(reliability_curve(labels, p), name),
                      f"reliability diagram of {name}") for name, p in zip("AB", probabilities, strict=True)]
    for name, meta, view in zip("AB", metadata, views, strict=True):
        _, before = calibration_figures(meta, labels, view, result["log_loss_eps"])
        if before is not None:
            diagrams.append(image(reliability_plot(before, f"{name} before calibration"),
                                  f"reliability diagram of {name} before calibration"))
    shown = []
    for item in result["disagreements"][:SHOWN_DISAGREEMENTS]:
        with open(item["path"], "rb") as handle:
            picture = thumbnail(handle.read())
        shown.append((picture, [os.path.basename(item["path"]), f"true {item['label']}",
                                f"A: {item['a_decision']} {max(item['a_probabilities']):.3f}",
                                f"B: {item['b_decision']} {max(item['b_probabilities']):.3f}"]))
    models = {name: f"{m['model_version']} ({m['model_dir']}), {m['input_size'][0]}x{m['input_size'][1]}, "
                    f"{m['preprocessing']}" for name, m in result["models"].items()}
    listed = len(result["disagreements"])
    heading = f"Images decided differently ({listed}" + (
        f", the first {SHOWN_DISAGREEMENTS} shown)" if listed > SHOWN_DISAGREEMENTS else ")")
    return page("petscore model comparison", [
        f"<p><strong>{esc(result['verdict']['line'])}</strong></p>"
        f"<p>{esc(result['verdict']['rule'])}</p>",
        key_values({**models, "data": result["data"], "images": result["images"], "tta": result["tta"]}),
        section("Figures (95% intervals: Wilson for accuracy, paired bootstrap otherwise)",
                table(["", "A", "B", "B - A"], rows),
                key_values({"A alone right": result["mcnemar"]["only_a_right"],
                            "B alone right": result["mcnemar"]["only_b_right"],
                            "McNemar exact p": f"{result['mcnemar']['p_value']:.4g}"})),
        section("Calibration", plots(*diagrams)),
        section(heading, cards(shown)),
    ], {key: value for key, value in result.items() if key != "disagreements"})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        metadata, data = check_inputs(args)
    except (ModelContractError, ValueError, OSError) as refusal:
        print(f"petscore: refused before scoring anything: {refusal}", file=sys.stderr)
        return 1
    try:
        result = compare(args, metadata, data)
    except NothingToCompare as failure:
        print(f"petscore: {failure}", file=sys.stderr)
        return 1
    for name, figures in result["models"].items():
        print(f"{name}: {figures['model_version']}: accuracy {figures['accuracy']:.4f}, log loss "
              f"{figures['log_loss']:.4f}, ECE {figures['expected_calibration_error']:.4f}")
    print(f"{result['images']} images, {len(result['disagreements'])} decided differently; "
          f"{result['verdict']['line']} -> {os.path.join(args.output, 'compare.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
