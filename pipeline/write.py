"""Stage 4: outputs under one prefix: ``submission.csv``, ``predictions/``, ``errors/``.

The CSV is a single file sorted by id (what Kaggle accepts), written under a temporary name and
renamed into place; the Parquet shards are finalised by Beam's file sink, which also writes to a
temporary directory first. A reader never sees a half-written file at a final path.
"""

from __future__ import annotations

import uuid

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

CSV_NAME = "submission.csv"
PREDICTIONS_DIR = "predictions"
ERRORS_DIR = "errors"
SUMMARY_NAME = "summary.json"


def output_paths(output: str) -> dict[str, str]:
    """Where each output of a run under ``output`` lands (globs for the sharded ones)."""
    return {
        "csv": FileSystems.join(output, CSV_NAME),
        "predictions": FileSystems.join(output, PREDICTIONS_DIR, "predictions-*.parquet"),
        "errors": FileSystems.join(output, ERRORS_DIR, "errors-*.parquet"),
        "summary": FileSystems.join(output, SUMMARY_NAME),
    }


def write_file_atomically(path: str, data: bytes) -> None:
    """Write to a unique sibling name, then rename over ``path``: a reader sees the old file or
    the new one, never a partial one (``os.rename`` locally; a whole-object copy on GCS)."""
    staging = f"{path}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(staging) as handle:
        handle.write(data)
    FileSystems.rename([staging], [path])


def kaggle_csv(rows: list[tuple[int, float]], clip: float) -> bytes:
    """``id,label`` rows sorted by id; labels clipped to [clip, 1 - clip] when clip > 0."""
    lines = ["id,label"]
    for image_id, label in sorted(rows):
        if clip > 0:
            label = min(max(label, clip), 1.0 - clip)
        lines.append(f"{image_id},{label:.6f}")
    return ("\n".join(lines) + "\n").encode("ascii")


class WriteKaggleCsv(beam.PTransform):
    """Prediction rows in; one ``submission.csv`` out. Emits the number of CSV rows written.

    Only rows whose file stem is an integer (the Kaggle id) are written. All (id, label) pairs
    meet in one worker to be sorted: about 100 bytes per image as Python objects, about 100 MB
    for a million images.
    """

    def __init__(self, path: str, label_column: str, clip: float):
        super().__init__()
        self._path = path
        self._label_column = label_column
        self._clip = clip

    def expand(self, predictions):
        label_column, path, clip = self._label_column, self._path, self._clip

        def write(rows):
            write_file_atomically(path, kaggle_csv(rows, clip))
            return len(rows)

        return (predictions
                | "WithKaggleId" >> beam.Filter(lambda row: row["image_id"] is not None)
                | "IdAndLabel" >> beam.Map(lambda row: (row["image_id"], row[label_column]))
                | "AllRows" >> beam.combiners.ToList()
                | "WriteCsv" >> beam.Map(write))


class WriteParquetRows(beam.PTransform):
    """Rows in; Parquet shards ``<directory>/<name>-SSSSS-of-NNNNN.parquet`` out."""

    def __init__(self, directory: str, name: str, schema: pa.Schema):
        super().__init__()
        self._prefix = FileSystems.join(directory, name)
        self._schema = schema

    def expand(self, rows):
        return rows | "WriteToParquet" >> beam.io.WriteToParquet(
            self._prefix, self._schema, file_name_suffix=".parquet")
