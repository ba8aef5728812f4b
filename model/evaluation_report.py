"""``model.evaluate``'s HTML report: metrics, confusion matrix, calibration, accuracy versus
coverage and thumbnails of each error group, on the shared page of ``reports.html``."""

from __future__ import annotations

import numpy as np

from reports.html import cards, esc, image, key_values, page, plots, png, pyplot, section, thumbnail


def confusion_plot(matrix: np.ndarray, class_names: list[str]) -> str:
    figure, axis = pyplot().subplots(figsize=(3.5, 3.2))
    axis.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        axis.text(j, i, str(count), ha="center", va="center",
                  color="white" if count > matrix.max() / 2 else "black")
    axis.set_xticks(range(len(class_names)), class_names)
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    return png(figure)


def reliability_plot(curve: dict) -> str:
    figure, axis = pyplot().subplots(figsize=(3.5, 3.2))
    bins = curve["bins"]
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axis.plot([b["mean_confidence"] for b in bins], [b["accuracy"] for b in bins], "o-",
              label="model")
    axis.set_xlabel("confidence (top probability)")
    axis.set_ylabel("accuracy")
    axis.set_title(f"ECE {curve['expected_calibration_error']:.3f}")
    axis.legend(loc="upper left", fontsize=8)
    return png(figure)


def coverage_plot(coverage: list[dict]) -> str:
    """Accuracy of the images kept against the share kept, as --min-confidence rises."""
    figure, axis = pyplot().subplots(figsize=(3.5, 3.2))
    axis.plot([p["coverage"] for p in coverage], [p["accuracy"] for p in coverage], "-")
    axis.set_xlabel("coverage (share scored, not withheld)")
    axis.set_ylabel("accuracy of the scored")
    axis.set_xlim(0, 1.02)
    axis.invert_xaxis()
    return png(figure)


def render_evaluation_report(*, title: str, metrics: dict, class_names: list[str],
                             matrix: np.ndarray, curve: dict, coverage: list[dict], examples: dict,
                             paths: list[str], labels: np.ndarray, probabilities: np.ndarray) -> str:
    """``model.evaluate``'s report: metrics, confusion matrix, calibration, accuracy versus
    coverage, and thumbnails of the examples of each error group."""
    groups = []
    for name, by_group in examples.items():
        for group, indices in by_group.items():
            items = []
            for i in indices:
                with open(paths[i], "rb") as handle:
                    picture = thumbnail(handle.read())
                items.append((picture, [paths[i].rsplit("/", 1)[-1],
                                        f"true {class_names[labels[i]]}, "
                                        f"P({class_names[int(np.argmax(probabilities[i]))]})="
                                        f"{probabilities[i].max():.3f}"]))
            groups.append(f"<h3>{esc(name)}: {esc(group.replace('_', ' '))}</h3>{cards(items)}")
    return page(title, [
        key_values(metrics),
        section("Confusion matrix, calibration, accuracy versus coverage", plots(
            image(confusion_plot(matrix, class_names), "confusion matrix"),
            image(reliability_plot(curve), "reliability curve"),
            image(coverage_plot(coverage), "accuracy versus coverage"))),
        section("Error analysis", *groups),
    ], {"metrics": metrics})
