"""Stage 2: read each batch's files and decode them to the model's input size, in parallel.

A batch of paths comes in; one ``ImageBatch`` (every decoded image of the batch in one uint8
array, and a second one for a challenger model whose decoding differs), one error table and one
list of skipped paths go out. Permanent problems (missing file,
empty or corrupt bytes, unsupported format, oversized image) become error rows of their own:
one bad file never costs its batch. Anything else reading storage raises, so that the runner
retries the bundle instead of recording a transient outage as a bad image.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import pickle
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.options import ThreadBudget
from pipeline.paths import storage_path
from pipeline.read import SKIPPED, error_table
from pipeline.rows import ALREADY_SCORED, METRICS_NAMESPACE, ListedImage, PathBatch, SkippedInputs, error_row
from serving.metadata import file_chunks
from serving.preprocessing import PREPROCESSING_VERSION, decode_and_resize

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
    ``pipeline.options.ThreadBudget``): storage reads wait
    on the network and the decoders release the GIL, so one process keeps its cores and many
    requests busy. Each image is decoded straight into its row of the batch's array, a few
    images per task (two tasks per thread and batch). Batches
    decode ahead: the next ``DECODE_AHEAD_BATCHES`` are on the pool while the bundle's thread
    runs inference on the current one (on a GPU worker, the device never waits for the CPUs to
    start the next batch). A transient error re-raises and fails the bundle, which the runner
    retries.
    """

    DECODE_AHEAD_BATCHES = 2

    def __init__(self, size: tuple[int, int], resize_method: str, max_pixels: int,
                 max_bytes: int, run_id: str, threads: ThreadBudget,
                 preprocessing: str = PREPROCESSING_VERSION, challenger: DecodeSpec | None = None):
        self._size = tuple(size)
        self._challenger = challenger
        self._resize_method = resize_method
        self._preprocessing = preprocessing
        self._max_pixels = max_pixels
        self._max_bytes = max_bytes
        self._run_id = run_id
        self._threads = threads
        self._read = Metrics.counter(METRICS_NAMESPACE, "images_read")
        self._decoded = Metrics.counter(METRICS_NAMESPACE, "images_decoded")
        self._failed = Metrics.counter(METRICS_NAMESPACE, "images_failed")
        self._bytes = Metrics.distribution(METRICS_NAMESPACE, "image_bytes")
        self._skipped = Metrics.counter(METRICS_NAMESPACE, "images_skipped_already_scored")

    def setup(self):
        self._pool = None  # sized on the first batch, which says whether storage is local

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
        pixels = np.empty((len(images), *self._size, 3), np.uint8)
        theirs = (None if self._challenger is None
                  else np.empty((len(images), *self._challenger.size, 3), np.uint8))
        # A few images per task: a task's overhead (submit, wake-up, result) is paid per chunk.
        chunk = max(1, math.ceil(len(images) / (2 * self._threads_in_pool)))
        futures = [self._pool.submit(self._handle_chunk, images[start:start + chunk],
                                     pixels[start:start + chunk],
                                     None if theirs is None else theirs[start:start + chunk])
                   for start in range(0, len(images), chunk)]
        self._in_flight.append((images, pixels, theirs, futures, window, timestamp))
        while len(self._in_flight) > self.DECODE_AHEAD_BATCHES:
            yield from self._hand_on(*self._in_flight.popleft())

    def finish_bundle(self):
        while self._in_flight:
            yield from self._hand_on(*self._in_flight.popleft())

    def _hand_on(self, images, pixels, theirs, futures, window, timestamp):
        # Metrics are counted here, on the bundle's thread, where Beam's metrics container lives.
        decoded, errors, skipped, read = [], [], 0, 0
        outcomes = [outcome for future in futures for outcome in future.result()]
        for row, (size, outcome, value) in enumerate(outcomes):
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
        self._skipped.inc(skipped)
        if decoded:
            rows = [row for row, _, _ in decoded]
            refused = [error for _, _, (_, error) in decoded if error is not None]
            yield WindowedValue(ImageBatch(
                paths=[images[row].path for row in rows],
                content_sha256=[sha for _, _, (sha, _) in decoded],
                file_bytes=np.array([size for _, size, _ in decoded], np.int64),
                file_updated_seconds=[images[row].updated_seconds for row in rows],
                pixels=pixels if len(rows) == len(images) else pixels[rows],
                challenger_pixels=None if theirs is None else ChallengerPixels(
                    theirs[rows], np.array([error is None for _, _, (_, error) in decoded]))),
                timestamp, [window])
            if refused:
                yield beam.pvalue.TaggedOutput(CHALLENGER_ERRORS,
                                               WindowedValue(error_table(refused), timestamp, [window]))
        if errors:
            yield beam.pvalue.TaggedOutput(ERRORS, WindowedValue(error_table(errors), timestamp, [window]))
        if skipped:
            yield beam.pvalue.TaggedOutput(SKIPPED, WindowedValue(
                SkippedInputs(ALREADY_SCORED, skipped), timestamp, [window]))

    def _handle_chunk(self, images: list[ListedImage], targets: np.ndarray,
                      challenger_targets: np.ndarray | None) -> list[tuple]:
        return [self._handle(image, target, None if challenger_targets is None else challenger_targets[i])
                for i, (image, target) in enumerate(zip(images, targets, strict=True))]

    def _handle(self, image: ListedImage, target: np.ndarray,
                challenger_target: np.ndarray | None = None) -> tuple:
        """``(bytes read or None, outcome, value)`` for one image, decoded into ``target`` (and
        ``challenger_target``): ``(DECODED, (its content's SHA-256, the challenger decode's error
        row or None))``, ``(SKIPPED, None)`` or ``(ERRORS, an error row)``."""
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
        try:
            decode_and_resize(data, self._size, self._resize_method, self._max_pixels,
                              self._preprocessing, out=target)
        except Exception as error:  # noqa: BLE001 - decoding is deterministic: never retry it
            return len(data), ERRORS, error_row(path, "decode", error, self._run_id)
        refused = None
        if challenger_target is not None:
            spec = self._challenger
            try:
                decode_and_resize(data, spec.size, spec.resize_method, self._max_pixels,
                                  spec.preprocessing, out=challenger_target)
            except Exception as error:  # noqa: BLE001 - as above: the challenger's error row
                refused = error_row(path, "decode", error, self._run_id)
        return len(data), DECODED, (content_sha256, refused)

    def _read_bytes(self, path: str) -> bytes:
        # In chunks: one read(max_bytes + 1) would allocate and free the whole cap (64 MiB) for
        # every image. file_chunks never gunzips an image because of its name.
        chunks, size = [], 0
        for chunk in file_chunks(path):
            chunks.append(chunk)
            size += len(chunk)
            if size > self._max_bytes:
                raise FileTooLargeError(f"file is larger than the {self._max_bytes}-byte cap")
        return b"".join(chunks)


class DecodeImages(beam.PTransform):
    """``PathBatch`` es in; ``{'images': ImageBatch, 'errors': error tables, 'skipped':
    SkippedInputs, 'challenger_errors': error tables}`` out. ``preprocessing``: the model's
    loader version (its metadata says which); ``threads``: sizes the decoder pool;
    ``challenger``: a challenger's ``DecodeSpec`` where it differs from the model's."""

    def __init__(self, size, resize_method: str, max_pixels: int, max_bytes: int, run_id: str,
                 threads: ThreadBudget, preprocessing: str = PREPROCESSING_VERSION,
                 challenger: DecodeSpec | None = None):
        super().__init__()
        self._fn = ReadAndDecodeFn(size, resize_method, max_pixels, max_bytes, run_id, threads,
                                   preprocessing, challenger)

    def expand(self, batches):
        # Reshuffle so that the batches spread across workers even though one worker listed them.
        results = (batches
                   | "Reshuffle" >> beam.Reshuffle()
                   | "ReadAndDecode" >> beam.ParDo(self._fn).with_output_types(ImageBatch).with_outputs(
                       ERRORS, SKIPPED, CHALLENGER_ERRORS, main=DECODED))
        return {name: results[name] for name in (DECODED, ERRORS, SKIPPED, CHALLENGER_ERRORS)}
