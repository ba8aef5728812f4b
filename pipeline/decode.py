"""Stage 2: read each file and decode it to the model's input size, in parallel workers.

Permanent problems (missing file, empty or corrupt bytes, unsupported format, oversized image)
become error rows on the ``errors`` output. Anything else reading storage raises, so that
the runner retries the bundle instead of recording a transient outage as a bad image.
"""

from __future__ import annotations

import collections
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.rows import METRICS_NAMESPACE, ImageSource, ListedImage, error_row
from serving.metadata import file_chunks
from serving.preprocessing import PREPROCESSING_VERSION, decode_and_resize

ERRORS = "errors"
SKIPPED = "skipped"


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


class ReadAndDecodeFn(beam.DoFn):
    """A batch of ``ListedImage`` -> per image ``(ImageSource, uint8 [height, width, 3])``, or an
    error row tagged ``errors``, or the path tagged ``skipped`` when these exact bytes were
    already scored by this model version under this path (``scored_sha256``, --skip-scored).

    The paths of a batch are read and decoded on a thread pool: storage reads wait on the
    network and Pillow releases the GIL while decoding, so one process keeps every core and
    many requests busy, and the next batches decode while the bundle's thread runs inference on
    the earlier ones (decode-ahead). A transient error re-raises and fails the bundle, which the
    runner retries.
    """

    DECODE_AHEAD_BATCHES = 2

    def __init__(self, size: tuple[int, int], resize_method: str, max_pixels: int,
                 max_bytes: int, run_id: str, preprocessing: str = PREPROCESSING_VERSION):
        self._size = tuple(size)
        self._resize_method = resize_method
        self._preprocessing = preprocessing
        self._max_pixels = max_pixels
        self._max_bytes = max_bytes
        self._run_id = run_id
        self._read = Metrics.counter(METRICS_NAMESPACE, "images_read")
        self._decoded = Metrics.counter(METRICS_NAMESPACE, "images_decoded")
        self._failed = Metrics.counter(METRICS_NAMESPACE, "images_failed")
        self._bytes = Metrics.distribution(METRICS_NAMESPACE, "image_bytes")
        self._skipped = Metrics.counter(METRICS_NAMESPACE, "images_skipped_already_scored")

    def setup(self):
        self._pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1))

    def teardown(self):
        self._pool.shutdown(wait=False)

    def start_bundle(self):
        self._in_flight = collections.deque()

    def process(self, images: list[ListedImage], window=beam.DoFn.WindowParam,
                timestamp=beam.DoFn.TimestampParam):
        # Decode ahead: this batch goes to the pool now, and only batches older than the last
        # DECODE_AHEAD_BATCHES are handed on, so the pool decodes while the bundle thread runs
        # inference on what it was handed. Memory stays bounded by the batches in flight.
        self._in_flight.append(([self._pool.submit(self._handle, image) for image in images],
                                window, timestamp))
        while len(self._in_flight) > self.DECODE_AHEAD_BATCHES:
            yield from self._hand_on(*self._in_flight.popleft())

    def finish_bundle(self):
        while self._in_flight:
            yield from self._hand_on(*self._in_flight.popleft())

    def _hand_on(self, futures, window, timestamp):
        # Metrics are counted here, on the bundle's thread, where Beam's metrics container lives.
        for future in futures:
            size, output = future.result()
            if size is not None:
                self._read.inc()
                self._bytes.update(size)
            if isinstance(output, beam.pvalue.TaggedOutput):
                (self._failed if output.tag == ERRORS else self._skipped).inc()
                yield beam.pvalue.TaggedOutput(output.tag, WindowedValue(output.value, timestamp, [window]))
            else:
                self._decoded.inc()
                yield WindowedValue(output, timestamp, [window])

    def _handle(self, image: ListedImage):
        """``(bytes read or None, output)`` for one image."""
        path = image.path
        try:
            data = self._read_bytes(path)
        except Exception as error:  # noqa: BLE001 - classified just below
            if not is_permanent_read_error(error) and not isinstance(error, FileTooLargeError):
                raise
            return None, beam.pvalue.TaggedOutput(ERRORS, error_row(path, "read", error, self._run_id))
        content_sha256 = hashlib.sha256(data).hexdigest()
        if content_sha256 in image.scored_sha256:
            return len(data), beam.pvalue.TaggedOutput(SKIPPED, path)
        try:
            pixels = decode_and_resize(data, self._size, self._resize_method, self._max_pixels,
                                       self._preprocessing)
        except Exception as error:  # noqa: BLE001 - decoding is deterministic: never retry it
            return len(data), beam.pvalue.TaggedOutput(
                ERRORS, error_row(path, "decode", error, self._run_id))
        return len(data), (ImageSource(path, content_sha256, len(data), image.updated_seconds), pixels)

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
    """``ListedImage`` in; ``{'images': (ImageSource, pixels), 'errors': rows, 'skipped': paths}``
    out. ``preprocessing``: the model's loader version (its metadata says which)."""

    def __init__(self, size, resize_method: str, max_pixels: int, max_bytes: int, run_id: str,
                 preprocessing: str = PREPROCESSING_VERSION):
        super().__init__()
        self._fn = ReadAndDecodeFn(size, resize_method, max_pixels, max_bytes, run_id, preprocessing)

    def expand(self, images):
        # Reshuffle so that decoding fans out across workers even when one task matched the glob;
        # small batches feed the decoder's thread pool.
        results = (images
                   | "Reshuffle" >> beam.Reshuffle()
                   | "BatchForThreads" >> beam.BatchElements(min_batch_size=4, max_batch_size=32)
                   | "ReadAndDecode" >> beam.ParDo(self._fn).with_outputs(
                       ERRORS, SKIPPED, main="images"))
        return {"images": results.images, ERRORS: results[ERRORS], SKIPPED: results[SKIPPED]}
