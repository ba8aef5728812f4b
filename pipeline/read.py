"""Stage 1: image paths from a glob or a manifest, through Beam's filesystems."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from pipeline.rows import ListedImage, error_row

DUPLICATES = "duplicates"


class EmptyInputError(ValueError):
    """The glob or manifest names no image: a mistake, not an empty success."""


def check_input_exists(pattern: str | None, manifest: str | None) -> None:
    """Fail fast, before a job is built, when there is nothing to score."""
    if bool(pattern) == bool(manifest):
        raise ValueError("give exactly one of --input (a glob) and --manifest (a file of paths)")
    if manifest:
        if not FileSystems.exists(manifest):
            raise EmptyInputError(f"manifest {manifest} does not exist")
        with FileSystems.open(manifest) as handle:
            if not any(is_manifest_entry(line.decode("utf-8").strip()) for line in handle):
                raise EmptyInputError(f"manifest {manifest} lists no path")
        return
    matched = FileSystems.match([pattern], limits=[1])[0].metadata_list
    if not matched:
        raise EmptyInputError(f"--input {pattern!r} matches no file")


def count_inputs(pattern: str | None, manifest: str | None) -> int:
    """How many inputs the run will account for: the glob's matches, or the manifest's entries
    (duplicates included: each becomes a row)."""
    if pattern:
        return len(FileSystems.match([pattern])[0].metadata_list)
    with FileSystems.open(manifest) as handle:
        return sum(is_manifest_entry(line.decode("utf-8").strip()) for line in handle)


def fixed_prefix(pattern: str) -> str:
    """The part of a glob before its first wildcard: every path it matches starts with it."""
    cut = min((pattern.index(c) for c in "*?[" if c in pattern), default=len(pattern))
    return pattern[:cut]


def directory_glob(pattern: str) -> str | None:
    """``pattern/**`` when ``pattern`` (no wildcard) names a directory or, on an object store,
    a prefix with objects under it; else None."""
    if fixed_prefix(pattern) != pattern:
        return None
    recursive = FileSystems.join(pattern.rstrip("/"), "**")
    return recursive if FileSystems.match([recursive], limits=[1])[0].metadata_list else None


def is_manifest_entry(line: str) -> bool:
    return bool(line) and not line.startswith("#")


class ReadImagePaths(beam.PTransform):
    """Emit each distinct image path once, as a ``ListedImage`` (with the listing's size and
    update time for a glob).

    A path listed more than once in a manifest is scored once; each extra listing leaves as an
    error row on the ``duplicates`` output, so that every input line is accounted for.
    """

    def __init__(self, pattern: str | None, manifest: str | None, run_id: str):
        super().__init__()
        self._pattern = pattern
        self._manifest = manifest
        self._run_id = run_id

    def expand(self, pbegin):
        if self._pattern:
            return {
                "paths": (pbegin
                          | "MatchFiles" >> fileio.MatchFiles(self._pattern)
                          | "ToListedImage" >> beam.Map(lambda metadata: ListedImage(
                              metadata.path, metadata.size_in_bytes,
                              metadata.last_updated_in_seconds))),
                DUPLICATES: pbegin | "NoDuplicates" >> beam.Create([]),
            }
        listed = (pbegin
                  | "ReadManifest" >> beam.io.ReadFromText(self._manifest)
                  | "StripLines" >> beam.Map(str.strip)
                  | "SkipBlankAndComments" >> beam.Filter(is_manifest_entry)
                  | "CountListings" >> beam.combiners.Count.PerElement())
        run_id = self._run_id
        return {
            "paths": listed | "DistinctPath" >> beam.Keys() | "ToListedImage" >> beam.Map(ListedImage),
            DUPLICATES: listed | "ExtraListings" >> beam.FlatMap(
                lambda item: [error_row(item[0], "read",
                                        f"listed {item[1]} times in the manifest; scored once",
                                        run_id, error_type="DuplicatePath")] * (item[1] - 1)),
        }
