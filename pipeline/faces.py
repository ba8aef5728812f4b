"""Stage between decoding and scoring (``--faces detect``): the human faces in each batch.

Each ``ImageBatch`` leaves with ``human_faces`` (int64 [n]), counted in the pixels the model is
about to score (decoded once, at the model's input size) by ``serving.faces.FaceDetector``,
one detector per worker process (``shared.Shared``, as RunInference shares a model). A stage
of its own rather than a part of the inference step: on Dataflow with an accelerator hint for
inference only (``--inference-resource-hint``), the CPU-bound detector runs on the CPU workers
that decode. ``pipeline.inference.prediction_table`` records the counts and decides ``human``.
"""

from __future__ import annotations

import dataclasses
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from pipeline.decode import ImageBatch
from pipeline.options import ThreadBudget
from pipeline.rows import METRICS_NAMESPACE
from serving.faces import FaceDetector


class CountFacesFn(beam.DoFn):
    """``ImageBatch`` -> the same batch with ``human_faces``; the detector's LiteRT threads are
    the model's share of the process's cores (``ThreadBudget.resolve``)."""

    def __init__(self, threads: ThreadBudget):
        self._threads = threads
        self._shared = shared.Shared()
        self._detector: FaceDetector | None = None
        self._with_faces = Metrics.counter(METRICS_NAMESPACE, "images_with_human_faces")
        self._milliseconds = Metrics.distribution(METRICS_NAMESPACE, "face_detection_ms_per_batch")

    def setup(self):
        threads = self._threads.resolve()[1]
        self._detector = self._shared.acquire(lambda: FaceDetector(threads))

    def process(self, batch: ImageBatch):
        started = time.perf_counter()
        faces = self._detector.count(batch.pixels).astype(np.int64)
        self._milliseconds.update(int((time.perf_counter() - started) * 1000))
        self._with_faces.inc(int(np.count_nonzero(faces)))
        yield dataclasses.replace(batch, human_faces=faces)


class CountFaces(beam.PTransform):
    """``ImageBatch`` es in; the same batches with their ``human_faces`` out."""

    def __init__(self, threads: ThreadBudget | None = None):
        super().__init__()
        self._fn = CountFacesFn(threads or ThreadBudget())

    def expand(self, batches):
        return batches | "Detect" >> beam.ParDo(self._fn).with_output_types(ImageBatch)
