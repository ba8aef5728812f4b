"""Stage 4: outputs under one prefix: ``submission.csv``, ``predictions/``, ``errors/`` (and, with
a challenger, ``challenger/predictions/`` and ``challenger/errors/``).

The CSV is a single file sorted by id (what Kaggle accepts), written under a temporary name and
renamed into place; the Parquet shards are finalised by Beam's file sink, which also writes to a
temporary directory first. A reader never sees a half-written file at a final path.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import uuid
from collections.abc import Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.stats import ApproximateQuantilesCombineFn
from apache_beam.transforms.window import GlobalWindow, TimestampedValue
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.rows import METRICS_NAMESPACE, file_stem, probability_column

CSV_NAME = "submission.csv"
PREDICTIONS_DIR = "predictions"
ERRORS_DIR = "errors"
SUMMARY_NAME = "summary.json"
REPORT_NAME = "report.html"
CSV_PARTS_DIR = "csv-parts"
REVIEW_DIR = "review"
CHALLENGER_DIR = "challenger"  # the challenger's predictions/ and errors/ (--challenger-model)
COPY_CHUNK_BYTES = 1 << 20
BINARY, MULTICLASS = "binary", "multiclass"
CSV_FORMATS = ("auto", BINARY, MULTICLASS)


def output_paths(output: str) -> dict[str, str]:
    """Where each output of a run under ``output`` lands (globs for the sharded ones)."""
    return {
        "csv": FileSystems.join(output, CSV_NAME),
        "predictions": FileSystems.join(output, PREDICTIONS_DIR, "*.parquet"),
        "errors": FileSystems.join(output, ERRORS_DIR, "*.parquet"),
        "summary": FileSystems.join(output, SUMMARY_NAME),
    }


def run_directories(output: str) -> list[str]:
    """The directories a run writes under ``output``; Beam's sinks stage in ``beam-temp-*``
    directories inside them."""
    return [FileSystems.join(output, name)
            for name in (PREDICTIONS_DIR, ERRORS_DIR, CSV_PARTS_DIR, REVIEW_DIR, CHALLENGER_DIR)]


def find_run_files(output: str) -> list[str]:
    """Every file a run, finished or killed, can leave under ``output``: the outputs, their
    ``.tmp-*`` staging siblings, CSV parts and the sinks' temporary files. Nothing else under
    the prefix is touched."""
    patterns = [FileSystems.join(output, f"{name}*") for name in (CSV_NAME, SUMMARY_NAME, REPORT_NAME)]
    patterns += [FileSystems.join(directory, "**") for directory in run_directories(output)]
    return sorted({metadata.path for result in FileSystems.match(patterns)
                   for metadata in result.metadata_list})


def delete_with_directories(paths: list[str], directories: list[str]) -> None:
    """Delete ``paths``, then whichever of ``directories`` still exist: a local filesystem keeps
    emptied directories (and Beam's sinks leave ``beam-temp-*`` ones); object stores have none."""
    if paths:
        FileSystems.delete(paths)
    remaining = [directory for directory in directories if FileSystems.exists(directory)]
    if remaining:
        FileSystems.delete(remaining)


@contextlib.contextmanager
def atomically_created(path: str):
    """A handle on a unique sibling name that is renamed over ``path`` once closed: a reader
    sees the old file or the new one, never a partial one (``os.rename`` locally; a whole-object
    copy on GCS). A crash leaves only the ``.tmp-*`` sibling, which --overwrite deletes."""
    staging = f"{path}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(staging) as handle:
        yield handle
    FileSystems.rename([staging], [path])


def write_file_atomically(path: str, data: bytes) -> None:
    with atomically_created(path) as handle:
        handle.write(data)


def csv_cell(text: str) -> str:
    """``text`` as one RFC 4180 cell: quoted (its quotes doubled) when it holds a comma, a
    quote, a CR or an LF. Python 3.11's ``csv.writer`` leaves a lone CR bare (with ``\\n`` line
    ends), which CSV readers take for a line end: a file name with a CR split its row in two."""
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\r\n') else text


def csv_header(csv_format: str, class_names: list[str]) -> bytes:
    """``id,label`` (binary) or ``id,<class 1>,...,<class N>`` (multiclass)."""
    names = ["id", *(["label"] if csv_format == BINARY else class_names)]
    return (",".join(map(csv_cell, names)) + "\n").encode("utf-8")


CSV_CHUNK_ROWS = 65536  # rows formatted at a time: a part's text is never whole in memory


def csv_id_array(keys) -> np.ndarray:
    """``submission.csv`` ids as one array: int64 for Kaggle's integer ids (8 bytes an id, not a
    Python int's 28 and a list's pointer), object (``str``) for file stems."""
    keys = np.asarray(keys, dtype=object if len(keys) and isinstance(keys[0], str) else None)
    return keys.astype(np.int64) if keys.dtype != object else keys


def csv_chunks(keys, values: np.ndarray, csv_format: str, clip: float) -> Iterator[bytes]:
    """CSV lines sorted by id (``keys``, unique: ints or str), ``values`` (float [n, columns])
    clipped to [clip, 1 - clip] when clip > 0, ``CSV_CHUNK_ROWS`` lines at a time.

    binary (Kaggle dogs-vs-cats): integer ids, one label with 6 decimals. multiclass (Kaggle Dog
    Breed Identification): ids are file stems as they are (``csv_cell``: quoted where needed, so
    a stem holding a line end stays one record), every class with 6 significant digits.
    """
    keys = csv_id_array(keys)
    if clip > 0:
        values = np.clip(values, clip, 1.0 - clip)
    order = np.argsort(keys, kind="stable")
    for start in range(0, len(order), CSV_CHUNK_ROWS):
        chosen = order[start:start + CSV_CHUNK_ROWS]
        rows, ids = values[chosen].tolist(), keys[chosen].tolist()
        if csv_format == BINARY:  # integers and numbers: nothing to quote, and a million rows a night
            yield "".join(f"{key},{row[0]:.6f}\n" for key, row in zip(ids, rows, strict=True)).encode()
        else:
            yield "".join(",".join([csv_cell(key), *(f"{value:.6g}" for value in row)]) + "\n"
                          for key, row in zip(ids, rows, strict=True)).encode("utf-8")


def csv_lines(keys, values: np.ndarray, csv_format: str, clip: float) -> bytes:
    """``csv_chunks`` joined: the lines of a few rows."""
    return b"".join(csv_chunks(keys, values, csv_format, clip))


def resolve_csv_format(csv_format: str, class_names: list[str]) -> str:
    """``auto``: binary (``id,label``) for two classes, multiclass otherwise."""
    if csv_format == "auto":
        return BINARY if len(class_names) == 2 else MULTICLASS
    if csv_format == BINARY and len(class_names) != 2:
        raise ValueError(f"--csv-format binary needs a two-class model; this one has "
                         f"{len(class_names)} classes: use --csv-format multiclass")
    return csv_format


def csv_part_boundaries(quantiles: list, rows: int, rows_per_part: int) -> list:
    """The ids where CSV parts start, cut at approximate quantiles so that parts hold about
    ``rows_per_part`` rows each (none, so one part, for a Kaggle-sized run)."""
    parts = min(len(quantiles) - 1, math.ceil(rows / rows_per_part)) if quantiles else 1
    step = (len(quantiles) - 1) / max(parts, 1)
    return [quantiles[round(i * step)] for i in range(1, parts)]


def csv_rows(table: pa.Table, csv_format: str, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A predictions table's ``submission.csv`` rows: ``(ids, values float64 [n, columns])``,
    ids a ``csv_id_array``. binary: the rows with an integer Kaggle id (``image_id``),
    ``columns`` = the label column; multiclass: every row, id = the file stem."""
    if csv_format == BINARY:
        table = table.filter(pc.is_valid(table["image_id"]))
        keys = table["image_id"].to_numpy().astype(np.int64)
    else:
        keys = csv_id_array([file_stem(path) for path in table["path"].to_pylist()])
    values = np.column_stack([table[column].to_numpy() for column in columns])
    return keys, values


class WriteKaggleCsv(beam.PTransform):
    """Prediction tables in; one ``submission.csv`` sorted by id out, without any worker holding
    the whole run: ``{'csv': the CSV's path, 'rows': its row count}``.

    ``binary`` (dogs-vs-cats): ``id,label`` with label = P(``positive_class``), only rows whose
    file stem is an integer (the Kaggle id). ``multiclass``: ``id,<every class>``, every row.
    Rows are cut into ranges of ids at approximate quantiles (Beam's
    ApproximateQuantilesCombineFn, a bounded sketch), each range is sorted and written by one
    worker as a part under ``csv-parts/``, then the parts are streamed in order into the CSV
    (constant memory) and deleted. A worker holds at most about ``rows_per_part`` rows; a
    Kaggle run is one part.
    """

    MAX_PARTS = 256

    def __init__(self, path: str, parts_dir: str, class_names: list[str], csv_format: str,
                 positive_class: str, clip: float, rows_per_part: int = 1_000_000):
        super().__init__()
        self._path = path
        self._parts_dir = parts_dir
        self._class_names = list(class_names)
        self._format = csv_format
        self._positive_class = positive_class
        self._clip = clip
        self._rows_per_part = rows_per_part

    def expand(self, predictions):
        csv_format, clip, rows_per_part = self._format, self._clip, self._rows_per_part
        columns = ([probability_column(self._positive_class)] if csv_format == BINARY
                   else [probability_column(name) for name in self._class_names])
        def rows_of(table):
            keys, values = csv_rows(table, csv_format, columns)
            if len(keys):
                yield keys, values

        keyed = predictions | "CsvRows" >> beam.FlatMap(rows_of)
        # One pass over the ids gives their count and approximate quantiles (a bounded sketch);
        # (0, []) for a run without a row: the combine adds no default of its own to the graph.
        count_and_quantiles = (keyed
                               | "CountAndIds" >> beam.Map(lambda rows: (len(rows[0]), rows[0].tolist()))
                               | "CountAndQuantiles" >> beam.CombineGlobally(
                                   beam.combiners.TupleCombineFn(
                                       sum, ApproximateQuantilesCombineFn.create(
                                           self.MAX_PARTS + 1, input_batched=True))).without_defaults())
        stats = beam.pvalue.AsSingleton(count_and_quantiles, default_value=(0, []))
        part_rows = Metrics.distribution(METRICS_NAMESPACE, "csv_part_rows")
        parts_dir = self._parts_dir

        def split_into_parts(rows, stats):
            keys, values = rows
            boundaries = csv_part_boundaries(stats[1], stats[0], rows_per_part)
            if not boundaries:  # one part: a Kaggle-sized run
                yield 0, rows
                return
            parts = np.searchsorted(csv_id_array(boundaries), keys, side="right")
            for part in np.unique(parts):
                chosen = np.flatnonzero(parts == part)
                yield int(part), (keys[chosen], values[chosen])

        def write_part(index, pieces):
            pieces = list(pieces)
            keys = np.concatenate([piece_keys for piece_keys, _ in pieces])
            values = np.concatenate([piece_values for _, piece_values in pieces])
            del pieces
            part_rows.update(len(keys))
            path = FileSystems.join(parts_dir, f"part-{index:05d}.csv")
            with FileSystems.create(path) as handle:  # a retried bundle rewrites the same name
                for chunk in csv_chunks(keys, values, csv_format, clip):
                    handle.write(chunk)
            return index, path

        header = csv_header(csv_format, self._class_names)
        path = self._path

        def concatenate(parts):
            with atomically_created(path) as output:
                output.write(header)
                for _, part in sorted(parts):
                    with FileSystems.open(part) as handle:
                        shutil.copyfileobj(handle, output, COPY_CHUNK_BYTES)
            delete_with_directories([part for _, part in parts], [parts_dir])
            return path

        parts = (keyed
                 | "SplitIntoParts" >> beam.FlatMap(split_into_parts, stats=stats)
                 | "GroupPart" >> beam.GroupByKey()
                 | "WriteSortedPart" >> beam.MapTuple(write_part))
        # Once, when every part is written (none: a CSV of its header alone). A str, as the
        # Parquet sinks' file names are: flattened with them, it needs no coder conversion
        # (which Prism runs as a stage of its own per input).
        csv = (predictions.pipeline
               | "OnceAllPartsAreWritten" >> beam.Impulse()
               | "ConcatenateParts" >> beam.Map(lambda _, parts: concatenate(parts),
                                                parts=beam.pvalue.AsList(parts)).with_output_types(str))
        rows = (predictions.pipeline
                | "OnceCounted" >> beam.Impulse()
                | "RowCount" >> beam.Map(lambda _, stats: stats[0], stats=stats))
        return {"csv": csv, "rows": rows}


class CoalesceTables(beam.DoFn):
    """Arrow tables in; the tables of a bundle concatenated, about ``row_group_bytes`` at a
    time, out: each table a Parquet sink writes becomes at least one row group, and a batch's
    table (tens of rows) is far too small for one. 4 MiB of predictions is about 13,000 rows a
    row group (DuckDB writes 122,880, pyarrow up to 1 Mi): the buffer and the writer's work on
    it are what a worker holds, so they are sized for memory, not for the largest groups.
    Beam's ``WriteToParquet`` buffers 64 MiB; that made the local runner's peak RSS grow with
    the night up to 200,000 images (docs/performance.md, "Memory with the night")."""

    def __init__(self, row_group_bytes: int = 4 * 1024 * 1024):
        self._row_group_bytes = row_group_bytes

    def start_bundle(self):
        self._tables, self._bytes = [], 0

    def process(self, table: pa.Table):
        self._tables.append(table)
        self._bytes += table.nbytes
        if self._bytes >= self._row_group_bytes:
            yield self._concatenated()

    def finish_bundle(self):
        if self._tables:
            yield WindowedValue(self._concatenated(), GlobalWindow().max_timestamp(), [GlobalWindow()])

    def _concatenated(self) -> pa.Table:
        table = pa.concat_tables(self._tables)
        self._tables, self._bytes = [], 0
        return table


def at_end_of_window(name: str) -> TimestampedValue:
    """``name`` timestamped at the end of the global window.

    Beam's file sinks emit their final file names at the end of time (``MAX_TIMESTAMP``,
    apache_beam/io/iobase.py ``_finalize_write``), a day past the end of the global window. An
    element that late holds back no watermark: on Prism 2.77 (and 2.78) a stage working on it
    lets its output watermark reach the end of time before the element is handed on, the next
    stage runs without it, and the element then waits forever ("nothing in progress and no
    refreshes with non zero pending elements"; docs/testing.md). Inside the window it holds
    the watermark until it is handed on, as every other element does.
    """
    return TimestampedValue(name, GlobalWindow().max_timestamp())


class WriteParquetTables(beam.PTransform):
    """Arrow tables of ``schema`` in; Parquet shards ``<directory>/part-SSSSS-of-NNNNN.<name>.parquet``
    out (``WriteToParquetBatched``). Emits the final names of the shards once Beam has renamed
    them into place (what the record lists), at the end of the global window
    (``at_end_of_window``).

    Each output's shards end in a name of their own (``.predictions.parquet``,
    ``.challenger-predictions.parquet``, ...) so that one wildcard selects one output of every
    night, which is all a BigQuery external table's URI allows (``gs://bkt/scores/*.errors.parquet``:
    docs/nightly-and-drift.md)."""

    def __init__(self, directory: str, name: str, schema: pa.Schema):
        super().__init__()
        self._prefix = FileSystems.join(directory, "part")
        self._suffix = f".{name}.parquet"
        self._schema = schema

    def expand(self, tables):
        return (tables
                | "CoalesceTables" >> beam.ParDo(CoalesceTables())
                | "WriteToParquet" >> beam.io.WriteToParquetBatched(
                    self._prefix, self._schema, file_name_suffix=self._suffix)
                | "AtEndOfWindow" >> beam.Map(at_end_of_window).with_output_types(str))
