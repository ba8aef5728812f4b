"""Stage 1: image paths from a glob or a manifest, through Beam's filesystems."""

from __future__ import annotations

import codecs

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from pipeline.rows import ListedImage, error_row

DUPLICATES = "duplicates"
# UTF-32's byte-order marks start with UTF-16's: both are refused by the same check.
UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


class EmptyInputError(ValueError):
    """The glob or manifest names no image: a mistake, not an empty success."""


class ManifestEncodingError(ValueError):
    """The manifest is not UTF-8 text: refused before any work, saying how to save it."""


def check_input_exists(pattern: str | None, manifest: str | None) -> None:
    """Fail fast, before a job is built, when there is nothing to score (or, for a manifest,
    when it is not UTF-8 text: ``read_manifest``)."""
    if bool(pattern) == bool(manifest):
        raise ValueError("give exactly one of --input (a glob) and --manifest (a file of paths)")
    if manifest:
        if not FileSystems.exists(manifest):
            raise EmptyInputError(f"manifest {manifest} does not exist")
        if not read_manifest(manifest):
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
    return len(read_manifest(manifest))


def read_manifest(manifest: str) -> list[str]:
    """Every path ``manifest`` lists, in order, duplicates included (``manifest_entry`` of each
    line; lines end at LF, as ``beam.io.ReadFromText`` splits them).

    Raises ``ManifestEncodingError`` for UTF-16 (Notepad's "Unicode", Excel's "Unicode Text")
    and for bytes that are not UTF-8 (a legacy code page such as Windows-1252), naming the line:
    guessing an encoding could turn a path into another path, so the user re-saves it as UTF-8."""
    with FileSystems.open(manifest) as handle:
        data = handle.read()
    if data.startswith(UTF16_BOMS):
        raise ManifestEncodingError(f"manifest {manifest} is UTF-16 text (Notepad's \"Unicode\"): "
                                    "save it as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ManifestEncodingError(
            f"manifest {manifest} line {line} is not UTF-8 (byte 0x{data[error.start]:02x}, a "
            "legacy code page such as Windows-1252?): save it as UTF-8") from None
    return [path for path in map(manifest_entry, text.split("\n")) if path]


def manifest_entry(line: str) -> str | None:
    """The path one manifest line lists, or None for a blank or ``#`` comment line. Manifests
    are text files people write: a UTF-8 byte-order mark (Notepad, Excel's "CSV UTF-8"), the CR
    of a CRLF line end and spaces or tabs around the path are not part of it."""
    path = line.lstrip("\ufeff").strip()
    return path if path and not path.startswith("#") else None


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
                  | "ManifestEntries" >> beam.Map(manifest_entry)
                  | "SkipBlankAndComments" >> beam.Filter(bool)
                  | "CountListings" >> beam.combiners.Count.PerElement())
        run_id = self._run_id
        return {
            "paths": listed | "DistinctPath" >> beam.Keys() | "ToListedImage" >> beam.Map(ListedImage),
            DUPLICATES: listed | "ExtraListings" >> beam.FlatMap(
                lambda item: [error_row(item[0], "read",
                                        f"listed {item[1]} times in the manifest; scored once",
                                        run_id, error_type="DuplicatePath")] * (item[1] - 1)),
        }
