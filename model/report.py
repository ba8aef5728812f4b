"""A self-contained HTML evaluation report: metrics, plots and thumbnails in one file."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def confusion_plot(matrix: np.ndarray, class_names: list[str]) -> str:
    figure, axis = plt.subplots(figsize=(3.5, 3.2))
    axis.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        axis.text(j, i, str(count), ha="center", va="center",
                  color="white" if count > matrix.max() / 2 else "black")
    axis.set_xticks(range(len(class_names)), class_names)
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    return _png(figure)


def reliability_plot(curve: dict) -> str:
    figure, axis = plt.subplots(figsize=(3.5, 3.2))
    bins = curve["bins"]
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axis.plot([b["mean_confidence"] for b in bins], [b["accuracy"] for b in bins], "o-",
              label="model")
    axis.set_xlabel("confidence (top probability)")
    axis.set_ylabel("accuracy")
    axis.set_title(f"ECE {curve['expected_calibration_error']:.3f}")
    axis.legend(loc="upper left", fontsize=8)
    return _png(figure)


def coverage_plot(coverage: list[dict]) -> str:
    """Accuracy of the images kept against the share kept, as --min-confidence rises."""
    figure, axis = plt.subplots(figsize=(3.5, 3.2))
    axis.plot([p["coverage"] for p in coverage], [p["accuracy"] for p in coverage], "-")
    axis.set_xlabel("coverage (share scored, not withheld)")
    axis.set_ylabel("accuracy of the scored")
    axis.set_xlim(0, 1.02)
    axis.invert_xaxis()
    return _png(figure)


def thumbnail(path: str, side: int = 128) -> str:
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_report(*, title: str, metrics: dict, class_names: list[str], matrix: np.ndarray,
                  curve: dict, coverage: list[dict], examples: dict, paths: list[str], labels: np.ndarray,
                  probabilities: np.ndarray) -> str:
    """HTML text; images are embedded as data URIs so the file can be mailed or archived."""
    esc = html.escape
    metric_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in metrics.items())
    sections = []
    for name, groups in examples.items():
        for group, indices in groups.items():
            cards = "".join(
                f'<figure><img src="data:image/jpeg;base64,{thumbnail(paths[i])}">'
                f"<figcaption>{esc(paths[i].rsplit('/', 1)[-1])}<br>true {esc(class_names[labels[i]])}, "
                f"P({esc(class_names[int(np.argmax(probabilities[i]))])})="
                f"{probabilities[i].max():.3f}</figcaption></figure>"
                for i in indices) or "<p>none</p>"
            heading = f"{esc(name)}: {esc(group.replace('_', ' '))}"
            sections.append(f"<h3>{heading}</h3><div class=grid>{cards}</div>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}} .grid{{display:flex;flex-wrap:wrap}}
figure{{margin:6px;width:140px;font-size:11px}} .plots img{{margin-right:2em}}</style></head><body>
<h1>{esc(title)}</h1><table>{metric_rows}</table>
<h2>Confusion matrix, calibration, accuracy versus coverage</h2><div class=plots>
<img alt="confusion matrix" src="data:image/png;base64,{confusion_plot(matrix, class_names)}">
<img alt="reliability curve" src="data:image/png;base64,{reliability_plot(curve)}">
<img alt="accuracy versus coverage" src="data:image/png;base64,{coverage_plot(coverage)}"></div>
<h2>Error analysis</h2>{''.join(sections)}</body></html>"""
