"""Output rows and their explicit pyarrow schemas."""

from __future__ import annotations

import dataclasses
import datetime
import os
import pickle
import re
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

UNCERTAIN = "uncertain"
OUT_OF_SCOPE = "out_of_scope"  # the decision of an image the model's detector flags
HUMAN = "human"  # --faces detect: a face, and not confidently one of the model's classes
METRICS_NAMESPACE = "petscore"  # Beam metrics of the job, locally and in the Dataflow UI

class ListedImage(NamedTuple):
    """An input path with what the storage listing said of it (None for manifest entries) and,
    with --skip-scored, the SHA-256s this model version already scored under that path."""

    path: str
    size_bytes: int | None = None
    updated_seconds: float | None = None
    scored_sha256: tuple[str, ...] = ()


ALREADY_SCORED = "already_scored"  # --skip-scored: these bytes were scored under this path
FOLDER_PLACEHOLDER = "folder_placeholder"  # an object store's 0-byte "dir/" object
SKIP_REASONS = (ALREADY_SCORED, FOLDER_PLACEHOLDER)


@dataclasses.dataclass
class SkippedInputs:
    """``count`` inputs skipped for one of ``SKIP_REASONS``: counted, never scored. Its length
    is the count, as a table's is its rows, so progress counts both alike."""

    reason: str
    count: int

    def __len__(self) -> int:
        return self.count


class PathBatch:
    """Images listed together (``ListedImage`` s), the unit of work until they are decoded. One
    object rather than a list so that Beam's coder pickles the whole batch in one call, not each
    image on its own.

    A batch that has been through a coder stays packed (its pickle, about 70 bytes an image for
    a 60-character path) until ``images`` is read: the local runner's GroupByKey, behind the
    ``Reshuffle`` that spreads the batches, holds every batch of the night decoded until the
    next stage starts, and as ``ListedImage`` objects a million images took about 250 MiB."""

    __slots__ = ("_count", "_images", "_packed")

    def __init__(self, images: Iterable[ListedImage]):
        self._images = list(images)
        self._count, self._packed = len(self._images), None

    @classmethod
    def _packed_batch(cls, count: int, packed: bytes) -> PathBatch:
        batch = cls.__new__(cls)
        batch._count, batch._images, batch._packed = count, None, packed
        return batch

    def __reduce__(self):
        packed = self._packed if self._images is None else pickle.dumps(self._images, pickle.HIGHEST_PROTOCOL)
        return PathBatch._packed_batch, (self._count, packed)

    @property
    def images(self) -> list[ListedImage]:
        if self._images is None:
            self._images, self._packed = pickle.loads(self._packed), None
        return self._images

    def __len__(self) -> int:
        return self._count

    def __eq__(self, other) -> bool:
        return isinstance(other, PathBatch) and self.images == other.images

    __hash__ = None  # mutable, as the dataclass it was

    def __repr__(self) -> str:
        return f"PathBatch({self.images!r})"


ERROR_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),  # read | decode
    pa.field("error_type", pa.string(), nullable=False),
    pa.field("message", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("failed_at", pa.timestamp("ms", tz="UTC"), nullable=False),
])


def probability_column(class_name: str) -> str:
    """Column holding P(class_name): ``prob_dog``; odd characters become ``_``."""
    return "prob_" + re.sub(r"[^0-9a-zA-Z_]", "_", class_name)


def default_top_k(class_names: list[str]) -> int:
    """Top-k columns only where they say more than the argmax: 5 for models of over 5 classes."""
    return 5 if len(class_names) > 5 else 0


def top_k_columns(probabilities: np.ndarray, class_names: list[str], k: int) -> tuple[pa.Array, pa.Array]:
    """``top_classes`` / ``top_probabilities`` of a batch: for each row of ``probabilities``
    (float [n, classes]), its k most probable classes and their probabilities (float64), most
    probable first, ties in class order (a stable sort)."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    offsets = pa.array(np.arange(0, len(order) * k + 1, k, dtype=np.int32))
    names = pa.array(class_names, pa.string()).take(pa.array(order.ravel()))
    chosen = np.take_along_axis(probabilities, order, axis=1).astype(np.float64).ravel()
    return (pa.ListArray.from_arrays(offsets, names),
            pa.ListArray.from_arrays(offsets, pa.array(chosen, pa.float64())))


# Columns every predictions file has whether or not the run computed them, null where it did
# not (top-k off, a model without an out-of-scope detector): nights scored with other options
# then read as one table, with identical types, in pyarrow, pandas, polars, DuckDB and BigQuery.
# A new per-row output is one more line here (and its values in ``ToPredictionTableFn``).
OPTIONAL_PREDICTION_FIELDS = (
    pa.field("top_classes", pa.list_(pa.string())),  # --top-k: the k most probable, first first
    pa.field("top_probabilities", pa.list_(pa.float64())),
    # the model's out-of-scope score (higher = further from its training images), detector in use
    pa.field("scope_score", pa.float64()),
    pa.field("tta", pa.string()),  # how the image was scored: --tta none | flip
    pa.field("human_faces", pa.int64()),  # --faces detect: human faces found; null when off
)


def prediction_schema(class_names: list[str]) -> pa.Schema:
    """The predictions table's schema, the same for every run of a model's classes: one
    probability column per class, and every ``OPTIONAL_PREDICTION_FIELDS`` column, nullable."""
    return pa.schema([
        pa.field("path", pa.string(), nullable=False),
        pa.field("image_id", pa.int64()),  # integer file stem, null when the stem is not a number
        pa.field("content_sha256", pa.string(), nullable=False),  # of the file's bytes
        pa.field("file_bytes", pa.int64(), nullable=False),
        # the storage listing's update time (seconds since the epoch); null for manifest inputs
        pa.field("file_updated_seconds", pa.float64()),
        pa.field("predicted_class", pa.string(), nullable=False),
        *[pa.field(probability_column(name), pa.float64(), nullable=False) for name in class_names],
        pa.field("confidence", pa.float64(), nullable=False),
        *OPTIONAL_PREDICTION_FIELDS,
        # a class name, 'uncertain' (below --min-confidence), 'out_of_scope' (the detector's) or
        # 'human' (--faces detect: a face, and not confidently a class)
        pa.field("decision", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("model_sha256", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scored_at", pa.timestamp("ms", tz="UTC"), nullable=False),
    ])


def file_stem(path: str) -> str:
    """``.../0a1b2c.jpg`` -> ``0a1b2c``: the id of a multi-class Kaggle submission, as it is."""
    return os.path.splitext(os.path.basename(path.rstrip("/")))[0]


MAX_IMAGE_ID = 2**63 - 1  # the int64 image_id column's largest value


def image_id(path: str) -> int | None:
    """Kaggle id of a path: ``.../123.jpg`` -> 123; None when the stem is not an integer that
    the int64 ``image_id`` column holds (``².jpg`` is a digit to ``str.isdigit`` but no integer
    to ``int``; a 20-digit stem overflows): such a file scores, with no CSV row."""
    stem = file_stem(path)
    if not (stem.isascii() and stem.isdigit()):
        return None
    number = int(stem)
    return number if number <= MAX_IMAGE_ID else None


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def error_row(path: str, stage: str, error: BaseException | str, run_id: str,
              error_type: str | None = None) -> dict[str, Any]:
    """One row of the errors schema for the recorded ``path`` (``pipeline.paths``). The message
    is for people: a name byte that is not UTF-8 in it is written ``\\udcXX``."""
    message = str(error) or type(error).__name__
    return {
        "path": path,
        "stage": stage,
        "error_type": error_type or type(error).__name__,
        "message": message.encode("utf-8", "backslashreplace").decode("utf-8"),
        "run_id": run_id,
        "failed_at": utc_now(),
    }
