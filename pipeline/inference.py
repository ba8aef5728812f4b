"""Stage 3: batched inference with Beam's RunInference and a SavedModel model handler.

RunInference brings what a hand-written DoFn would have to re-implement: batching through
``BatchElements`` (tunable min/max), one model per worker process shared across bundles and
threads (``shared.Shared``), optional one-model-per-machine sharing for GPUs, and standard
inference metrics (batch size, latency, load time) visible in the Dataflow UI. The handler is
our own because Beam's TensorFlow handler loads Keras models and feeds float tensors, whereas
the model contract is a SavedModel signature (or its checked LiteRT twin) that takes uint8 images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference import base as inference_base
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from pipeline.rows import METRICS_NAMESPACE, UNCERTAIN, image_id, probability_column, top_classes, utc_now
from serving.metadata import ModelMetadata
from serving.runtimes import LITERT_INVOKE_BATCH, ServingModel

_LOG = logging.getLogger(__name__)

try:
    import resource
except ImportError:  # Windows: Beam's memory figures are unavailable there, and it says so
    resource = None
if inference_base.resource is None:
    # Beam 2.77 imports ``resource`` in one try block with a model manager that needs PyTorch,
    # so without PyTorch it takes the module for missing and logs "Resource module is not
    # available" twice per run (and reports no memory). The module is there: hand it back.
    inference_base.resource = resource


class ExportedModelHandler(ModelHandler[np.ndarray, np.ndarray, ServingModel]):
    """Batches of uint8 images -> rows of class probabilities, via ``serving.runtimes`` (SavedModel
    or LiteRT runtime, see there)."""

    def __init__(self, model_dir: str, metadata: ModelMetadata, *, min_batch_size: int,
                 max_batch_size: int, share_across_processes: bool = False, runtime: str = "auto",
                 tflite_threads: int = 0, tflite_invoke_batch: int = LITERT_INVOKE_BATCH):
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size,
                         large_model=share_across_processes)
        self._model_dir = model_dir
        self._metadata = metadata
        self._runtime = runtime
        self._tflite_threads = tflite_threads
        self._tflite_invoke_batch = tflite_invoke_batch

    def load_model(self) -> ServingModel:
        started = time.monotonic()
        model = ServingModel(self._model_dir, self._metadata, self._runtime, self._tflite_threads,
                             self._tflite_invoke_batch)
        model.check_reference_predictions()  # this worker's libraries reproduce the export
        _LOG.info("loaded model %s (%s) with runtime %s on %s in %.1fs", self._metadata.model_version,
                  self._model_dir, model.runtime, model.device, time.monotonic() - started)
        return model

    def run_inference(self, batch: Sequence[np.ndarray], model: ServingModel,
                      inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:
        probabilities = model.predict(np.stack(batch))
        # The image itself is dropped from the result: only its key and scores travel on.
        return [PredictionResult(None, row) for row in probabilities]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(image.nbytes for image in batch)

    def get_metrics_namespace(self) -> str:
        return "petscore_inference"


class ToPredictionRowFn(beam.DoFn):
    """``(ImageSource, PredictionResult)`` -> a row of the predictions schema."""

    def __init__(self, metadata: ModelMetadata, min_confidence: float, run_id: str, top_k: int = 0):
        self._class_names = list(metadata.class_names)
        self._top_k = top_k
        self._columns = [probability_column(name) for name in self._class_names]
        self._model_version = metadata.model_version
        self._model_sha256 = metadata.sha256
        self._min_confidence = min_confidence
        self._run_id = run_id
        self._scored = Metrics.counter(METRICS_NAMESPACE, "images_scored")
        self._uncertain = Metrics.counter(METRICS_NAMESPACE, "images_uncertain")

    def process(self, keyed_result):
        source, result = keyed_result
        path = source.path
        probabilities = [float(p) for p in result.inference]
        best = int(np.argmax(probabilities))
        confidence = probabilities[best]
        decision = self._class_names[best]
        if confidence < self._min_confidence:
            decision = UNCERTAIN
            self._uncertain.inc()
        self._scored.inc()
        yield {
            "path": path,
            "image_id": image_id(path),
            "content_sha256": source.content_sha256,
            "file_bytes": source.file_bytes,
            "file_updated_seconds": source.file_updated_seconds,
            "predicted_class": self._class_names[best],
            **dict(zip(self._columns, probabilities, strict=True)),
            "confidence": confidence,
            **(top_classes(probabilities, self._class_names, self._top_k) if self._top_k else {}),
            "decision": decision,
            "model_version": self._model_version,
            "model_sha256": self._model_sha256,
            "run_id": self._run_id,
            "scored_at": utc_now(),
        }


class ScoreImages(beam.PTransform):
    """``(ImageSource, pixels)`` in; prediction rows out."""

    def __init__(self, model_dir: str, metadata: ModelMetadata, *, min_batch_size: int,
                 max_batch_size: int, min_confidence: float, run_id: str,
                 share_model_across_processes: bool = False, runtime: str = "auto",
                 tflite_threads: int = 0, tflite_invoke_batch: int = LITERT_INVOKE_BATCH,
                 top_k: int = 0):
        super().__init__()
        self._handler = KeyedModelHandler(ExportedModelHandler(
            model_dir, metadata, min_batch_size=min_batch_size, max_batch_size=max_batch_size,
            share_across_processes=share_model_across_processes, runtime=runtime,
            tflite_threads=tflite_threads, tflite_invoke_batch=tflite_invoke_batch))
        self._to_row = ToPredictionRowFn(metadata, min_confidence, run_id, top_k)

    def expand(self, images):
        return (images
                | "RunInference" >> RunInference(self._handler)
                | "ToPredictionRow" >> beam.ParDo(self._to_row))
