"""Stage 3: batched inference with Beam's RunInference, then one Arrow table of rows per batch.

RunInference brings what a hand-written DoFn would have to re-implement: one model per worker
process shared across bundles and threads (``shared.Shared``), optional one-model-per-machine
sharing for GPUs, and standard inference metrics (batch size, latency, load time) visible in the
Dataflow UI. Its own batching (``BatchElements``) is skipped (``with_no_batching``): the images
arrive already batched, one ``ImageBatch`` per element, since the listing. The handler is our own
because Beam's TensorFlow handler loads Keras models and feeds float tensors, whereas the model
contract is a SavedModel signature (or its checked LiteRT twin) that takes uint8 images.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics
from apache_beam.ml.inference import base as inference_base
from apache_beam.ml.inference.base import ModelHandler, RunInference

from pipeline.decode import ImageBatch
from pipeline.options import ThreadBudget
from pipeline.rows import (
    METRICS_NAMESPACE,
    OUT_OF_SCOPE,
    UNCERTAIN,
    image_id,
    prediction_schema,
    probability_column,
    top_k_columns,
    utc_now,
)
from serving.metadata import ModelContractError, ModelMetadata
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


@dataclasses.dataclass
class ScoredBatch:
    """An ``ImageBatch``'s inference: ``probabilities`` float32 [n, classes] and, for a model
    with an out-of-scope detector, ``scope_score`` float32 [n] (else None), row i for
    ``images.paths[i]``. The pixels are dropped: only what the rows need travels on."""

    images: ImageBatch
    probabilities: np.ndarray
    scope_score: np.ndarray | None = None


class ExportedModelHandler(ModelHandler[ImageBatch, ScoredBatch, ServingModel]):
    """An ``ImageBatch`` -> its ``ScoredBatch``, via ``serving.runtimes`` (SavedModel, LiteRT or
    Keras runtime, see there). Use it ``with_no_batching()``: each element is a whole batch."""

    def __init__(self, model_dir: str, metadata: ModelMetadata, *,
                 share_across_processes: bool = False, runtime: str = "auto",
                 threads: ThreadBudget | None = None, tflite_invoke_batch: int = LITERT_INVOKE_BATCH):
        super().__init__(large_model=share_across_processes)
        self._model_dir = model_dir
        self._metadata = metadata
        self._runtime = runtime
        self._threads = threads or ThreadBudget()
        self._tflite_invoke_batch = tflite_invoke_batch

    def load_model(self) -> ServingModel:
        started = time.monotonic()
        model = ServingModel(self._model_dir, self._metadata, self._runtime,
                             self._threads.resolve()[1], self._tflite_invoke_batch)
        model.check_reference_predictions()  # this worker's libraries reproduce the export
        _LOG.info("loaded model %s (%s) with runtime %s on %s in %.1fs", self._metadata.model_version,
                  self._model_dir, model.runtime, model.device, time.monotonic() - started)
        return model

    def run_inference(self, batch: ImageBatch, model: ServingModel,
                      inference_args: dict[str, Any] | None = None) -> list[ScoredBatch]:
        outputs = model.predict_outputs(batch.pixels)  # both outputs of one inference call
        return [ScoredBatch(dataclasses.replace(batch, pixels=None), *outputs)]

    def get_num_bytes(self, batch: ImageBatch) -> int:
        return batch.pixels.nbytes

    def get_metrics_namespace(self) -> str:
        return "petscore_inference"


class ToPredictionTableFn(beam.DoFn):
    """A ``ScoredBatch`` -> one ``pyarrow.Table`` of the predictions schema (``rows``), built
    column by column: the class with the highest probability (the first on a tie, as
    ``np.argmax``), ``uncertain`` below ``min_confidence``, the ``top_k`` classes when asked.
    With a ``scope_threshold`` (the model's detector in use), each row's ``scope_score`` too, and
    the decision ``out_of_scope`` where it is above the threshold, whatever the confidence."""

    def __init__(self, metadata: ModelMetadata, min_confidence: float, run_id: str, top_k: int = 0,
                 scope_threshold: float | None = None):
        self._class_names = list(metadata.class_names)
        self._top_k = top_k
        self._scope_threshold = scope_threshold
        self._schema = prediction_schema(self._class_names, top_k, scope=scope_threshold is not None)
        self._constants = {"model_version": metadata.model_version, "model_sha256": metadata.sha256,
                           "run_id": run_id}
        self._min_confidence = min_confidence
        self._scored = Metrics.counter(METRICS_NAMESPACE, "images_scored")
        self._uncertain = Metrics.counter(METRICS_NAMESPACE, "images_uncertain")
        self._out_of_scope = Metrics.counter(METRICS_NAMESPACE, "images_out_of_scope")

    def setup(self):
        self._names = pa.array(self._class_names, pa.string())

    def process(self, scored: ScoredBatch):
        images, count = scored.images, len(scored.images)
        probabilities = scored.probabilities.astype(np.float64)
        best = np.argmax(probabilities, axis=1)
        confidence = probabilities[np.arange(count), best]
        predicted = self._names.take(pa.array(best))
        uncertain = confidence < self._min_confidence
        decision = pc.if_else(pa.array(uncertain), UNCERTAIN, predicted)
        columns = {
            "path": pa.array(images.paths, pa.string()),
            "image_id": pa.array([image_id(path) for path in images.paths], pa.int64()),
            "content_sha256": pa.array(images.content_sha256, pa.string()),
            "file_bytes": pa.array(images.file_bytes, pa.int64()),
            "file_updated_seconds": pa.array(images.file_updated_seconds, pa.float64()),
            "predicted_class": predicted,
            **{probability_column(name): probabilities[:, index]
               for index, name in enumerate(self._class_names)},
            "confidence": confidence,
            "decision": decision,
            **{name: pa.array([value] * count, pa.string()) for name, value in self._constants.items()},
            "scored_at": pa.array([utc_now()] * count, pa.timestamp("ms", tz="UTC")),
        }
        if self._top_k:
            columns["top_classes"], columns["top_probabilities"] = top_k_columns(
                probabilities, self._class_names, self._top_k)
        if self._scope_threshold is not None:
            if scored.scope_score is None:
                raise ModelContractError("the model gave no scope_score, though its metadata "
                                         "describes an out-of-scope detector")
            columns["scope_score"] = scored.scope_score.astype(np.float64)
            flagged = columns["scope_score"] > self._scope_threshold
            columns["decision"] = pc.if_else(pa.array(flagged), OUT_OF_SCOPE, decision)
            uncertain &= ~flagged
            self._out_of_scope.inc(int(flagged.sum()))
        self._scored.inc(count)
        self._uncertain.inc(int(uncertain.sum()))
        yield pa.Table.from_arrays([columns[name] for name in self._schema.names], schema=self._schema)


class ScoreImages(beam.PTransform):
    """``ImageBatch`` in; one predictions ``pyarrow.Table`` per batch out."""

    def __init__(self, model_dir: str, metadata: ModelMetadata, *, min_confidence: float,
                 run_id: str, share_model_across_processes: bool = False, runtime: str = "auto",
                 threads: ThreadBudget | None = None,
                 tflite_invoke_batch: int = LITERT_INVOKE_BATCH, top_k: int = 0,
                 scope_threshold: float | None = None):
        super().__init__()
        self._handler = ExportedModelHandler(
            model_dir, metadata, share_across_processes=share_model_across_processes,
            runtime=runtime, threads=threads,
            tflite_invoke_batch=tflite_invoke_batch).with_no_batching()
        self._to_table = ToPredictionTableFn(metadata, min_confidence, run_id, top_k, scope_threshold)

    def expand(self, batches):
        return (batches
                | "RunInference" >> RunInference(self._handler)
                | "ToPredictionTable" >> beam.ParDo(self._to_table))
