"""The run summary, ``summary.json``: the run's completion record, written last, with the
night's profile (class mix, score histogram, example errors) and its drift against earlier
nights; the review queue and ``report.html`` are written just before it.

Counts come from the data (combines over the PCollections), not from metrics, so they are exact
on every runner; ``accounted`` proves that every input became exactly one prediction or error
row, or was skipped.

The record's main input is the list of files the sinks finalised (the Parquet sinks' written
file names and the CSV's path), gathered by one global combine: on any runner it cannot be
written before every other output is final, and a run killed at any point has none. It lists
those files (path relative to the output prefix, and size), so a reader trusts a run only once
``summary.json`` exists, and only the files it lists.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems

from pipeline.drift import compute_drift
from pipeline.report import write_review_queue, write_run_report
from pipeline.rows import ALREADY_SCORED, OUT_OF_SCOPE, SKIP_REASONS, UNCERTAIN, probability_column
from pipeline.write import write_file_atomically

_LOG = logging.getLogger("petscore")


def listed_files(paths: list[str], output: str) -> list[dict[str, Any]]:
    """``[{'path': relative to output, 'bytes': size}]``, sorted: the files a reader may trust."""
    prefix = output.rstrip("/") + "/"
    sizes = {metadata.path: metadata.size_in_bytes
             for result in FileSystems.match(paths) for metadata in result.metadata_list}
    return [{"path": path.removeprefix(prefix), "bytes": sizes[path]} for path in sorted(paths)]


HISTOGRAM_BINS = 10
HISTOGRAM_EDGES = [i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)]  # 0.3 is exactly 3 / 10
ERROR_EXAMPLES = 3


class PredictionProfileFn(beam.CombineFn):
    """Prediction tables -> ``{'count', 'uncertain', 'class_counts', 'histogram', 'review'}`` in
    one pass and bounded memory, a whole table at a time: counts per class, a
    ``HISTOGRAM_BINS``-bin histogram of ``score_column`` (bins [a, b) at the edges i / 10, as
    ``bisect.bisect_right`` on those edges; 1.0 falls in the last) and the ``review_size`` rows a
    person should look at first (``review_columns``): the images flagged ``out_of_scope``,
    furthest out first, then the least confident, least confident first (ties by path)."""

    def __init__(self, score_column: str, review_columns: list[str], review_size: int):
        self._score_column = score_column
        self._review_columns = review_columns
        self._review_size = review_size

    def create_accumulator(self):
        return {"count": 0, "uncertain": 0, "out_of_scope": 0, "class_counts": collections.Counter(),
                "histogram": np.zeros(HISTOGRAM_BINS, np.int64), "review": []}

    def add_input(self, profile, table):
        profile["count"] += table.num_rows
        profile["uncertain"] += pc.sum(pc.equal(table["decision"], UNCERTAIN)).as_py() or 0
        profile["out_of_scope"] += pc.sum(pc.equal(table["decision"], OUT_OF_SCOPE)).as_py() or 0
        counts = pc.value_counts(table["predicted_class"])
        profile["class_counts"].update(dict(zip(counts.field("values").to_pylist(),
                                                counts.field("counts").to_pylist(), strict=True)))
        bins = np.searchsorted(HISTOGRAM_EDGES, table[self._score_column].to_numpy(), side="right") - 1
        profile["histogram"] += np.bincount(np.clip(bins, 0, HISTOGRAM_BINS - 1), minlength=HISTOGRAM_BINS)
        if self._review_size:
            profile["review"].append(self._first_to_review([table.select(self._review_columns)]))
            if len(profile["review"]) > 16:  # merged now and then: bounded, and few merges
                profile["review"] = [self._first_to_review(profile["review"])]
        return profile

    def merge_accumulators(self, profiles):
        merged = self.create_accumulator()
        for profile in profiles:
            merged["count"] += profile["count"]
            merged["uncertain"] += profile["uncertain"]
            merged["out_of_scope"] += profile["out_of_scope"]
            merged["class_counts"].update(profile["class_counts"])
            merged["histogram"] += profile["histogram"]
            merged["review"] += profile["review"]
        if merged["review"]:
            merged["review"] = [self._first_to_review(merged["review"])]
        return merged

    def extract_output(self, profile):
        review = self._first_to_review(profile["review"]).to_pylist() if profile["review"] else []
        return {**profile, "class_counts": dict(profile["class_counts"]),
                "histogram": profile["histogram"].tolist(), "review": review}

    def _first_to_review(self, tables: list[pa.Table]) -> pa.Table:
        table = pa.concat_tables(tables)
        keys = {"confidence": table["confidence"], "path": table["path"]}
        if "scope_score" in table.column_names:  # out of scope first, the highest score first
            flagged = pc.equal(table["decision"], OUT_OF_SCOPE)
            keys = {"rank": pc.if_else(flagged, 0, 1),
                    "confidence": pc.if_else(flagged, pc.negate(table["scope_score"]), table["confidence"]),
                    "path": table["path"]}
        order = pc.sort_indices(pa.table(keys), sort_keys=[(name, "ascending") for name in keys])
        return table.take(order[:self._review_size])


class ErrorProfileFn(beam.CombineFn):
    """Error tables -> ``{error_type: [count, first ERROR_EXAMPLES (path, message)]}``."""

    def create_accumulator(self):
        return {}

    def add_input(self, profile, table):
        for row in table.select(["error_type", "path", "message"]).to_pylist():
            count, examples = profile.setdefault(row["error_type"], [0, []])
            profile[row["error_type"]][0] = count + 1
            if len(examples) < ERROR_EXAMPLES:
                examples.append((row["path"], row["message"]))
        return profile

    def merge_accumulators(self, profiles):
        merged = {}
        for profile in profiles:
            for kind, (count, examples) in profile.items():
                total, kept = merged.setdefault(kind, [0, []])
                merged[kind] = [total + count, (kept + examples)[:ERROR_EXAMPLES]]
        return merged

    def extract_output(self, profile):
        return profile


class SkippedCounts(beam.CombineFn):
    """``SkippedInputs`` in; ``{reason: count}`` out, every one of ``SKIP_REASONS`` present."""

    def create_accumulator(self):
        return dict.fromkeys(SKIP_REASONS, 0)

    def add_input(self, counts, skipped):
        counts[skipped.reason] += skipped.count
        return counts

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for counts in accumulators:
            for reason, count in counts.items():
                merged[reason] += count
        return merged

    def extract_output(self, counts):
        return counts


@dataclasses.dataclass(frozen=True)
class ReportSettings:
    """What the run's profile and report need beyond the counts.

    ``score_column``: the value whose histogram profiles the night (P(positive class) for two
    classes, the top probability otherwise); ``earlier``: records of earlier committed runs of
    this model version to compare with (``--compare-to``), oldest first.
    """

    class_names: list[str]
    score_column: str
    score_label: str
    review_size: int
    earlier: list[dict]
    thresholds: dict | None = None
    scope: bool = False  # rows carry the out-of-scope detector's score and decision


def build_summary(written: list[str], *, inputs: int, predictions: dict, errors: dict,
                  csv_rows: int, skipped: dict[str, int], score_label: str, started: float,
                  context: dict[str, Any]) -> dict[str, Any]:
    """The record's fields; ``predictions`` and ``errors`` are the two profiles above,
    ``skipped`` the ``SkippedCounts``."""
    error_count = sum(count for count, _ in errors.values())
    elapsed = time.time() - started
    return {
        **context,
        "inputs": inputs,
        "predictions": predictions["count"],
        "errors": error_count,
        "errors_by_type": {kind: errors[kind][0] for kind in sorted(errors)},
        "skipped_already_scored": skipped[ALREADY_SCORED],  # the field before skipped_by_reason
        "skipped_by_reason": dict(sorted(skipped.items())),
        "uncertain": predictions["uncertain"],
        # images the model's out-of-scope detector flagged; None where none was in use
        "out_of_scope": (predictions["out_of_scope"] if context.get("out_of_scope_threshold") is not None
                         else None),
        "csv_rows": csv_rows,
        "accounted": inputs == predictions["count"] + error_count + sum(skipped.values()),
        "error_rate": error_count / inputs if inputs else 0.0,
        "elapsed_seconds": round(elapsed, 3),
        "images_per_second": round(inputs / elapsed, 2) if elapsed > 0 else None,
        "profile": {
            "class_counts": dict(sorted(predictions["class_counts"].items())),
            "score": score_label,
            "histogram_edges": HISTOGRAM_EDGES,
            "histogram_counts": predictions["histogram"],
            "error_examples": {kind: [list(example) for example in errors[kind][1]]
                               for kind in sorted(errors)},
        },
        "files": written,
    }


def commit_run(written: list[str], *, inputs: int, predictions: dict, errors: dict,
               csv_rows: int, skipped: dict[str, int], settings: ReportSettings, started: float,
               context: dict[str, Any], path: str) -> dict[str, Any]:
    """The summary, its drift, the review queue and the report, then the record listing every
    file, last. ``predictions`` and ``errors`` are the two profiles above."""
    summary = build_summary(written, inputs=inputs, predictions=predictions, errors=errors,
                            csv_rows=csv_rows, skipped=skipped, score_label=settings.score_label,
                            started=started, context=context)
    review = predictions["review"]
    output = summary["output"]
    summary["drift"] = compute_drift(summary, settings.earlier, settings.thresholds)
    if summary["drift"]["alert"]:  # on Dataflow this runs on a worker: Cloud Logging has it
        _LOG.warning("petscore drift alert for %s against %d earlier nights: %s", output,
                     len(summary["drift"]["compared_to"]), ", ".join(summary["drift"]["alerts"]))
    written = summary["files"] + write_review_queue(output, review, settings.class_names, settings.scope)
    write_run_report(output, summary, review, settings.earlier)  # a view: not in the record
    summary["files"] = listed_files(written, output)
    write_file_atomically(path, json.dumps(summary, indent=2, sort_keys=True).encode())
    return summary


def combined_globally(pcoll, label: str, combine_fn: beam.CombineFn):
    """``combine_fn`` over the whole of ``pcoll``, as a singleton side input; an empty ``pcoll``
    gives ``combine_fn``'s result for no input. Beam's own default for an empty input would add
    two more steps to the graph (an Impulse and a side input) for every combine."""
    combined = pcoll | label >> beam.CombineGlobally(combine_fn).without_defaults()
    empty = combine_fn.extract_output(combine_fn.create_accumulator())
    return beam.pvalue.AsSingleton(combined, default_value=empty)


class WriteRunSummary(beam.PTransform):
    """``{'written': final paths of every other output, 'inputs': input counts, 'predictions':
    prediction tables, 'errors': error tables, 'skipped': SkippedInputs, 'csv_rows'}`` in; the
    review queue, ``report.html`` and, last, ``summary.json`` out. ``context`` goes in as it is;
    its ``paths_prefix`` (what every input path starts with) tells later --skip-scored runs
    whether this run can hold their paths at all.

    ``elapsed_seconds`` runs from the launch (``started``, a wall-clock timestamp) to the moment
    every other output is final. Inputs = predictions + errors + skipped (``skipped_by_reason``:
    already scored by this model version, with ``--skip-scored``; object-store folder
    placeholders). The night's profile is two bounded combines, one over
    the predictions and one over the errors, so the profile adds two steps to the graph.
    """

    def __init__(self, path: str, started: float, context: dict[str, Any], settings: ReportSettings):
        super().__init__()
        self._path = path
        self._started = started
        self._context = context
        self._settings = settings

    def expand(self, outputs):
        settings = self._settings
        review_columns = ["path", "predicted_class", "decision", "confidence",
                          *[probability_column(name) for name in settings.class_names],
                          *(["scope_score"] if settings.scope else [])]
        predictions = combined_globally(outputs["predictions"], "ProfilePredictions", PredictionProfileFn(
            settings.score_column, review_columns, settings.review_size))
        errors = combined_globally(outputs["errors"], "ProfileErrors", ErrorProfileFn())
        # Without defaults, the list travels as WriteSummary's main input, through a
        # GroupByKey (a default would arrive beside it, as the side input of an injected
        # element). There is always a written file: the CSV, even for an empty run.
        return (outputs["written"]
                | "AllWrittenFiles" >> beam.CombineGlobally(
                    beam.combiners.ToListCombineFn()).without_defaults()
                | "WriteSummary" >> beam.Map(
                    commit_run,
                    inputs=combined_globally(outputs["inputs"], "CountInputs",
                                             beam.CombineFn.from_callable(sum)),
                    predictions=predictions,
                    errors=errors,
                    csv_rows=beam.pvalue.AsSingleton(outputs["csv_rows"]),
                    skipped=combined_globally(outputs["skipped"], "CountSkipped", SkippedCounts()),
                    settings=settings,
                    started=self._started,
                    context=self._context,
                    path=self._path))
