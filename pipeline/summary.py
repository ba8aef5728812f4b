"""The run summary, ``summary.json``: the run's completion record, written last, with the
night's profile (class mix, score histogram, example errors) and its drift against earlier
nights; the review queue and ``report.html`` are written just before it.

Counts come from the data (Count over the PCollections), not from metrics, so they are exact on
every runner; ``accounted`` proves that every input became exactly one prediction or error row.

The record's main input is the list of files the sinks finalised (the Parquet sinks' written
file names and the CSV's path), gathered by one global combine: on any runner it cannot be
written before every other output is final, and a run killed at any point has none. It lists
those files (path relative to the output prefix, and size), so a reader trusts a run only once
``summary.json`` exists, and only the files it lists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipeline.drift import compute_drift
from pipeline.report import write_review_queue, write_run_report
from pipeline.rows import probability_column
from pipeline.write import write_file_atomically

_LOG = logging.getLogger("petscore")


def listed_files(paths: list[str], output: str) -> list[dict[str, Any]]:
    """``[{'path': relative to output, 'bytes': size}]``, sorted: the files a reader may trust."""
    prefix = output.rstrip("/") + "/"
    sizes = {metadata.path: metadata.size_in_bytes
             for result in FileSystems.match(paths) for metadata in result.metadata_list}
    return [{"path": path.removeprefix(prefix), "bytes": sizes[path]} for path in sorted(paths)]


HISTOGRAM_BINS = 10


class HistogramCombineFn(beam.CombineFn):
    """Counts of values in [0, 1] over ``HISTOGRAM_BINS`` equal bins (1.0 falls in the last)."""

    def create_accumulator(self):
        return [0] * HISTOGRAM_BINS

    def add_input(self, counts, value):
        counts[min(int(value * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
        return counts

    def merge_accumulators(self, accumulators):
        return [sum(column) for column in zip(*accumulators, strict=True)]

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


def build_summary(written: list[str], *, inputs: int, predictions: int,
                  error_types: dict[str, int], csv_rows: int, uncertain: int, skipped: int,
                  class_counts: dict[str, int], histogram: list[int],
                  error_examples: dict[str, list], score_label: str, started: float,
                  context: dict[str, Any]) -> dict[str, Any]:
    errors = sum(error_types.values())
    elapsed = time.time() - started
    return {
        **context,
        "inputs": inputs,
        "predictions": predictions,
        "errors": errors,
        "errors_by_type": dict(sorted(error_types.items())),
        "skipped_already_scored": skipped,
        "uncertain": uncertain,
        "csv_rows": csv_rows,
        "accounted": inputs == predictions + errors + skipped,
        "error_rate": errors / inputs if inputs else 0.0,
        "elapsed_seconds": round(elapsed, 3),
        "images_per_second": round(inputs / elapsed, 2) if elapsed > 0 else None,
        "profile": {
            "class_counts": dict(sorted(class_counts.items())),
            "score": score_label,
            "histogram_edges": [i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)],
            "histogram_counts": histogram,
            "error_examples": {kind: [list(example) for example in examples]
                               for kind, examples in sorted(error_examples.items())},
        },
        "files": written,
    }


def commit_run(summary: dict[str, Any], *, review: list[dict], settings: ReportSettings,
               path: str) -> dict[str, Any]:
    """Drift, the review queue and the report, then the record listing every file, last."""
    output = summary["output"]
    summary["drift"] = compute_drift(summary, settings.earlier, settings.thresholds)
    if summary["drift"]["alert"]:  # on Dataflow this runs on a worker: Cloud Logging has it
        _LOG.warning("petscore drift alert for %s against %d earlier nights: %s", output,
                     len(summary["drift"]["compared_to"]), ", ".join(summary["drift"]["alerts"]))
    written = summary["files"] + write_review_queue(output, review, settings.class_names)
    write_run_report(output, summary, review, settings.earlier)  # a view: not in the record
    summary["files"] = listed_files(written, output)
    write_file_atomically(path, json.dumps(summary, indent=2, sort_keys=True).encode())
    return summary


def _count(pcoll, label: str):
    return pcoll | label >> beam.combiners.Count.Globally()


class WriteRunSummary(beam.PTransform):
    """``{'written': final paths of every other output, 'inputs', 'predictions', 'errors',
    'skipped', 'csv_rows'}`` in; the review queue, ``report.html`` and, last, ``summary.json``
    out. ``context`` goes in as it is; its ``paths_prefix`` (what every input path starts with)
    tells later --skip-scored runs whether this run can hold their paths at all.

    ``elapsed_seconds`` runs from the launch (``started``, a wall-clock timestamp) to the moment
    every other output is final. Inputs = predictions + errors + skipped (already scored by this
    model version, with ``--skip-scored``). Every profile statistic is a bounded combine: class
    counts, a histogram, the ``review_size`` least confident rows, 3 example errors per type.
    """

    def __init__(self, path: str, started: float, context: dict[str, Any], settings: ReportSettings):
        super().__init__()
        self._path = path
        self._started = started
        self._context = context
        self._settings = settings

    def expand(self, outputs):
        settings = self._settings
        predictions, errors = outputs["predictions"], outputs["errors"]
        error_types = (errors
                       | "ErrorType" >> beam.Map(lambda row: row["error_type"])
                       | "CountErrorTypes" >> beam.combiners.Count.PerElement())
        error_examples = (errors
                          | "ErrorExample" >> beam.Map(
                              lambda row: (row["error_type"], (row["path"], row["message"])))
                          | "ThreePerType" >> beam.combiners.Sample.FixedSizePerKey(3))
        uncertain = predictions | "Uncertain" >> beam.Filter(lambda row: row["decision"] == "uncertain")
        class_counts = (predictions
                        | "PredictedClass" >> beam.Map(lambda row: row["predicted_class"])
                        | "CountClasses" >> beam.combiners.Count.PerElement())
        score_column = settings.score_column
        histogram = (predictions
                     | "Score" >> beam.Map(lambda row: row[score_column])
                     | "ScoreHistogram" >> beam.CombineGlobally(HistogramCombineFn()))
        columns = ["path", "predicted_class", "decision", "confidence",
                   *[probability_column(name) for name in settings.class_names]]
        review = (predictions
                  | "ReviewColumns" >> beam.Map(lambda row: {name: row[name] for name in columns})
                  | "LeastConfident" >> beam.CombineGlobally(beam.combiners.TopCombineFn(
                      settings.review_size, key=lambda row: (row["confidence"], row["path"]),
                      reverse=True)))
        # Without defaults, the list travels as BuildSummary's main input, through a
        # GroupByKey (a default would arrive beside it, as the side input of an injected
        # element). There is always a written file: the CSV, even for an empty run.
        return (outputs["written"]
                | "AllWrittenFiles" >> beam.CombineGlobally(
                    beam.combiners.ToListCombineFn()).without_defaults()
                | "BuildSummary" >> beam.Map(
                    build_summary,
                    inputs=beam.pvalue.AsSingleton(_count(outputs["inputs"], "CountInputs")),
                    predictions=beam.pvalue.AsSingleton(_count(predictions, "CountPredictions")),
                    error_types=beam.pvalue.AsDict(error_types),
                    csv_rows=beam.pvalue.AsSingleton(outputs["csv_rows"]),
                    uncertain=beam.pvalue.AsSingleton(_count(uncertain, "CountUncertain")),
                    skipped=beam.pvalue.AsSingleton(_count(outputs["skipped"], "CountSkipped")),
                    class_counts=beam.pvalue.AsDict(class_counts),
                    histogram=beam.pvalue.AsSingleton(histogram),
                    error_examples=beam.pvalue.AsDict(error_examples),
                    score_label=settings.score_label,
                    started=self._started,
                    context=self._context)
                | "WriteSummary" >> beam.Map(commit_run, review=beam.pvalue.AsSingleton(review),
                                             settings=settings, path=self._path))
