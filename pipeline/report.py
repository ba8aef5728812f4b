"""The run report: one self-contained HTML page per run, and the review queue.

    python -m pipeline.report OUTPUT_PREFIX [--compare-to 'gs://bkt/scores/dt=*'] [--html PATH]

Every run writes ``review/review-queue.parquet`` and ``.csv`` (a challenger's flips, then the
out-of-scope images, then the least confident, each with its ``reason``, and an empty ``label``
column for a labelling tool) and ``report.html`` just before its completion record. The report
is built from the record (counts, profile, drift) and the review queue; its thumbnails are read
from storage with the job's reader, never re-scored. This command renders it again for any
committed run, local or ``gs://``, e.g. against other earlier nights.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.drift import comparable_runs, compute_drift
from pipeline.paths import storage_path
from pipeline.records import committed_runs, read_record
from pipeline.rows import OUT_OF_SCOPE, probability_column
from pipeline.write import REPORT_NAME, REVIEW_DIR, atomically_created, write_file_atomically
from reports import html
from serving.metadata import file_chunks

REVIEW_NAME = "review-queue"
THUMBNAIL_MAX_BYTES = 32 * 1024 * 1024
# A cell starting with one of these is a formula (or may become one) to a spreadsheet: OWASP's
# "CSV Injection" list (= + - @, tab, carriage return).
FORMULA_TRIGGERS = r"^([=+\-@\t\r])"
# Why an image is in the review queue, in the queue's order: the challenger decides otherwise, the
# model's detector flags it, or it is among the least confident.
FLIP, LEAST_CONFIDENT = "flip", "least_confident"
REASONS = (FLIP, OUT_OF_SCOPE, LEAST_CONFIDENT)


def review_schema(class_names: list[str], scope: bool = False, challenger: bool = False) -> pa.Schema:
    """The review queue's columns; ``scope_score`` where the model's detector was in use, the
    challenger's decision, confidence and probabilities with one (null but on flips)."""
    return pa.schema([
        pa.field("path", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # one of REASONS
        pa.field("predicted_class", pa.string(), nullable=False),
        pa.field("decision", pa.string(), nullable=False),
        pa.field("confidence", pa.float64(), nullable=False),
        *[pa.field(probability_column(name), pa.float64(), nullable=False) for name in class_names],
        *([pa.field("scope_score", pa.float64(), nullable=False)] if scope else []),
        *([pa.field("challenger_decision", pa.string()), pa.field("challenger_confidence", pa.float64()),
           *[pa.field(f"challenger_{probability_column(name)}", pa.float64()) for name in class_names]]
          if challenger else []),
        pa.field("label", pa.string()),  # empty: for the person who labels the image
    ])


def review_reason(row: dict) -> str:
    """A review row's reason; queues written before the column had flips in none of them."""
    return row.get("reason") or (OUT_OF_SCOPE if row["decision"] == OUT_OF_SCOPE else LEAST_CONFIDENT)


def review_rows(review: list[dict], flipped: list[dict], size: int) -> list[dict]:
    """The review queue in order, each row with its ``reason``: the challenger's ``flipped``
    images first (``ChallengerComparisonFn``: the largest probability difference first), then the
    model's ``review`` rows (out of scope, then least confident: ``PredictionProfileFn``),
    ``size`` rows in all, an image once."""
    rows = [{**row, "reason": FLIP} for row in flipped]
    shown = {row["path"] for row in rows}
    rows += [{**row, "reason": review_reason(row)} for row in review if row["path"] not in shown]
    return rows[:size]


def review_paths(output: str) -> dict[str, str]:
    """The review queue's files under ``output``, by kind: ``parquet`` and ``csv``."""
    return {kind: FileSystems.join(output, REVIEW_DIR, f"{REVIEW_NAME}.{kind}")
            for kind in ("parquet", "csv")}


def spreadsheet_safe(table: pa.Table) -> pa.Table:
    """``table`` with each text cell that a spreadsheet would run as a formula neutralised as
    OWASP's "CSV Injection" page recommends: a cell starting with ``=``, ``+``, ``-``, ``@``, a
    tab or a carriage return gets a leading single quote (``'=HYPERLINK(...)``), which
    spreadsheets read as "this cell is text" and hide. Numbers stay numbers."""
    columns = [pc.replace_substring_regex(column, FORMULA_TRIGGERS, r"'\1")
               if pa.types.is_string(column.type) else column for column in table.columns]
    return pa.Table.from_arrays(columns, schema=table.schema)


def write_review_queue(output: str, rows: list[dict], class_names: list[str],
                       scope: bool = False, challenger: bool = False) -> list[str]:
    """The rows to look at first (``review_rows``), in that order, as Parquet (exact paths, for
    programs) and CSV (for people, who open it in a spreadsheet: ``spreadsheet_safe``; pyarrow
    quotes every text cell, so a line end in a path stays inside its cell); returns their paths."""
    schema = review_schema(class_names, scope, challenger)
    table = pa.Table.from_pylist([{**row, "label": None} for row in rows], schema=schema)
    paths = review_paths(output)
    with atomically_created(paths["parquet"]) as handle:
        pq.write_table(table, handle)
    text = io.BytesIO()
    pacsv.write_csv(spreadsheet_safe(table), text)
    write_file_atomically(paths["csv"], text.getvalue())
    return [paths["parquet"], paths["csv"]]


def read_review_queue(output: str) -> list[dict]:
    path = review_paths(output)["parquet"]
    if not FileSystems.exists(path):
        return []
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return pq.read_table(handle).to_pylist()


def thumbnail_of(path: str) -> str | None:
    """A thumbnail of the file a recorded ``path`` names (``pipeline.paths``), read with the
    job's reader; None when the file is gone or unreadable now."""
    try:
        data = b"".join(file_chunks(storage_path(path)))
        return html.thumbnail(data, side=128) if len(data) <= THUMBNAIL_MAX_BYTES else None
    except Exception:  # noqa: BLE001 - a report shows what it can; the run's outputs stand
        return None


def _series(earlier: list[dict], summary: dict, value, title: str, alert: bool) -> str:
    runs = [*earlier, summary]
    return html.image(html.series_plot([str(run.get("run_date")) for run in runs],
                                       [value(run) for run in runs], title, alert), title)


def _share(run: dict, class_name: str) -> float:
    counts = run["profile"]["class_counts"]
    return counts.get(class_name, 0) / max(sum(counts.values()), 1)


def drift_section(summary: dict, earlier: list[dict]) -> str:
    """The drift checks against the earlier nights scored as tonight was (the others named in a
    note: ``drift.comparable_runs``), with each night's series."""
    drift = summary["drift"]
    if not drift["compared_to"]:
        return html.section("Drift against earlier nights", f"<p>{html.esc(drift['note'])}</p>")
    earlier, _ = comparable_runs(summary, earlier)
    excluded = f"<p>{html.esc(drift['note'])}</p>" if drift.get("not_comparable") else ""
    rows = []
    for name in ("class_mix", "score_distribution", "uncertain_rate", "out_of_scope_rate", "error_rate",
                 "input_count"):
        if name not in drift:  # out_of_scope_rate: only where both sides had a detector in use
            continue
        check = drift[name]
        value = check.get("value", check.get("z"))
        threshold = check["threshold"]
        if isinstance(threshold, dict):
            threshold = f"p < {threshold['p_value']} and a change of at least {threshold['min_change']:.0%}"
        elif check["statistic"] == "z-score":
            threshold = f"|z| >= {threshold}"
        else:
            threshold = f">= {threshold}"
        detail = (f"{check['before']:.2%} before, {check['tonight']:.2%} tonight"
                  if check["statistic"] == "two-proportion z" else check.get("note", ""))
        if check["statistic"] == "z-score" and value is not None:
            detail = f"{check['tonight']} tonight, {check['mean']:.0f} ± {check['sd']:.0f} before"
        rows.append([name.replace("_", " "), check["statistic"], "" if value is None else value,
                     "" if check.get("p_value") is None else f"{check['p_value']:.3g}",
                     threshold, detail, "ALERT" if check["alert"] else "ok"])
    top_class = max(summary["profile"]["class_counts"], default=None,
                    key=lambda name: summary["profile"]["class_counts"][name])
    series = [
        _series(earlier, summary, lambda run: run["inputs"], "inputs", drift["input_count"]["alert"]),
        _series(earlier, summary, lambda run: run["errors"] / max(run["inputs"], 1), "error rate",
                drift["error_rate"]["alert"]),
        _series(earlier, summary, lambda run: run["uncertain"] / max(run["predictions"], 1),
                "uncertain rate", drift["uncertain_rate"]["alert"]),
    ]
    if "out_of_scope_rate" in drift:
        series.append(_series([run for run in earlier if run.get("out_of_scope") is not None], summary,
                              lambda run: run["out_of_scope"] / max(run["predictions"], 1),
                              "out-of-scope rate", drift["out_of_scope_rate"]["alert"]))
    if top_class is not None:
        series.append(_series(earlier, summary, lambda run: _share(run, top_class),
                              f"share of {top_class}", drift["class_mix"]["alert"]))
    verdict = (f'<p class="alert">ALERT: {html.esc(", ".join(drift["alerts"]))}</p>' if drift["alert"]
               else '<p class="ok">no drift alert</p>')
    return html.section(
        f"Drift against {len(drift['compared_to'])} earlier "
        f"night{'' if len(drift['compared_to']) == 1 else 's'}", verdict, excluded,
        html.table(["check", "statistic", "value", "p-value", "alert when", "detail", "result"],
                   rows, table_id="drift"),
        html.plots(*series))


def render_run_report(summary: dict, review: list[dict], earlier: list[dict]) -> str:
    profile = summary["profile"]
    class_names = summary["class_names"]
    headline = {key: summary.get(key) for key in (
        "inputs", "predictions", "errors", "skipped", "uncertain", "error_rate",
        "images_per_second", "elapsed_seconds", "model_version", "run_id", "run_date", "input",
        "output", "tta", "faces")}
    headline["error_rate"] = f"{summary['error_rate']:.2%}"
    by_reason = (summary.get("skipped_by_reason")  # older records: the one count they had
                 or {"already_scored": summary.get("skipped_already_scored", 0)})
    reasons = ", ".join(f"{reason.replace('_', ' ')} {count}" for reason, count in by_reason.items())
    headline["skipped"] = f"{sum(by_reason.values())} ({reasons})"
    uncertain_share = summary["uncertain"] / max(summary["predictions"], 1)
    headline["uncertain"] = f"{summary['uncertain']} ({uncertain_share:.1%} of predictions)"
    if summary.get("out_of_scope") is not None:
        headline["out_of_scope"] = (f"{summary['out_of_scope']} "
                                    f"({summary['out_of_scope'] / max(summary['predictions'], 1):.1%} "
                                    "of predictions)")
    counts = profile["class_counts"]
    ranked = sorted(counts, key=lambda name: (-counts[name], name))
    class_rows = [[name, counts[name], f"{counts[name] / max(summary['predictions'], 1):.1%}"]
                  for name in ranked]
    shown = ranked[:15]
    baseline = summary["drift"].get("score_distribution", {}).get("before")
    mix = html.plots(
        html.image(html.bar_plot(shown, [counts[name] for name in shown],
                                 "predicted classes" if len(ranked) <= 15
                                 else f"top 15 of {len(ranked)} predicted classes", "images"),
                   "class mix"),
        html.image(html.histogram_plot(profile["histogram_edges"], profile["histogram_counts"],
                                       f"distribution of {profile['score']}", profile["score"],
                                       list(baseline.values()) if baseline else None),
                   "score histogram"))
    with ThreadPoolExecutor(max_workers=16) as pool:
        thumbnails = list(pool.map(thumbnail_of, [row["path"] for row in review]))
    def card(picture, row):
        top = sorted(class_names, key=lambda n: -row[probability_column(n)])[:3]
        if review_reason(row) == FLIP:  # both models' decisions and probabilities
            return (picture, [row["path"].rsplit("/", 1)[-1], f"model: {row['decision']}",
                              f"challenger: {row['challenger_decision']}",
                              *(f"P({name}) {row[probability_column(name)]:.3f} -> "
                                f"{row[f'challenger_{probability_column(name)}']:.3f}" for name in top)])
        return (picture, [row["path"].rsplit("/", 1)[-1], f"decision: {row['decision']}",
                          *([f"scope score {row['scope_score']:.3f}"] if row.get("scope_score") is not None
                            else []),
                          *(f"P({name}) = {row[probability_column(name)]:.3f}" for name in top)])

    cards = [card(picture, row) for picture, row in zip(thumbnails, review, strict=True)]
    reasons = [review_reason(row) for row in review]
    flagged = [reason == OUT_OF_SCOPE for reason in reasons]
    flips = [c for c, reason in zip(cards, reasons, strict=True) if reason == FLIP]
    rest = [c for c, reason in zip(cards, reasons, strict=True) if reason == LEAST_CONFIDENT]
    shown_above = ", ".join(part for part in (
        f"{len(flips)} flips" if flips else "", f"{sum(flagged)} out of scope" if any(flagged) else "")
        if part)
    error_rows = [[kind, count, " | ".join(f"{path}: {message}" for path, message in
                                           profile["error_examples"].get(kind, []))]
                  for kind, count in summary["errors_by_type"].items()]
    sections = [
        html.key_values(headline, table_id="headline"),
        html.section("Class mix and scores",
                     f"<p>the {len(shown)} most predicted of {len(ranked)} classes are plotted; the "
                     "table lists every class</p>" if len(ranked) > len(shown) else "",
                     html.table(["class", "images", "share"], class_rows, table_id="classes"), mix),
        drift_section(summary, earlier),
        *([challenger_section(summary["challenger"], flips)] if summary.get("challenger") else []),
        *([out_of_scope_section(summary, [c for c, f in zip(cards, flagged, strict=True) if f])]
          if summary.get("out_of_scope") is not None else []),
        *([human_faces_section(summary)] if summary.get("human") is not None else []),
        html.section(f"Review queue: the {len(review)} images to look at first",
                     f"<p>{shown_above} (shown above), then the least confident. " if shown_above
                     else "<p>The least confident. ",
                     "Also in review/review-queue.csv and .parquet (with a reason and an empty label "
                     "column) for a labelling tool.</p>",
                     html.cards(rest)),
        html.section("Errors by type", html.table(["error type", "count", "examples"], error_rows,
                                                  table_id="errors") if error_rows
                     else "<p>no errors</p>"),
    ]
    data = {"summary": {k: v for k, v in summary.items() if k != "files"},
            "review": [{"path": row["path"], "reason": reason, "decision": row["decision"],
                        "challenger_decision": row.get("challenger_decision"),
                        "confidence": row["confidence"], "thumbnail": picture is not None}
                       for row, reason, picture in zip(review, reasons, thumbnails, strict=True)]}
    return html.page(f"petscore run {summary.get('run_id')} ({summary.get('run_date')})", sections, data)


def challenger_section(block: dict, cards: list) -> str:
    """How the challenger (``summary.json``'s ``challenger`` block) decides tonight's images
    against the model: agreement, flips by pair of decisions, probability differences per class,
    out-of-scope agreement, and the thumbnails of the flips in the review queue."""
    compared = block["predictions"]
    facts = {"challenger": f"{block['model_version']} ({block['model_sha256'][:12]})",
             "scored by both": compared,
             "same decision": "" if block["agreement"] is None else
             f"{block['agreement']:.2%} ({compared - block['flipped']} images)",
             "flips": block["flipped"],
             "challenger errors": f"{block['errors']} (images its own decoding refused)"}
    if block.get("out_of_scope") is not None:
        scope = block["out_of_scope"]
        facts["out-of-scope agreement"] = (
            f"{scope['agreement']:.2%}: both flag {scope['both']}, only the model "
            f"{scope['model_only']}, only the challenger {scope['challenger_only']}"
            if scope["agreement"] is not None else "")
    if block.get("disagreement_limit") is not None:
        facts["disagreement limit"] = f"{block['disagreement_limit']:.2%}: " + (
            "ALERT" if block["alert"] else "under it")
    flips = [[flip["model"], flip["challenger"], flip["images"]] for flip in block["flips"]]
    differences = [[name, "" if d["mean"] is None else f"{d['mean']:.4f}", f"{d['max']:.4f}"]
                   for name, d in block["probability_difference"].items()]
    verdict = (f'<p class="alert">ALERT: {block["disagreement"]:.2%} of the images change decision, '
               f'above the limit of {block["disagreement_limit"]:.2%}</p>' if block["alert"] else "")
    return html.section(
        f"Challenger: {block['flipped']} of {compared} images change decision", verdict,
        html.key_values(facts, table_id="challenger"),
        html.table(["model's decision", "challenger's decision", "images"], flips, table_id="flips")
        if flips else "<p>no flips</p>",
        html.table(["class", "mean |difference|", "largest |difference|"], differences,
                   table_id="probability-difference"),
        f"<p>The first {len(cards)} flips, the largest probability difference first (also at the top "
        "of the review queue):</p>" if cards else "",
        html.cards(cards) if cards else "")


def out_of_scope_section(summary: dict, cards: list) -> str:
    """How many images the model's detector flagged, with the thumbnails of those in the review
    queue (the highest scope scores first)."""
    count, predictions = summary["out_of_scope"], summary["predictions"]
    shown = f" The first {len(cards)} of them, the highest scores first:" if cards else ""
    return html.section(
        f"Out of scope: {count} image{'' if count == 1 else 's'} ({count / max(predictions, 1):.1%} "
        "of predictions)",
        f"<p>Images whose scope score is above the model's threshold "
        f"({summary['out_of_scope_threshold']:.4f}): none of its classes, decision "
        f"<code>out_of_scope</code>; submission.csv still holds their ids.{shown}</p>",
        html.cards(cards) if cards else "")


def human_faces_section(summary: dict) -> str:
    """``--faces``: how many images showed a human face, and how many of them the model did not
    confidently call one of its classes (decision ``human``)."""
    predictions = max(summary["predictions"], 1)
    human, faces = summary["human"], summary["with_human_faces"]
    checked = ("every image" if summary.get("faces") == "detect" else
               "only the images the model does not confidently call one of its classes (--faces unsure)")
    return html.section(
        f"Human faces: {faces} image{'' if faces == 1 else 's'} ({faces / predictions:.1%} of predictions)",
        html.key_values({"images with a human face": f"{faces} ({faces / predictions:.1%})",
                         "decision human": f"{human} ({human / predictions:.1%})",
                         "with a face, decided a class": faces - human,
                         "looked for faces in": checked}, table_id="human-faces"),
        "<p>An image with a face keeps the class the model confidently gives it (a pet with its "
        "owner); one it does not (<code>uncertain</code> or <code>out_of_scope</code>) gets the "
        "decision <code>human</code>. The human_faces column holds each checked image's count.</p>")


def write_run_report(output: str, summary: dict, review: list[dict], earlier: list[dict],
                     path: str | None = None) -> str:
    """``report.html`` under ``output`` (or at ``path``). Paths in rows are recorded text; a
    flag's own value may hold a name byte that is not UTF-8, written ``\\udcXX``."""
    target = path or FileSystems.join(output, REPORT_NAME)
    page = render_run_report(summary, review, earlier)
    write_file_atomically(target, page.encode("utf-8", "backslashreplace"))
    return target


def earlier_records(pattern: str | None, model_version: str, exclude_run: str) -> list[dict]:
    """Records of the committed runs of ``model_version`` under ``pattern``, oldest first."""
    if not pattern:
        return []
    return [record for _, record in committed_runs(pattern, exclude_run)
            if record.get("model_version") == model_version and "profile" in record]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="A run's output prefix (local or gs://).")
    parser.add_argument("--compare-to", help="Glob of earlier runs' prefixes to compute drift "
                                             "against (default: the nights the run compared to).")
    parser.add_argument("--html", help=f"Where to write the report (default: OUTPUT/{REPORT_NAME}).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = read_record(args.output)
    if summary is None or "profile" not in summary:
        print(f"petscore: {args.output} has no completion record with a profile (summary.json): "
              "the run is incomplete or older than run reports; rerun it", file=sys.stderr)
        return 1
    if args.compare_to:
        earlier = earlier_records(args.compare_to, summary["model_version"], args.output)
        summary["drift"] = compute_drift(summary, earlier, summary["drift"].get("thresholds"))
    else:
        earlier = [record for record in (read_record(run["output"])
                                         for run in summary["drift"]["compared_to"]) if record]
    path = write_run_report(args.output, summary, read_review_queue(args.output), earlier, args.html)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
