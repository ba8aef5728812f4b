"""Stage 1: image paths from a glob or a manifest, through Beam's filesystems, in batches.

The whole listing is one element: a glob is listed by one ``pipeline.listing.list_glob`` call
(around Beam's filesystems, as Beam's ``MatchFiles`` is), a manifest is read by one worker (the
launcher reads it whole too, to check and count it). So the stage sees every path at once,
groups them into batches of ``batch_size`` paths (the unit of work from here to the sinks) and
finds, without a shuffle, what no single image can show: manifest lines listed twice, and files
whose Kaggle ids collide. It holds them as columns (``ListedColumns``, about 85 bytes an
image), not as Python objects: a night of a million images is listed in about 90 MiB.
Paths leave in their recorded form (``pipeline.paths``): the text every output holds, from
which the readers find the file again.
"""

from __future__ import annotations

import array
import codecs
import collections
from collections.abc import Collection, Iterable, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from pipeline import progress
from pipeline.listing import glob_escape, list_glob, literal_prefix
from pipeline.paths import normalised_entry, recorded_path, storage_path
from pipeline.rows import (
    ERROR_SCHEMA,
    FOLDER_PLACEHOLDER,
    ListedImage,
    PathBatch,
    SkippedInputs,
    error_row,
    file_stem,
    image_id,
)
from pipeline.write import BINARY

UNSCORED = "unscored"  # error tables of the inputs the listing itself turns away
SKIPPED = "skipped"
INPUT_COUNT = "input_count"
# UTF-32's byte-order marks start with UTF-16's: both are refused by the same check.
UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


class EmptyInputError(ValueError):
    """The glob or manifest names no image: a mistake, not an empty success."""


class ManifestEncodingError(ValueError):
    """The manifest is not UTF-8 text: refused before any work, saying how to save it."""


class UnreadableSchemeError(ValueError):
    """A path whose scheme no installed Beam filesystem reads (``file://``, ``http://``)."""


def check_scheme(path: str, where: str) -> None:
    """Refuse ``path`` when no Beam filesystem reads its scheme: one line saying what to write
    instead, not a traceback per bundle halfway through the run. ``where`` names its source."""
    try:
        FileSystems.get_filesystem(path)
    except ValueError:
        scheme = FileSystems.get_scheme(path)
        hint = (f"write the local path itself ({path.removeprefix('file://')})" if scheme == "file"
                else "give local paths or gs:// ones (other stores need their Beam extra installed)")
        raise UnreadableSchemeError(f"{where} {path!r}: no Beam filesystem reads {scheme}:// "
                                    f"paths; {hint}") from None


def check_input_exists(pattern: str | None, manifest: str | None) -> None:
    """Fail fast, before a job is built, when there is nothing to score (a glob that
    ``list_glob`` finds nothing but folder placeholders for), or something no filesystem here
    reads (``check_scheme``; a ``file://`` URI of another host), or a manifest that is not
    UTF-8 text (``read_manifest``)."""
    if bool(pattern) == bool(manifest):
        raise ValueError("give exactly one of --input (a glob) and --manifest (a file of paths)")
    if manifest:
        check_scheme(manifest, "--manifest")
        if not FileSystems.exists(manifest):
            raise EmptyInputError(f"manifest {manifest} does not exist")
        paths = read_manifest(manifest)
        if not paths:
            raise EmptyInputError(f"manifest {manifest} lists no path")
        first_of_each_scheme = {}
        for path in map(storage_path, paths):
            first_of_each_scheme.setdefault(FileSystems.get_scheme(path), path)
        for path in first_of_each_scheme.values():
            check_scheme(path, f"manifest {manifest} lists")
        return
    check_scheme(pattern, "--input")
    placeholders = 0
    for matched in list_glob(pattern):
        if not matched.placeholder:
            return
        placeholders += 1
    hint = f" (only {placeholders} folder placeholder{'s' * (placeholders > 1)})" if placeholders else ""
    if not literal_prefix(pattern)[1] and FileSystems.exists(pattern):
        hint = (f"; {pattern!r} is the name of a file or folder: write its [, * and ? as [[], "
                f"[*] and [?] ({glob_escape(pattern)!r}) to score it")
    raise EmptyInputError(f"--input {pattern!r} matches no file{hint}")


def read_manifest(manifest: str) -> list[str]:
    """Every path ``manifest`` lists, in order, duplicates included, in its recorded form
    (``manifest_entry`` of each line, ``pipeline.paths.normalised_entry``: a ``file://`` URI
    names a local file whose name is not UTF-8 or holds a line end; lines end at LF, the CR of a
    CRLF is stripped with the spaces).

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
    return [normalised_entry(path) for path in map(manifest_entry, text.split("\n")) if path]


def manifest_entry(line: str) -> str | None:
    """The path one manifest line lists, or None for a blank or ``#`` comment line. Manifests
    are text files people write: a UTF-8 byte-order mark (Notepad, Excel's "CSV UTF-8"), the CR
    of a CRLF line end and spaces or tabs around the path are not part of it."""
    path = line.lstrip("\ufeff").strip()
    return path if path and not path.startswith("#") else None


def csv_key(path: str, csv_format: str) -> int | str | None:
    """The id ``submission.csv`` gives ``path``: the integer file stem for ``binary`` (None when
    the stem is not an integer: no CSV row), the stem as it is for ``multiclass``."""
    return image_id(path) if csv_format == BINARY else file_stem(path)


def colliding_csv_ids(paths: Iterable[str], csv_format: str) -> dict[str, str]:
    """``{path: message}`` for every path whose CSV id another path has too (``7.png`` and
    ``007.jpg`` are both Kaggle id 7; ``a/x.jpg`` and ``b/x.jpg`` both stem ``x``)."""
    by_key = collections.defaultdict(list)
    for path in paths:
        key = csv_key(path, csv_format)
        if key is not None:
            by_key[key].append(path)
    messages = {}
    for key, group in by_key.items():
        if len(group) > 1:
            for path in group:
                others = [other for other in group if other != path]
                messages[path] = (f"submission.csv id {key!r} is also the id of {others[0]}"
                                  + (f" and {len(others) - 1} more" if len(others) > 1 else "")
                                  + ": a submission holds each id once and cannot say which file "
                                    "it means, so none of them is scored; rename or remove all "
                                    "but one")
    return messages


def error_table(rows: list[dict]) -> pa.Table:
    """Error rows (``rows.error_row``) as one Arrow table of the errors schema."""
    return pa.Table.from_pylist(rows, schema=ERROR_SCHEMA)


class ListedColumns:
    """A night's listing held as columns, not as a Python object per image: ``append`` an
    image's recorded path, size (bytes) and update time (seconds since the epoch; either may be
    None), ``batches`` gives them back as ``ListedImage`` s, in order. Every ``CHUNK_ROWS``
    images become one Arrow record batch (the path's UTF-8 bytes, 4 bytes of offset, 8 each for
    size and time, about 85 bytes an image for a 65-character path, against about 250 as a
    ``ListedImage`` with its str, int and float): a million-image night's listing takes about 90
    MiB, not 250. Beside each image, the 64-bit ``hash`` of its ``submission.csv`` id
    (``csv_key``) finds the ids that collide (``colliding_csv_ids``) without a dict of every id."""

    CHUNK_ROWS = 65536
    SCHEMA = pa.schema([("path", pa.string()), ("size_bytes", pa.int64()),
                        ("updated_seconds", pa.float64())])
    NO_KEY = 0  # the hash stored for an image without an id; ``_keyed`` says which are real

    def __init__(self, csv_format: str):
        self._csv_format = csv_format
        self._chunks: list[pa.RecordBatch] = []
        self._pending: tuple[list, list, list] = ([], [], [])
        self._hashes = array.array("q")
        self._keyed = bytearray()

    def __len__(self) -> int:
        return len(self._hashes)

    def append(self, path: str, size_bytes: int | None = None, updated_seconds: float | None = None):
        for column, value in zip(self._pending, (path, size_bytes, updated_seconds), strict=True):
            column.append(value)
        key = csv_key(path, self._csv_format)
        self._hashes.append(self.NO_KEY if key is None else hash(key))
        self._keyed.append(key is not None)
        if len(self._pending[0]) == self.CHUNK_ROWS:
            self._seal()

    def _seal(self) -> None:
        if self._pending[0]:
            self._chunks.append(pa.RecordBatch.from_arrays(
                [pa.array(column, field.type) for column, field in zip(self._pending, self.SCHEMA,
                                                                       strict=True)],
                schema=self.SCHEMA))
            self._pending = ([], [], [])

    def paths(self, indices: np.ndarray) -> list[str]:
        """The recorded paths of the images at ``indices`` (ascending), in that order."""
        self._seal()
        starts = np.cumsum([0] + [chunk.num_rows for chunk in self._chunks])
        return [self._chunks[chunk]["path"][int(index - starts[chunk])].as_py()
                for index in indices for chunk in [int(np.searchsorted(starts, index, "right")) - 1]]

    def colliding_csv_ids(self) -> dict[str, str]:
        """``colliding_csv_ids`` of every path: only the paths whose id hash another path's id
        hash too are compared by id, so every path of a colliding group is among them."""
        hashes = np.frombuffer(self._hashes, np.int64)
        keyed = np.flatnonzero(np.frombuffer(self._keyed, np.uint8))
        order = keyed[np.argsort(hashes[keyed], kind="stable")]
        same = hashes[order][1:] == hashes[order][:-1]
        shared = np.zeros(len(order), bool)
        shared[1:] |= same
        shared[:-1] |= same
        candidates = np.sort(order[shared])
        return colliding_csv_ids(self.paths(candidates), self._csv_format) if len(candidates) else {}

    def batches(self, size: int, leave_out: Collection[str] = ()) -> Iterator[PathBatch]:
        """``PathBatch`` es of ``size`` images in listing order, less the paths in ``leave_out``."""
        self._seal()
        images = []
        for chunk in self._chunks:
            for path, size_bytes, updated in zip(*(column.to_pylist() for column in chunk.columns),
                                                 strict=True):
                if path not in leave_out:
                    images.append(ListedImage(path, size_bytes, updated))
                if len(images) == size:
                    yield PathBatch(images)
                    images = []
        if images:
            yield PathBatch(images)


class ListImagesFn(beam.DoFn):
    """A glob or a manifest path -> ``PathBatch`` es of ``ListedImage``; on ``unscored``, one
    error table of the inputs that are not scored (entries no reader can read, extra manifest
    listings, colliding CSV ids); on ``skipped``, the folder placeholders a glob matched; on
    ``input_count``, how many inputs the listing holds. The listing is held as
    ``ListedColumns``, about 85 bytes an image."""

    def __init__(self, is_manifest: bool, batch_size: int, csv_format: str, run_id: str):
        self._is_manifest = is_manifest
        self._batch_size = batch_size
        self._csv_format = csv_format
        self._run_id = run_id

    def process(self, source: str) -> Iterator:
        images, extra, placeholders = ListedColumns(self._csv_format), [], 0
        if self._is_manifest:
            listings = collections.Counter(read_manifest(source))
            for path in listings:
                images.append(path)
            extra = [error_row(path, "read", f"listed {count} times in the manifest; scored once",
                               self._run_id, error_type="DuplicatePath")
                     for path, count in listings.items() for _ in range(count - 1)]
            del listings
        else:
            for matched in list_glob(source):
                path = recorded_path(matched.path)
                if matched.placeholder:
                    placeholders += 1
                elif matched.error_type:
                    extra.append(error_row(path, "read", matched.message, self._run_id,
                                           error_type=matched.error_type))
                else:
                    images.append(path, matched.size_bytes, matched.updated_seconds)
        collisions = images.colliding_csv_ids()
        extra += [error_row(path, "read", message, self._run_id, error_type="DuplicateCsvId")
                  for path, message in sorted(collisions.items())]
        listed = len(images) - len(collisions) + len(extra) + placeholders
        progress.expect(listed)
        yield beam.pvalue.TaggedOutput(INPUT_COUNT, listed)
        if extra:
            yield beam.pvalue.TaggedOutput(UNSCORED, error_table(extra))
        if placeholders:
            yield beam.pvalue.TaggedOutput(SKIPPED, SkippedInputs(FOLDER_PLACEHOLDER, placeholders))
        yield from images.batches(self._batch_size, leave_out=collisions)


class ReadImagePaths(beam.PTransform):
    """``{'paths': PathBatch es, 'unscored': error tables, 'skipped': SkippedInputs,
    'input_count': ints}``.

    Every entry a glob matches is an input (``pipeline.listing``): one that no reader can read
    (a dangling symbolic link, a directory the job cannot list, ...) leaves as an error row of
    stage ``read`` that says why; an object store's folder placeholder is skipped and counted.
    A path listed more than once in a manifest is scored once; each extra listing leaves as an
    error row (``DuplicatePath``). Paths whose ``submission.csv`` id collides (``csv_format``,
    see ``csv_key``) all leave as error rows (``DuplicateCsvId``) naming each other, so that the
    CSV never holds an id twice. Every input line is accounted for.
    """

    def __init__(self, pattern: str | None, manifest: str | None, run_id: str, *,
                 batch_size: int = 64, csv_format: str = BINARY):
        super().__init__()
        self._source = pattern or manifest
        self._fn = ListImagesFn(not pattern, batch_size, csv_format, run_id)

    def expand(self, pbegin):
        listed = (pbegin
                  | "Source" >> beam.Create([self._source])
                  | "ListImages" >> beam.ParDo(self._fn).with_outputs(
                      UNSCORED, SKIPPED, INPUT_COUNT, main="paths"))
        return {"paths": listed.paths, UNSCORED: listed[UNSCORED], SKIPPED: listed[SKIPPED],
                INPUT_COUNT: listed[INPUT_COUNT]}
