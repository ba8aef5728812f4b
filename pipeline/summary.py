"""The run summary, ``summary.json``: the run's completion record, written last.

Counts come from the data (Count over the PCollections), not from metrics, so they are exact on
every runner; ``accounted`` proves that every input became exactly one prediction or error row.

The record's main input is the list of files the sinks finalised (the Parquet sinks' written
file names and the CSV's path), gathered by one global combine: on any runner it cannot be
written before every other output is final, and a run killed at any point has none. It lists
those files (path relative to the output prefix, and size), so a reader trusts a run only once
``summary.json`` exists, and only the files it lists.
"""

from __future__ import annotations

import json
import time
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipeline.write import write_file_atomically


def listed_files(paths: list[str], output: str) -> list[dict[str, Any]]:
    """``[{'path': relative to output, 'bytes': size}]``, sorted: the files a reader may trust."""
    prefix = output.rstrip("/") + "/"
    sizes = {metadata.path: metadata.size_in_bytes
             for result in FileSystems.match(paths) for metadata in result.metadata_list}
    return [{"path": path.removeprefix(prefix), "bytes": sizes[path]} for path in sorted(paths)]


def build_summary(written: list[str], *, inputs: int, predictions: int,
                  error_types: dict[str, int], csv_rows: int, uncertain: int, skipped: int,
                  started: float, context: dict[str, Any]) -> dict[str, Any]:
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
        "files": listed_files(written, context["output"]),
    }


def _count(pcoll, label: str):
    return pcoll | label >> beam.combiners.Count.Globally()


class WriteRunSummary(beam.PTransform):
    """``{'written': final paths of every other output, 'inputs', 'predictions', 'errors',
    'skipped', 'csv_rows'}`` in; ``summary.json`` out, last. ``context`` goes in as it is; its
    ``paths_prefix`` (what every input path starts with) tells later --skip-scored runs whether
    this run can hold their paths at all.

    ``elapsed_seconds`` runs from the launch (``started``, a wall-clock timestamp) to the moment
    every other output is final. Inputs = predictions + errors + skipped (already scored by this
    model version, with ``--skip-scored``).
    """

    def __init__(self, path: str, started: float, context: dict[str, Any]):
        super().__init__()
        self._path = path
        self._started = started
        self._context = context

    def expand(self, outputs):
        path = self._path
        error_types = (outputs["errors"]
                       | "ErrorType" >> beam.Map(lambda row: row["error_type"])
                       | "CountErrorTypes" >> beam.combiners.Count.PerElement())
        uncertain = outputs["predictions"] | "Uncertain" >> beam.Filter(
            lambda row: row["decision"] == "uncertain")

        def write(summary):
            write_file_atomically(path, json.dumps(summary, indent=2, sort_keys=True).encode())
            return summary

        # Without defaults, the list travels as BuildSummary's main input, through a
        # GroupByKey (a default would arrive beside it, as the side input of an injected
        # element). There is always a written file: the CSV, even for an empty run.
        return (outputs["written"]
                | "AllWrittenFiles" >> beam.CombineGlobally(
                    beam.combiners.ToListCombineFn()).without_defaults()
                | "BuildSummary" >> beam.Map(
                    build_summary,
                    inputs=beam.pvalue.AsSingleton(_count(outputs["inputs"], "CountInputs")),
                    predictions=beam.pvalue.AsSingleton(_count(outputs["predictions"], "CountPredictions")),
                    error_types=beam.pvalue.AsDict(error_types),
                    csv_rows=beam.pvalue.AsSingleton(outputs["csv_rows"]),
                    uncertain=beam.pvalue.AsSingleton(_count(uncertain, "CountUncertain")),
                    skipped=beam.pvalue.AsSingleton(_count(outputs["skipped"], "CountSkipped")),
                    started=self._started,
                    context=self._context)
                | "WriteSummary" >> beam.Map(write))
