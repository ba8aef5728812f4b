"""Labelled image folders -> seeded splits -> tf.data pipelines for training, and decoded
batches for evaluation and the integer export."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow as tf

from serving.metadata import ModelMetadata, file_chunks
from serving.preprocessing import decode_and_resize

_LOG = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
_KAGGLE_NAME = re.compile(r"^([A-Za-z]+)\.\d+\.[A-Za-z]+$")


@dataclasses.dataclass
class LabelledImages:
    paths: list[str]
    labels: list[int]
    class_names: list[str]

    def counts(self) -> dict[str, int]:
        return {name: self.labels.count(i) for i, name in enumerate(self.class_names)}


def find_labelled_images(root: str) -> LabelledImages:
    """Images under ``root/<class>/`` (class = folder name, sorted), or Kaggle's flat
    ``root/cat.123.jpg`` names (class = the prefix) when ``root`` has no class folders."""
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    pairs: list[tuple[str, str]] = []
    if folders:
        for name in folders:
            for file in sorted(os.listdir(os.path.join(root, name))):
                if file.lower().endswith(IMAGE_SUFFIXES):
                    pairs.append((os.path.join(root, name, file), name))
    else:
        for file in sorted(os.listdir(root)):
            match = _KAGGLE_NAME.match(file)
            if match and file.lower().endswith(IMAGE_SUFFIXES):
                pairs.append((os.path.join(root, file), match.group(1).lower()))
    class_names = sorted({name for _, name in pairs})
    if len(class_names) < 2:
        raise ValueError(f"{root}: need images of at least two classes, found {class_names or 'none'} "
                         "(expected <class>/*.jpg folders or cat.1.jpg-style names)")
    return LabelledImages([p for p, _ in pairs], [class_names.index(n) for _, n in pairs], class_names)


def labelled_images_for(root: str, class_names: Sequence[str]) -> LabelledImages:
    """``find_labelled_images(root)`` with each label an index into ``class_names`` (a model's
    output order, not the folders' sorted order) and ``class_names`` as its classes. Raises
    ``ValueError`` in one line when the images' classes are not the model's."""
    data = find_labelled_images(root)
    if data.class_names != sorted(class_names):
        raise ValueError(f"{root} holds classes {data.class_names}, the model's are {list(class_names)}: "
                         "name its folders (or file name prefixes) after the model's classes")
    return LabelledImages(data.paths, [list(class_names).index(data.class_names[label])
                                       for label in data.labels], list(class_names))


def split_train_validation(data: LabelledImages, validation_fraction: float,
                           seed: int) -> tuple[LabelledImages, LabelledImages]:
    """Stratified, seeded split: each class contributes the same fraction to validation."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    labels = np.array(data.labels)
    for label in range(len(data.class_names)):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = max(1, int(round(len(members) * validation_fraction))) if validation_fraction > 0 else 0
        val_idx.extend(members[:cut])
        train_idx.extend(members[cut:])

    def subset(indices):
        indices = sorted(int(i) for i in indices)
        return LabelledImages([data.paths[i] for i in indices], [data.labels[i] for i in indices],
                              data.class_names)

    return subset(train_idx), subset(val_idx)


def class_weights(data: LabelledImages) -> dict[int, float] | None:
    """Balanced weights (n / (k * n_class)) when class counts differ, else None."""
    counts = np.bincount(data.labels, minlength=len(data.class_names))
    if counts.min() == counts.max():
        return None
    return {i: float(len(data.labels) / (len(counts) * c)) for i, c in enumerate(counts) if c}


def image_dataset(data: LabelledImages, size: tuple[int, int], resize_method: str,
                  preprocessing: str, batch_size: int, shuffle: bool, seed: int) -> tf.data.Dataset:
    """Parallel decode (through the shared preprocessing function), cache, shuffle, batch,
    prefetch. Unreadable images are skipped with a warning rather than ending training. The
    cache is filled by a first pass that counts the readable images, so that the dataset's
    length is known (skipping makes it unknown to tf.data, and Keras then warns at the end of
    the first epoch that the input "ran out of data", a false alarm); the epochs read the cache."""
    height, width = size

    def load(path):
        pixels = tf.numpy_function(
            lambda p: decode_and_resize(tf.io.gfile.GFile(p.decode(), "rb").read(), (height, width),
                                        resize_method, preprocessing=preprocessing),
            [path], tf.uint8, stateful=False)
        return tf.ensure_shape(pixels, (height, width, 3))

    dataset = tf.data.Dataset.from_tensor_slices((data.paths, data.labels))
    dataset = dataset.map(lambda p, y: (load(p), y), num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True)
    dataset = dataset.ignore_errors(log_warning=True).cache()
    readable = int(dataset.reduce(np.int64(0), lambda count, _: count + 1))
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(readable))
    if shuffle:
        dataset = dataset.shuffle(len(data.paths), seed=seed, reshuffle_each_iteration=True)
    return (dataset.map(lambda x, y: (tf.cast(x, tf.float32), y))
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))


def decoded_batches(paths: Sequence[str], metadata: ModelMetadata, batch_size: int,
                    ) -> Iterator[tuple[list[int], np.ndarray | None, dict[str, Exception]]]:
    """``paths`` in batches, each decoded in parallel through the model's own preprocessing:
    (indices of the readable paths, their stacked pixels or None when there are none, and
    ``{path: error}`` for the others; the caller decides what a failure means). One batch at a
    time, so memory does not grow with the number of paths."""
    size = (metadata.height, metadata.width)

    def load(path: str) -> np.ndarray | Exception:
        try:
            return decode_and_resize(b"".join(file_chunks(path)), size, metadata.resize_method,
                                     preprocessing=metadata.preprocessing)
        except Exception as error:  # noqa: BLE001 - handed to the caller with its path
            return error

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            indices, pixels, failures = [], [], {}
            for offset, result in enumerate(pool.map(load, chunk)):
                if isinstance(result, Exception):
                    failures[chunk[offset]] = result
                else:
                    indices.append(start + offset)
                    pixels.append(result)
            yield indices, np.stack(pixels) if pixels else None, failures


def readable_batches(paths: Sequence[str], metadata: ModelMetadata, batch_size: int,
                     purpose: str) -> Iterator[tuple[list[int], np.ndarray]]:
    """``decoded_batches`` for export-time work on labelled images (the integer model's
    calibration, the out-of-scope detector's fit): (indices, pixels) of the readable images; an
    unreadable one (``OSError``/``ValueError``) is skipped with a warning naming ``purpose``, as
    training skips it; any other error is raised."""
    for indices, pixels, failures in decoded_batches(paths, metadata, batch_size):
        for path, error in failures.items():
            if not isinstance(error, (OSError, ValueError)):
                raise error
            _LOG.warning("%s: skipping %s (%s)", purpose, path, error)
        if pixels is not None:
            yield indices, pixels
