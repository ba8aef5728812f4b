"""The run summary: exact counts computed inside the pipeline, written as ``summary.json``.

Counts come from the data (Count over the PCollections), not from metrics, so they are exact on
every runner; ``accounted`` proves that every input became exactly one prediction or error row.
"""

from __future__ import annotations

import json
import time
from typing import Any

import apache_beam as beam

from pipeline.write import write_file_atomically


def build_summary(_, *, inputs: int, predictions: int, error_types: dict[str, int],
                  csv_rows: int, uncertain: int, skipped: int, started: float,
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
    }


def _count(pcoll, label: str):
    return pcoll | label >> beam.combiners.Count.Globally()


class WriteRunSummary(beam.PTransform):
    """Counts the inputs, predictions, errors and CSV rows and writes ``summary.json``.

    ``elapsed_seconds`` runs from the launch (``started``, a wall-clock timestamp) to the moment
    every count is known, i.e. after the last image was scored. Inputs = predictions + errors +
    skipped (already scored by this model version, with ``--skip-scored``).
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

        return (outputs["predictions"].pipeline
                | "Once" >> beam.Create([None])
                | "BuildSummary" >> beam.Map(
                    build_summary,
                    inputs=beam.pvalue.AsSingleton(_count(outputs["inputs"], "CountInputs")),
                    predictions=beam.pvalue.AsSingleton(_count(outputs["predictions"], "CountPredictions")),
                    error_types=beam.pvalue.AsDict(error_types),
                    csv_rows=beam.pvalue.AsSingleton(
                        outputs["csv_rows"] | "SumCsvRows" >> beam.CombineGlobally(sum)),
                    uncertain=beam.pvalue.AsSingleton(_count(uncertain, "CountUncertain")),
                    skipped=beam.pvalue.AsSingleton(_count(outputs["skipped"], "CountSkipped")),
                    started=self._started,
                    context=self._context)
                | "WriteSummary" >> beam.Map(write))
