"""``model.evaluate``'s HTML report: metrics, confusion matrix, calibration, accuracy versus
coverage and thumbnails of each error group, and with ``--out-of-scope`` the detector's score
distributions, ROC curve and the images it gets wrong, on the shared page of ``reports.html``."""

from __future__ import annotations

import numpy as np

from reports.html import cards, esc, image, key_values, page, plots, png, pyplot, section, thumbnail


def confusion_plot(matrix: np.ndarray, class_names: list[str]) -> str:
    """The confusion matrix (int counts [classes, classes], rows true, columns predicted) as a
    base64 PNG, each cell labelled with its count."""
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


def reliability_plot(curve: dict, label: str = "model") -> str:
    """Accuracy against mean confidence per confidence bin (``model.metrics``'s reliability
    curve: ``bins`` and ``expected_calibration_error``) beside the diagonal, as a base64 PNG;
    ``label`` names the model (or the state of it: before calibration) in the title."""
    figure, axis = pyplot().subplots(figsize=(3.5, 3.2))
    bins = curve["bins"]
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axis.plot([b["mean_confidence"] for b in bins], [b["accuracy"] for b in bins], "o-",
              label=label)
    axis.set_xlabel("confidence (top probability)")
    axis.set_ylabel("accuracy")
    axis.set_title(f"{label}: ECE {curve['expected_calibration_error']:.4f}", fontsize=10)
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


def scope_histogram(in_scope: np.ndarray, out_of_scope: np.ndarray, threshold: float) -> str:
    """The out-of-scope score of in-scope and out-of-scope images (each as a share of its own
    images), and the model's threshold: what lies right of it is flagged."""
    figure, axis = pyplot().subplots(figsize=(4.5, 3.2))
    edges = np.histogram_bin_edges(np.concatenate([in_scope, out_of_scope, [threshold]]), bins=40)
    groups = ((in_scope, "in scope", "tab:blue"), (out_of_scope, "out of scope", "tab:red"))
    for scores, label, colour in groups:
        axis.hist(scores, bins=edges, weights=np.full(len(scores), 1 / max(len(scores), 1)), alpha=0.6,
                  label=f"{label} ({len(scores)})", color=colour)
    axis.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    axis.set_xlabel("scope_score")
    axis.set_ylabel("share of images")
    axis.legend(fontsize=8)
    return png(figure)


def scope_roc(in_scope: np.ndarray, out_of_scope: np.ndarray, figures: dict) -> str:
    """Share of out-of-scope images flagged against the share of in-scope images flagged, as the
    threshold falls; the model's threshold marked."""
    figure, axis = pyplot().subplots(figsize=(3.5, 3.2))
    thresholds = np.unique(np.concatenate([in_scope, out_of_scope]))[::-1]
    flagged_in = [0.0, *(np.mean(in_scope > t) for t in thresholds), 1.0]
    flagged_out = [0.0, *(np.mean(out_of_scope > t) for t in thresholds), 1.0]
    axis.plot(flagged_in, flagged_out, "-", label=f"AUROC {figures['auroc']:.3f}")
    axis.plot([0, 1], [0, 1], ":", color="grey")
    axis.plot([figures["in_scope_flagged"]], [figures["out_of_scope_flagged"]], "o", color="black",
              label="the model's threshold")
    axis.set_xlabel("in-scope images flagged")
    axis.set_ylabel("out-of-scope images flagged")
    axis.legend(loc="lower right", fontsize=8)
    return png(figure)


def _scope_section(scope: dict, paths: list[str], per_group: int = 8) -> str:
    figures, inside, outside = scope["figures"], scope["in_scope"], scope["out_of_scope"]
    threshold = figures["threshold"]

    def group(heading: str, scores: np.ndarray, group_paths: list[str], order: np.ndarray) -> str:
        items = []
        for i in order[:per_group]:
            with open(group_paths[i], "rb") as handle:
                items.append((thumbnail(handle.read()), [group_paths[i].rsplit("/", 1)[-1],
                                                          f"scope_score {scores[i]:.3f}"]))
        return f"<h3>{esc(heading)}</h3>{cards(items) if items else '<p>none</p>'}"

    missed = np.argsort(outside)
    missed = missed[outside[missed] <= threshold]
    flagged = np.argsort(-inside)
    flagged = flagged[inside[flagged] > threshold]
    return section(
        "Out of scope",
        key_values({key: value for key, value in figures.items() if key != "held_out_at_export"}),
        plots(image(scope_histogram(inside, outside, threshold), "scope_score distributions"),
              image(scope_roc(inside, outside, figures), "out-of-scope ROC curve")),
        group("out-of-scope images not flagged (lowest scores)", outside, scope["out_of_scope_paths"],
              missed),
        group("in-scope images flagged (highest scores)", inside, paths, flagged))


def render_evaluation_report(*, title: str, metrics: dict, class_names: list[str],
                             matrix: np.ndarray, curve: dict, coverage: list[dict], examples: dict,
                             paths: list[str], labels: np.ndarray, probabilities: np.ndarray,
                             scope: dict | None = None, curve_before: dict | None = None) -> str:
    """``model.evaluate``'s report: metrics, confusion matrix, calibration (the reliability
    diagram, and ``curve_before``'s, before calibration, for a calibrated model), accuracy versus
    coverage, and thumbnails of the examples of each error group; with ``scope`` ({"in_scope",
    "out_of_scope": scores float [n], "out_of_scope_paths", "figures"}), an out-of-scope section:
    score distributions and ROC curve with the threshold, and thumbnails of the images the
    threshold gets wrong."""
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
            image(reliability_plot(curve, "as scored"), "reliability diagram"),
            *([image(reliability_plot(curve_before, "before calibration"),
                     "reliability diagram before calibration")] if curve_before else []),
            image(coverage_plot(coverage), "accuracy versus coverage"))),
        section("Error analysis", *groups),
        *([_scope_section(scope, paths)] if scope else []),
    ], {"metrics": metrics})
