"""Stage 2: read each batch's files and decode them to the model's input size, in parallel.

A batch of paths comes in; one ``ImageBatch`` (every decoded image of the batch in one uint8
array, and a second one for a challenger model whose decoding differs), one error table and one
count of skipped inputs go out. Permanent problems (missing file,
empty or corrupt bytes, unsupported format, oversized image, a JPEG of too many scans, a decode
that runs past ``--max-decode-seconds``) become error rows of their own: one bad file never
costs its batch. Anything else reading storage raises, so that the runner retries the bundle
instead of recording a transient outage as a bad image.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.options import DEFAULT_MAX_DECODE_SECONDS, ThreadBudget
from pipeline.paths import storage_path
from pipeline.read import SKIPPED, error_table
from pipeline.rows import ALREADY_SCORED, METRICS_NAMESPACE, ListedImage, PathBatch, SkippedInputs, error_row
from serving.metadata import file_chunks
from serving.preprocessing import DEFAULT_MAX_JPEG_SCANS, PREPROCESSING_VERSION, decode_and_resize

_LOG = logging.getLogger(__name__)
ERRORS = "errors"
DECODED = "images"
CHALLENGER_ERRORS = "challenger_errors"  # images only the challenger's decoding refused


def is_permanent_read_error(error: Exception) -> bool:
    """True for errors a retry cannot fix: the object is absent, forbidden or not a file."""
    if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return True
    try:
        from google.api_core import exceptions as gcs_errors
    except ImportError:  # google-cloud extras not installed: nothing more to recognise
        return False
    return isinstance(error, (gcs_errors.NotFound, gcs_errors.Forbidden))


class FileTooLargeError(ValueError):
    """The file is larger than ``--max-image-bytes``."""

    @classmethod
    def over(cls, max_bytes: int) -> FileTooLargeError:
        """The error for a file over the ``max_bytes`` cap, one message whichever way it is read."""
        return cls(f"file is larger than the {max_bytes}-byte cap")


class DecodeTimeoutError(TimeoutError):
    """An image's decode ran past ``--max-decode-seconds``."""


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """What a model's contract says of decoding (``serving.metadata``): two models with equal
    specs take the very same pixels, so a night with a challenger decodes once per distinct spec."""

    size: tuple[int, int]  # (height, width)
    resize_method: str
    preprocessing: str

    @classmethod
    def of(cls, metadata) -> DecodeSpec:
        """The spec of a ``ModelMetadata``."""
        return cls(tuple(metadata.input_size), metadata.resize_method, metadata.preprocessing)


class ChallengerPixels(NamedTuple):
    """A batch's images decoded to the challenger's spec: ``pixels`` uint8 [n, height, width, 3]
    and ``decoded`` bool [n], False where that decode failed (the image's error row left on
    ``CHALLENGER_ERRORS``; the champion still scores it)."""

    pixels: np.ndarray
    decoded: np.ndarray


class _BatchOnPool:
    """One batch on the decoder pool. Any of its tasks takes the next row not yet taken
    (``next_row``), so a decode that runs too long holds up its own row only: the other tasks
    take the rest. ``outcomes``: each row's ``(bytes read, outcome, value)``; ``started``:
    when each row's decode began (``time.monotonic``; None before, or while its file is read:
    storage has time limits of its own and a slow read is transient, not a bad image).
    ``challenger_pixels``: the rows decoded to a challenger's other ``DecodeSpec`` (None without
    one)."""

    def __init__(self, images: list[ListedImage], size: tuple[int, int], window, timestamp,
                 challenger: DecodeSpec | None = None):
        self.images, self.window, self.timestamp = images, window, timestamp
        self.pixels = np.empty((len(images), *size, 3), np.uint8)
        self.challenger_pixels = (None if challenger is None
                                  else np.empty((len(images), *challenger.size, 3), np.uint8))
        self.outcomes: list[tuple | None] = [None] * len(images)
        self.started: list[float | None] = [None] * len(images)
        self.next_row = 0
        self.done = 0
        self.failure: BaseException | None = None

    def complete(self) -> bool:
        return self.failure is not None or self.done == len(self.images)


@dataclasses.dataclass
class ImageBatch:
    """The decoded images of one batch and what a prediction row records of their files.

    ``pixels``: uint8 [n, height, width, 3], row i from ``paths[i]``; ``file_bytes``: int64 [n];
    ``file_updated_seconds``: the storage listing's update times (None for manifest inputs);
    ``challenger_pixels``: the same images decoded to a challenger's other ``DecodeSpec``, None
    when there is no challenger or it takes these very pixels.
    """

    paths: list[str]
    content_sha256: list[str]
    file_bytes: np.ndarray
    file_updated_seconds: list[float | None]
    pixels: np.ndarray
    challenger_pixels: ChallengerPixels | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def for_challenger(self) -> ImageBatch:
        """The batch as the challenger scores it: its own pixels where its decoding differs, less
        the images that decoding refused; the batch itself where it takes the champion's."""
        if self.challenger_pixels is None:
            return self
        pixels, decoded = self.challenger_pixels
        rows = np.flatnonzero(decoded)
        return ImageBatch([self.paths[row] for row in rows], [self.content_sha256[row] for row in rows],
                          self.file_bytes[rows], [self.file_updated_seconds[row] for row in rows],
                          pixels[rows])

    def without_pixels(self) -> ImageBatch:
        """What travels on once the models have scored: the rows' file facts, no pixels."""
        return dataclasses.replace(self, pixels=None, challenger_pixels=None)


class ImageBatchCoder(beam.coders.Coder):
    """Pickles an ``ImageBatch`` (protocol 5), and estimates its size without doing so.

    Beam's workers encode a sample of each PCollection's elements (the first ten, then about ten
    per doubling) to estimate their mean size for the runner's metrics; with the generic coder
    that meant pickling a sampled batch's pixels (9.6 MB at 64 images of 224 px) only to measure
    them, even where decoding and inference run fused in one stage and nothing is encoded."""

    def encode(self, batch: ImageBatch) -> bytes:
        return pickle.dumps(batch, protocol=5)

    def decode(self, encoded: bytes) -> ImageBatch:
        return pickle.loads(encoded)

    def is_deterministic(self) -> bool:
        return False

    def estimate_size(self, batch: ImageBatch) -> int:
        challenger = batch.challenger_pixels.pixels.nbytes if batch.challenger_pixels else 0
        return batch.pixels.nbytes + challenger + sum(len(path) + 100 for path in batch.paths)

    def to_type_hint(self):
        return ImageBatch


beam.coders.registry.register_coder(ImageBatch, ImageBatchCoder)


class ReadAndDecodeFn(beam.DoFn):
    """A ``PathBatch`` -> one ``ImageBatch`` of its images decoded; on ``errors``, one
    error table of those that failed; on ``skipped``, how many of its images hold the exact bytes
    this model version already scored under that path (``ListedImage.scored_sha256``,
    --skip-scored), as ``SkippedInputs``. Files are opened by their ``storage_path``.
    With a ``challenger`` spec (a challenger model that decodes otherwise), each image the
    champion's decoding took is decoded to it as well, from the same bytes read once, and those
    it refuses leave as error rows on ``challenger_errors``.

    The files of a batch are read and decoded on a thread pool (its size: ``threads``, see
    ``pipeline.options.ThreadBudget``): storage reads wait on the network and the decoders
    release the GIL, so one process keeps its cores and many requests busy. Each image is decoded
    straight into its row of the batch's array; a batch's tasks (one per thread) take its rows
    one at a time. Batches decode ahead: the next ``DECODE_AHEAD_BATCHES`` are on the pool while
    the bundle's thread runs inference on the current one (on a GPU worker, the device never
    waits for the CPUs to start the next batch). A transient error re-raises and fails the
    bundle, which the runner retries.

    No image holds its batch hostage: a decode that runs past ``max_decode_seconds`` becomes a
    ``DecodeTimeoutError`` row and the batch goes on without it. A thread cannot be stopped, so
    the stuck decode runs on, its result thrown away, using a core until it ends (bounded, as
    the pixel, byte and scan caps bound what one decode can cost); the pool is replaced by a
    fresh one of the same size, so that later batches get every thread, and the old one ends
    with its last task. At most ``threads`` given-up decodes run on at once: beyond that the
    pool is not replaced and new work waits for a thread, which bounds the threads and memory.
    """

    DECODE_AHEAD_BATCHES = 2

    def __init__(self, size: tuple[int, int], resize_method: str, max_pixels: int,
                 max_bytes: int, run_id: str, threads: ThreadBudget,
                 preprocessing: str = PREPROCESSING_VERSION,
                 max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
                 max_decode_seconds: float = DEFAULT_MAX_DECODE_SECONDS,
                 challenger: DecodeSpec | None = None):
        self._size = tuple(size)
        self._challenger = challenger
        self._resize_method = resize_method
        self._preprocessing = preprocessing
        self._max_pixels = max_pixels
        self._max_bytes = max_bytes
        self._max_jpeg_scans = max_jpeg_scans
        self._max_decode_seconds = max_decode_seconds
        self._run_id = run_id
        self._threads = threads
        self._read = Metrics.counter(METRICS_NAMESPACE, "images_read")
        self._decoded = Metrics.counter(METRICS_NAMESPACE, "images_decoded")
        self._failed = Metrics.counter(METRICS_NAMESPACE, "images_failed")
        self._timed_out = Metrics.counter(METRICS_NAMESPACE, "images_decode_timed_out")
        self._bytes = Metrics.distribution(METRICS_NAMESPACE, "image_bytes")
        self._skipped = Metrics.counter(METRICS_NAMESPACE, "images_skipped_already_scored")

    def setup(self):
        self._pool = None  # sized on the first batch, which says whether storage is local
        self._changed = threading.Condition()  # a batch completed or failed, a given-up decode ended
        self._given_up_running = 0  # decodes given up on that still run

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def start_bundle(self):
        self._in_flight = collections.deque()

    def process(self, batch: PathBatch, window=beam.DoFn.WindowParam,
                timestamp=beam.DoFn.TimestampParam):
        images = batch.images
        if self._pool is None:
            remote = FileSystems.get_scheme(images[0].path) not in (None, "file")
            self._threads_in_pool = self._threads.resolve(remote=remote)[0]
            self._pool = ThreadPoolExecutor(max_workers=self._threads_in_pool)
        on_pool = _BatchOnPool(images, self._size, window, timestamp, self._challenger)
        self._in_flight.append(on_pool)
        self._submit(on_pool)
        while len(self._in_flight) > self.DECODE_AHEAD_BATCHES:
            yield from self._hand_on(self._in_flight[0])

    def finish_bundle(self):
        while self._in_flight:
            yield from self._hand_on(self._in_flight[0])

    def _submit(self, on_pool: _BatchOnPool) -> None:
        for _ in range(min(len(on_pool.images) - on_pool.next_row, self._threads_in_pool)):
            self._pool.submit(self._decode_rows, on_pool)

    def _decode_rows(self, on_pool: _BatchOnPool) -> None:
        """A pool task: decode the batch's next rows until none is left."""
        while True:
            with self._changed:
                if on_pool.next_row == len(on_pool.images) or on_pool.failure is not None:
                    return
                row = on_pool.next_row
                on_pool.next_row += 1
            try:
                outcome = self._handle(on_pool, row)
            except BaseException as error:  # noqa: BLE001 - re-raised on the bundle's thread
                with self._changed:
                    on_pool.failure = on_pool.failure or error
                    self._changed.notify_all()
                return
            with self._changed:
                if on_pool.outcomes[row] is None:
                    on_pool.outcomes[row] = outcome
                    on_pool.done += 1
                    if on_pool.complete():
                        self._changed.notify_all()
                else:  # given up on (DecodeTimeoutError): its row is an error row already
                    self._given_up_running -= 1
                    self._changed.notify_all()

    def _wait_for(self, on_pool: _BatchOnPool) -> None:
        """Block until every row of the batch has an outcome, giving up on any decode in flight
        (this batch's or one decoding ahead) that runs past the limit."""
        limit = self._max_decode_seconds
        with self._changed:
            while not on_pool.complete():
                now, next_check, gave_up = time.monotonic(), limit, False
                for batch in self._in_flight:
                    for row, since in enumerate(batch.started):
                        if since is None or batch.outcomes[row] is not None:
                            continue
                        if now - since >= limit:
                            self._give_up(batch, row, now - since)
                            gave_up = True
                        else:
                            next_check = min(next_check, since + limit - now)
                if gave_up and self._given_up_running <= self._threads_in_pool:
                    self._replace_pool()
                if not on_pool.complete():
                    self._changed.wait(next_check)
        if on_pool.failure is not None:
            raise on_pool.failure

    def _give_up(self, on_pool: _BatchOnPool, row: int, seconds: float) -> None:
        path = on_pool.images[row].path
        _LOG.warning("gave up decoding %s after %.1f s (--max-decode-seconds %g); its thread "
                     "runs on until the decode ends, its result unused", path, seconds,
                     self._max_decode_seconds)
        on_pool.outcomes[row] = (None, ERRORS, error_row(path, "decode", DecodeTimeoutError(
            f"decoding ran past the limit of {self._max_decode_seconds:g} s per image and was "
            "given up (--max-decode-seconds raises the limit)"), self._run_id))
        on_pool.done += 1
        self._given_up_running += 1

    def _replace_pool(self) -> None:
        """A fresh pool for the work to come: the old one's stuck thread would cost every later
        batch a thread. The old pool still runs what it was given and then ends."""
        old, self._pool = self._pool, ThreadPoolExecutor(max_workers=self._threads_in_pool)
        old.shutdown(wait=False)
        for on_pool in self._in_flight:  # the rows no task has taken yet, on the new threads too
            if not on_pool.complete():
                self._submit(on_pool)

    def _hand_on(self, on_pool: _BatchOnPool):
        self._wait_for(on_pool)
        self._in_flight.popleft()
        images, pixels = on_pool.images, on_pool.pixels
        window, timestamp = on_pool.window, on_pool.timestamp
        # Metrics are counted here, on the bundle's thread, where Beam's metrics container lives.
        decoded, errors, skipped, read = [], [], 0, 0
        for row, (size, outcome, value) in enumerate(on_pool.outcomes):
            if size is not None:
                read += 1
                self._bytes.update(size)
            if outcome == DECODED:
                decoded.append((row, size, value))
            elif outcome == SKIPPED:
                skipped += 1
            else:
                errors.append(value)
        self._read.inc(read)
        self._decoded.inc(len(decoded))
        self._failed.inc(len(errors))
        self._timed_out.inc(sum(error["error_type"] == DecodeTimeoutError.__name__ for error in errors))
        self._skipped.inc(skipped)
        if decoded:
            rows = [row for row, _, _ in decoded]
            refused = [error for _, _, (_, error) in decoded if error is not None]
            theirs = on_pool.challenger_pixels
            # All rows, or a copy of the decoded ones: a given-up decode may still write its row.
            yield WindowedValue(ImageBatch(
                paths=[images[row].path for row in rows],
                content_sha256=[sha for _, _, (sha, _) in decoded],
                file_bytes=np.array([size for _, size, _ in decoded], np.int64),
                file_updated_seconds=[images[row].updated_seconds for row in rows],
                pixels=pixels if len(rows) == len(images) else pixels[rows],
                challenger_pixels=None if theirs is None else ChallengerPixels(
                    theirs if len(rows) == len(images) else theirs[rows],
                    np.array([error is None for _, _, (_, error) in decoded]))),
                timestamp, [window])
            if refused:
                yield beam.pvalue.TaggedOutput(CHALLENGER_ERRORS,
                                               WindowedValue(error_table(refused), timestamp, [window]))
        if errors:
            yield beam.pvalue.TaggedOutput(ERRORS, WindowedValue(error_table(errors), timestamp, [window]))
        if skipped:
            yield beam.pvalue.TaggedOutput(SKIPPED, WindowedValue(
                SkippedInputs(ALREADY_SCORED, skipped), timestamp, [window]))

    def _handle(self, on_pool: _BatchOnPool, row: int) -> tuple:
        """``(bytes read or None, outcome, value)`` for one image, decoded into its row (and its
        challenger row): ``(DECODED, (its content's SHA-256, the challenger decode's error row or
        None))``, ``(SKIPPED, None)`` or ``(ERRORS, an error row)``."""
        image = on_pool.images[row]
        path = image.path
        try:
            data = self._read_bytes(storage_path(path))
        except Exception as error:  # noqa: BLE001 - classified just below
            if not is_permanent_read_error(error) and not isinstance(error, FileTooLargeError):
                raise
            return None, ERRORS, error_row(path, "read", error, self._run_id)
        content_sha256 = hashlib.sha256(data).hexdigest()
        if content_sha256 in image.scored_sha256:
            return len(data), SKIPPED, None
        on_pool.started[row] = time.monotonic()
        try:
            decode_and_resize(data, self._size, self._resize_method, self._max_pixels,
                              self._preprocessing, out=on_pool.pixels[row],
                              max_jpeg_scans=self._max_jpeg_scans)
        except Exception as error:  # noqa: BLE001 - decoding is deterministic: never retry it
            return len(data), ERRORS, error_row(path, "decode", error, self._run_id)
        refused = None
        if on_pool.challenger_pixels is not None:
            spec = self._challenger
            try:
                decode_and_resize(data, spec.size, spec.resize_method, self._max_pixels,
                                  spec.preprocessing, out=on_pool.challenger_pixels[row],
                                  max_jpeg_scans=self._max_jpeg_scans)
            except Exception as error:  # noqa: BLE001 - as above: the challenger's error row
                refused = error_row(path, "decode", error, self._run_id)
        return len(data), DECODED, (content_sha256, refused)

    def _read_bytes(self, path: str) -> bytes:
        if FileSystems.get_scheme(path) is None:
            data = read_local_file(path, self._max_bytes)
            if data is not None:
                return data
        # In chunks: one read(max_bytes + 1) would allocate and free the whole cap (64 MiB) for
        # every image. file_chunks never gunzips an image because of its name.
        chunks, size = [], 0
        for chunk in file_chunks(path):
            chunks.append(chunk)
            size += len(chunk)
            if size > self._max_bytes:
                raise FileTooLargeError.over(self._max_bytes)
        return b"".join(chunks)


def read_local_file(path: str, max_bytes: int) -> bytes | None:
    """A local file's bytes in one read of the size its inode gives, or None where the file
    holds more than that size by the time it is read (it grows, or is a /proc-like file that
    reports 0 bytes): the caller then reads it as a stream. Raises ``FileTooLargeError`` for a
    file over ``max_bytes`` before reading a byte, and ``open``'s own errors (the same types and
    messages as Beam's local filesystem gives).

    Through Beam's ``FileSystems.open`` a photo took ~28 us of one thread's CPU, against ~17
    here, most of the difference Python with the interpreter lock held (a filesystem lookup, a
    buffered wrapper, the chunks and their join): on 2 cores, a tenth of a night's lock-held
    time (docs/performance.md)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise FileTooLargeError.over(max_bytes)
        data = handle.read(size + 1)
    return data if len(data) <= size else None


class DecodeImages(beam.PTransform):
    """``PathBatch`` es in; ``{'images': ImageBatch, 'errors': error tables, 'skipped':
    SkippedInputs, 'challenger_errors': error tables}`` out. ``preprocessing``: the model's
    loader version (its metadata says which); ``threads``: sizes the decoder pool;
    ``max_jpeg_scans``, ``max_decode_seconds``: the per-image bounds (``ReadAndDecodeFn``);
    ``challenger``: a challenger's ``DecodeSpec`` where it differs from the model's."""

    def __init__(self, size, resize_method: str, max_pixels: int, max_bytes: int, run_id: str,
                 threads: ThreadBudget, preprocessing: str = PREPROCESSING_VERSION,
                 max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
                 max_decode_seconds: float = DEFAULT_MAX_DECODE_SECONDS,
                 challenger: DecodeSpec | None = None):
        super().__init__()
        self._fn = ReadAndDecodeFn(size, resize_method, max_pixels, max_bytes, run_id, threads,
                                   preprocessing, max_jpeg_scans, max_decode_seconds, challenger)

    def expand(self, batches):
        # Reshuffle so that the batches spread across workers even though one worker listed them.
        results = (batches
                   | "Reshuffle" >> beam.Reshuffle()
                   | "ReadAndDecode" >> beam.ParDo(self._fn).with_output_types(ImageBatch).with_outputs(
                       ERRORS, SKIPPED, CHALLENGER_ERRORS, main=DECODED))
        return {name: results[name] for name in (DECODED, ERRORS, SKIPPED, CHALLENGER_ERRORS)}
