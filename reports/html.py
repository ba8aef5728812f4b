"""Self-contained HTML reports: the evaluation report of ``model.evaluate`` and the run report of
``pipeline.report`` share this page, its tables, plots and thumbnails.

Plots are matplotlib PNGs and thumbnails small JPEGs, embedded as data URIs, so a report is one
file that opens anywhere (mailed, archived, opened from a bucket). Every number a report shows is
also embedded as JSON (``<script type="application/json" id="report-data">``) for machines.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json

import numpy as np
from PIL import ImageOps

from serving.preprocessing import open_image

esc = html.escape
STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;margin-bottom:1em} th,td{border:1px solid #ccc;padding:4px 8px;
text-align:left} td.num{text-align:right} .grid{display:flex;flex-wrap:wrap}
figure{margin:6px;width:150px;font-size:11px;word-break:break-all} .plots img{margin-right:1.5em}
.alert{color:#b00020;font-weight:bold} .ok{color:#1b5e20}"""


@functools.cache
def pyplot():
    """matplotlib's pyplot on the Agg backend, imported on first use: 0.4 s and 40 MB that a
    job which only imports this module (a worker that never renders) does not pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


# JSON inside <script> ends at the first "</script" and its parsing changes at "<!--": written as
# \u escapes, ``<``, ``>`` and ``&`` cannot start markup (Django's json_script does the same).
# json.dumps escapes U+2028/U+2029 (line ends to older JavaScript) with everything non-ASCII.
JSON_IN_HTML = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def page(title: str, sections: list[str], data: dict) -> str:
    """The whole HTML document: a title, the sections in order, and ``data`` as embedded JSON.
    Every text in it is escaped (``esc``, ``JSON_IN_HTML``): the page is inert whatever a file
    name or a message holds."""
    embedded = json.dumps(data, sort_keys=True).translate(JSON_IN_HTML)
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>{''.join(sections)}"
            f'<script type="application/json" id="report-data">{embedded}</script></body></html>')


def section(heading: str, *parts: str) -> str:
    return f"<section><h2>{esc(heading)}</h2>{''.join(parts)}</section>"


def table(header: list[str], rows: list[list], table_id: str = "") -> str:
    """Numbers are right-aligned and printed as given (format them before)."""
    def cell(value):
        kind = ' class="num"' if isinstance(value, (int, float)) else ""
        return f"<td{kind}>{esc(str(value))}</td>"
    head = "".join(f"<th>{esc(name)}</th>" for name in header)
    body = "".join(f"<tr>{''.join(cell(value) for value in row)}</tr>" for row in rows)
    identity = f' id="{esc(table_id)}"' if table_id else ""
    return f"<table{identity}><tr>{head}</tr>{body}</table>"


def key_values(mapping: dict, table_id: str = "") -> str:
    identity = f' id="{esc(table_id)}"' if table_id else ""
    rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in mapping.items())
    return f"<table{identity}>{rows}</table>"


def image(png_base64: str, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{png_base64}">'


def plots(*images: str) -> str:
    return f"<div class=plots>{''.join(images)}</div>"


def png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    pyplot().close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def bar_plot(labels: list[str], values: list[float], title: str, xlabel: str) -> str:
    figure, axis = pyplot().subplots(figsize=(4.2, 0.35 * len(labels) + 1.0))
    axis.barh(range(len(labels)), values, color="#4e79a7")
    axis.set_yticks(range(len(labels)), labels)
    axis.invert_yaxis()
    axis.set_xlabel(xlabel)
    axis.set_title(title)
    return png(figure)


def histogram_plot(edges: list[float], counts: list[int], title: str, xlabel: str,
                   baseline: list[float] | None = None) -> str:
    """Bars of ``counts`` as shares; ``baseline`` shares (earlier nights) as a step line."""
    figure, axis = pyplot().subplots(figsize=(4.2, 3.0))
    total = max(sum(counts), 1)
    widths = np.diff(edges)
    axis.bar(edges[:-1], np.asarray(counts) / total, width=widths, align="edge",
             color="#4e79a7", edgecolor="white", label="tonight")
    if baseline is not None:
        axis.step(edges, [*baseline, baseline[-1]], where="post", color="#e15759",
                  label="earlier nights")
        axis.legend(fontsize=8)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("share of images")
    axis.set_title(title)
    return png(figure)


def series_plot(labels: list[str], values: list[float], title: str, alert: bool) -> str:
    """A small time series: earlier nights, then tonight as the last, highlighted point."""
    figure, axis = pyplot().subplots(figsize=(3.2, 1.8))
    axis.plot(range(len(values)), values, "-o", color="#4e79a7", markersize=3)
    axis.plot([len(values) - 1], [values[-1]], "o", color="#b00020" if alert else "#1b5e20",
              markersize=7)
    ticks = [0, len(labels) - 1] if len(labels) > 1 else [0]
    axis.set_xticks(ticks, [labels[i] for i in ticks], fontsize=7)
    axis.tick_params(axis="y", labelsize=7)
    axis.set_title(title, fontsize=9)
    return png(figure)


def thumbnail(data: bytes, side: int = 128) -> str:
    """A small upright JPEG of the image's bytes, base64: enough for a person to label it."""
    with open_image(data) as opened:  # the loaders' formats: HEIC and AVIF too
        opened.draft("RGB", (side, side))  # a JPEG decodes at 1/2 to 1/8 scale, still >= side
        picture = ImageOps.exif_transpose(opened).convert("RGB")
        picture.thumbnail((side, side))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=75)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def cards(items: list[tuple[str | None, list[str]]]) -> str:
    """Thumbnails (or a note where there is none) with caption lines, in a wrapping grid."""
    figures = []
    for picture, lines in items:
        shown = (f'<img src="data:image/jpeg;base64,{picture}">' if picture
                 else "<div>(no thumbnail)</div>")
        figures.append(f"<figure>{shown}<figcaption>{'<br>'.join(esc(line) for line in lines)}"
                       "</figcaption></figure>")
    return f"<div class=grid>{''.join(figures)}</div>" if figures else "<p>none</p>"
