"""Incremental nights (``--skip-scored``): which of tonight's files has this model version
already scored?

Earlier runs are found through their completion records (``<run prefix>/summary.json``): only
committed runs count and only the files a record lists are read. A run is read at all only when
it scored this model version and its paths can overlap tonight's: its record's
``paths_prefix`` and tonight's (what every input path starts with: the glob's part before its
first wildcard, nothing for a manifest) must be prefixes of one another. With a dated input layout
(``incoming/dt=YYYY-MM-DD/``) no earlier night can hold tonight's paths and no row is read: a
night costs one listing and one small read per earlier run, whatever their size.

The rows of the runs that remain are streamed (Parquet record batches) and joined to tonight's
listing by path with a CoGroupByKey: on a runner that shuffles (Dataflow), no worker holds the
history. Only rows that can match reach the join: those of tonight's paths when the night has at
most ``known_paths_limit`` of them (a bounded side input, filtered with Arrow's ``is_in``), else
those under tonight's prefix. Which signal decides:

- the listing: a file whose size and update time (from the glob's listing, no download) equal
  those recorded when this model version scored it is skipped without being read;
- otherwise the bytes: the file is read and hashed, and skipped when its SHA-256 equals one
  this model version scored under that path (a touched but unchanged file, a manifest entry).
"""

from __future__ import annotations

import functools
import logging

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline.paths import recorded_prefixes
from pipeline.read import SKIPPED
from pipeline.records import committed_runs
from pipeline.rows import ALREADY_SCORED, METRICS_NAMESPACE, PathBatch, SkippedInputs
from pipeline.write import PREDICTIONS_DIR

_LOG = logging.getLogger("petscore")


def may_overlap(prefix: str, other: str) -> bool:
    return prefix.startswith(other) or other.startswith(prefix)


def earlier_scored_files(pattern: str, model_version: str, tonight_prefix: str,
                         exclude_run: str) -> list[str]:
    """Predictions files of committed runs under ``pattern`` (a glob of run prefixes) that may
    hold tonight's paths as scored by ``model_version``; never those of ``exclude_run``
    (tonight's own prefix, which --overwrite is about to clear)."""
    if pattern.endswith(".parquet"):
        raise ValueError(f"--skip-scored takes earlier runs' output prefixes (e.g. "
                         f"'gs://bkt/scores/dt=*'), whose summary.json lists their files; got "
                         f"Parquet files {pattern!r}: drop the '/predictions/*.parquet'")
    runs = committed_runs(pattern, exclude_run)

    def relevant_files(run: str, record: dict) -> list[str]:
        if record.get("model_version") != model_version:
            return []
        if not may_overlap(record.get("paths_prefix", ""), tonight_prefix):  # older records: read
            return []
        if "files" not in record:  # a run recorded before records listed their files
            return [metadata.path for metadata in FileSystems.match(
                [FileSystems.join(run, PREDICTIONS_DIR, "*.parquet")])[0].metadata_list]
        return [run + entry["path"] for entry in record["files"]
                if entry["path"].startswith(PREDICTIONS_DIR + "/")]

    per_run = [relevant_files(run, record) for run, record in runs]
    files = [path for run_files in per_run for path in run_files]
    _LOG.info("--skip-scored %s: %d committed runs, %d of model %s whose paths may overlap %s*: "
              "reading %d predictions files", pattern, len(runs), sum(map(bool, per_run)),
              model_version, tonight_prefix, len(files))
    return files


class PathsIfFew(beam.CombineFn):
    """Tonight's paths, or None when there are more than ``limit``: a side input whose size is
    bounded whatever the night (about 100 bytes a path: 50 MB at the default limit)."""

    def __init__(self, limit: int):
        self._limit = limit

    def create_accumulator(self):
        return set()

    def add_input(self, paths, path):
        if paths is not None:
            paths.add(path)
            if len(paths) > self._limit:
                return None
        return paths

    def merge_accumulators(self, accumulators):
        merged = set()
        for paths in accumulators:
            if paths is None:
                return None
            merged |= paths
            if len(merged) > self._limit:
                return None
        return merged

    def extract_output(self, paths):
        return None if paths is None else sorted(paths)


class ReadScoredRows(beam.DoFn):
    """A predictions Parquet file -> ``(path, (content_sha256, file_bytes, file_updated_seconds))``
    for each row under ``paths_prefix`` (recorded paths: those of its names that are not UTF-8
    start with its ``file://`` URI, see ``pipeline.paths.recorded_prefixes``) and, when the night
    is small enough to know its paths (``tonight``), only for tonight's paths: the filter runs on
    Arrow record batches, so only matches reach the join. Files written before the listing
    columns existed give None there."""

    COLUMNS = ("path", "content_sha256", "file_bytes", "file_updated_seconds")

    def __init__(self, paths_prefix: str):
        self._recorded_prefixes = recorded_prefixes(paths_prefix) if paths_prefix else []
        self._tonight = (None, None)  # (the side input's list, its Arrow array)

    def process(self, parquet_path: str, tonight: list[str] | None):
        if tonight is not None and self._tonight[0] is not tonight:
            self._tonight = (tonight, pa.array(tonight, pa.string()))
        with FileSystems.open(parquet_path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            parquet = pq.ParquetFile(handle)
            columns = [name for name in self.COLUMNS if name in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=65_536, columns=columns):
                paths = batch.column("path")
                if tonight is not None:
                    batch = batch.filter(pc.is_in(paths, value_set=self._tonight[1]))
                elif self._recorded_prefixes:
                    under = [pc.starts_with(paths, prefix) for prefix in self._recorded_prefixes]
                    batch = batch.filter(functools.reduce(pc.or_, under))
                for row in batch.to_pylist():
                    yield row["path"], (row["content_sha256"], row.get("file_bytes"),
                                        row.get("file_updated_seconds"))


class _DecideFn(beam.DoFn):
    """``(path, {'listed': [ListedImage], 'scored': [...]})`` -> the image to read (with the
    SHA-256s scored under its path), or ``SkippedInputs`` of one on ``skipped`` when the listing
    matches."""

    def __init__(self):
        self._by_listing = Metrics.counter(METRICS_NAMESPACE, "images_skipped_unchanged_listing")

    def process(self, joined):
        path, groups = joined
        scored = list(groups["scored"])
        for image in groups["listed"]:  # none for paths only the history knows
            if image.size_bytes is not None and image.updated_seconds is not None and any(
                    (size, updated) == (image.size_bytes, image.updated_seconds)
                    for _, size, updated in scored):
                self._by_listing.inc()
                yield beam.pvalue.TaggedOutput(SKIPPED, SkippedInputs(ALREADY_SCORED, 1))
            else:
                yield image._replace(scored_sha256=tuple(sorted({sha for sha, _, _ in scored})))


class SkipScored(beam.PTransform):
    """``PathBatch`` es in; ``{'images': PathBatch es to read, 'skipped': SkippedInputs}`` out.

    The join by path is the one step that handles images one at a time, and only on nights whose
    history may hold tonight's paths (``scored_files``); the images it keeps are batched again,
    ``batch_size`` at a time."""

    def __init__(self, scored_files: list[str], paths_prefix: str, batch_size: int,
                 known_paths_limit: int = 500_000):
        super().__init__()
        self._scored_files = scored_files
        self._paths_prefix = paths_prefix
        self._batch_size = batch_size
        self._known_paths_limit = known_paths_limit

    def expand(self, listed_batches):
        pipeline = listed_batches.pipeline
        if not self._scored_files:
            return {"images": listed_batches, SKIPPED: pipeline | "NothingScored" >> beam.Create([])}
        listed = listed_batches | "OneByOne" >> beam.FlatMap(lambda batch: batch.images)
        tonight = (listed
                   | "Path" >> beam.Map(lambda image: image.path)
                   | "TonightsPathsIfFew" >> beam.CombineGlobally(PathsIfFew(self._known_paths_limit)))
        scored = (pipeline
                  | "ScoredFiles" >> beam.Create(self._scored_files)
                  | "SpreadFiles" >> beam.Reshuffle()
                  | "ReadScoredRows" >> beam.ParDo(ReadScoredRows(self._paths_prefix),
                                                   tonight=beam.pvalue.AsSingleton(tonight)))
        decided = ({"listed": listed | "ByPath" >> beam.Map(lambda image: (image.path, image)),
                    "scored": scored}
                   | "JoinByPath" >> beam.CoGroupByKey()
                   | "Decide" >> beam.ParDo(_DecideFn()).with_outputs(SKIPPED, main="images"))
        return {
            "images": (decided.images
                       | "Batch" >> beam.BatchElements(min_batch_size=self._batch_size,
                                                       max_batch_size=self._batch_size)
                       | "AsPathBatch" >> beam.Map(PathBatch)),
            SKIPPED: decided[SKIPPED],
        }
