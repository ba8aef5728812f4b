"""Stage 4: outputs under one prefix: ``submission.csv``, ``predictions/``, ``errors/``.

The CSV is a single file sorted by id (what Kaggle accepts), written under a temporary name and
renamed into place; the Parquet shards are finalised by Beam's file sink, which also writes to a
temporary directory first. A reader never sees a half-written file at a final path.
"""

from __future__ import annotations

import csv
import io
import uuid

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from pipeline.rows import file_stem, probability_column

CSV_NAME = "submission.csv"
PREDICTIONS_DIR = "predictions"
ERRORS_DIR = "errors"
SUMMARY_NAME = "summary.json"
BINARY, MULTICLASS = "binary", "multiclass"
CSV_FORMATS = ("auto", BINARY, MULTICLASS)


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


def multiclass_csv(rows: list[tuple[str, list[float]]], class_names: list[str], clip: float) -> bytes:
    """Multi-class Kaggle submission (e.g. Dog Breed Identification): ``id,<class 1>,...``, one
    row per image sorted by id, every class's probability (clipped to [clip, 1 - clip] when
    clip > 0); ids are file stems as they are (hex strings there, not integers)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["id", *class_names])
    for stem, probabilities in sorted(rows):
        if clip > 0:
            probabilities = [min(max(p, clip), 1.0 - clip) for p in probabilities]
        writer.writerow([stem, *(f"{p:.6g}" for p in probabilities)])
    return text.getvalue().encode("utf-8")


def resolve_csv_format(csv_format: str, class_names: list[str]) -> str:
    """``auto``: binary (``id,label``) for two classes, multiclass otherwise."""
    if csv_format == "auto":
        return BINARY if len(class_names) == 2 else MULTICLASS
    if csv_format == BINARY and len(class_names) != 2:
        raise ValueError(f"--csv-format binary needs a two-class model; this one has "
                         f"{len(class_names)} classes: use --csv-format multiclass")
    return csv_format


class WriteKaggleCsv(beam.PTransform):
    """Prediction rows in; one ``submission.csv`` out. Emits the number of CSV rows written.

    ``binary`` (dogs-vs-cats): ``id,label`` with label = P(``positive_class``), only rows whose
    file stem is an integer (the Kaggle id). ``multiclass``: ``id,<every class>``, every row.
    All rows meet in one worker to be sorted: about 100 bytes per image as Python objects for
    binary (about 100 MB for a million images), plus 8 bytes per class for multiclass.
    """

    def __init__(self, path: str, class_names: list[str], csv_format: str, positive_class: str,
                 clip: float):
        super().__init__()
        self._path = path
        self._class_names = list(class_names)
        self._format = csv_format
        self._positive_class = positive_class
        self._clip = clip

    def expand(self, predictions):
        path, clip, class_names = self._path, self._clip, self._class_names
        if self._format == BINARY:
            label_column = probability_column(self._positive_class)
            keyed = (predictions
                     | "WithKaggleId" >> beam.Filter(lambda row: row["image_id"] is not None)
                     | "IdAndLabel" >> beam.Map(lambda row: (row["image_id"], row[label_column])))

            def render(rows):
                return kaggle_csv(rows, clip)
        else:
            columns = [probability_column(name) for name in class_names]
            keyed = predictions | "IdAndProbabilities" >> beam.Map(
                lambda row: (file_stem(row["path"]), [row[column] for column in columns]))

            def render(rows):
                return multiclass_csv(rows, class_names, clip)

        def write(rows):
            write_file_atomically(path, render(rows))
            return len(rows)

        return (keyed
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
