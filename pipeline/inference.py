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
from apache_beam.utils import shared

from pipeline.decode import ImageBatch
from pipeline.options import ThreadBudget
from pipeline.rows import (
    HUMAN,
    METRICS_NAMESPACE,
    OUT_OF_SCOPE,
    UNCERTAIN,
    image_id,
    prediction_schema,
    probability_column,
    top_k_columns,
    utc_now,
)
from serving.faces import FaceDetector
from serving.metadata import ModelContractError, ModelMetadata
from serving.runtimes import LITERT_INVOKE_BATCH, Outputs, ServingModel

_LOG = logging.getLogger(__name__)
PREDICTIONS, CHALLENGER, PAIRS = "predictions", "challenger", "pairs"  # ScoreImages' outputs

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
    ``images.paths[i]``. The pixels are dropped (only what the rows need travels on) unless the
    human faces are still to be counted in them (``--faces``). With a
    challenger, ``challenger`` holds its scores of the same batch (less the images its own
    decoding refused, ``ImageBatch.for_challenger``)."""

    images: ImageBatch
    probabilities: np.ndarray
    scope_score: np.ndarray | None = None
    challenger: ScoredBatch | None = None


class ExportedModelHandler(ModelHandler[ImageBatch, ScoredBatch, ServingModel]):
    """An ``ImageBatch`` -> its ``ScoredBatch``, via ``serving.runtimes`` (SavedModel, LiteRT or
    Keras runtime, see there), each image scored as ``tta`` says (``serving.tta.TTA_MODES``).
    Use it ``with_no_batching()``: each element is a whole batch."""

    def __init__(self, model_dir: str, metadata: ModelMetadata, *,
                 share_across_processes: bool = False, runtime: str = "auto",
                 threads: ThreadBudget | None = None, tflite_invoke_batch: int = LITERT_INVOKE_BATCH,
                 tta: str = "none", keep_pixels: bool = False):
        super().__init__(large_model=share_across_processes)
        self._model_dir = model_dir
        self._metadata = metadata
        self._runtime = runtime
        self._threads = threads or ThreadBudget()
        self._tflite_invoke_batch = tflite_invoke_batch
        self.tta = tta
        self.keep_pixels = keep_pixels  # the batch's pixels travel on in its ScoredBatch (faces)

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
        outputs = model.predict_outputs(batch.pixels, tta=self.tta)  # both outputs, one call per view
        return [ScoredBatch(batch if self.keep_pixels else batch.without_pixels(), *outputs)]

    def get_num_bytes(self, batch: ImageBatch) -> int:
        return batch.pixels.nbytes

    def get_metrics_namespace(self) -> str:
        return "petscore_inference"


class ModelPair:
    """The champion and the challenger of a night, loaded together: one object, so that a worker
    process (or machine, ``--share-model-across-processes``) holds both and a shared proxy of it
    forwards one call per batch."""

    def __init__(self, champion: ServingModel, challenger: ServingModel):
        self.champion = champion
        self.challenger = challenger

    def predict_outputs(self, pixels: np.ndarray, challenger_pixels: np.ndarray,
                        tta: str = "none") -> tuple[Outputs, Outputs]:
        """Each model's ``Outputs`` for its uint8 batch [n, height, width, 3] (the same array
        where the two decode alike), both scored as ``tta`` says."""
        return (self.champion.predict_outputs(pixels, tta=tta),
                self.challenger.predict_outputs(challenger_pixels, tta=tta))


class ChallengedModelHandler(ModelHandler[ImageBatch, ScoredBatch, ModelPair]):
    """An ``ImageBatch`` -> its ``ScoredBatch`` by the champion, carrying the challenger's scores
    of the same batch: one RunInference step, one element, both models (``--challenger-model``).
    Each model loads and checks its reference predictions as ``ExportedModelHandler`` does."""

    def __init__(self, champion: ExportedModelHandler, challenger: ExportedModelHandler):
        super().__init__(large_model=champion.share_model_across_processes())
        self._champion = champion
        self._challenger = challenger

    def load_model(self) -> ModelPair:
        return ModelPair(self._champion.load_model(), self._challenger.load_model())

    def run_inference(self, batch: ImageBatch, model: ModelPair,
                      inference_args: dict[str, Any] | None = None) -> list[ScoredBatch]:
        theirs = batch.for_challenger()
        ours, challenger = model.predict_outputs(batch.pixels, theirs.pixels, tta=self._champion.tta)
        return [ScoredBatch(batch if self._champion.keep_pixels else batch.without_pixels(), *ours,
                            challenger=ScoredBatch(theirs.without_pixels(), *challenger))]

    def get_num_bytes(self, batch: ImageBatch) -> int:
        return batch.pixels.nbytes + (batch.challenger_pixels.pixels.nbytes if batch.challenger_pixels else 0)

    def get_metrics_namespace(self) -> str:
        return "petscore_inference"


@dataclasses.dataclass(frozen=True)
class RowSettings:
    """How one model's scores become prediction rows: its classes, version and hash, the
    ``uncertain`` cut (``min_confidence``), the ``top_k`` classes kept (0: none), the
    out-of-scope threshold (None: no detector in use), how the images were scored (``tta``) and
    which images' human faces are counted (``faces``: ``pipeline.options.FACES_MODES``)."""

    metadata: ModelMetadata
    min_confidence: float
    run_id: str
    top_k: int = 0
    scope_threshold: float | None = None
    tta: str = "none"
    faces: str = "off"


def not_confident(scored: ScoredBatch, settings: RowSettings) -> np.ndarray:
    """bool [n]: the images whose decision is not one of the model's classes, ``uncertain``
    (top probability below ``min_confidence``) or ``out_of_scope`` (the detector's score above
    its threshold): those a face makes ``human`` (``prediction_table``)."""
    unsure = np.max(scored.probabilities, axis=1).astype(np.float64) < settings.min_confidence
    if settings.scope_threshold is not None and scored.scope_score is not None:
        unsure |= scored.scope_score.astype(np.float64) > settings.scope_threshold
    return unsure


def prediction_table(scored: ScoredBatch, settings: RowSettings,
                     human_faces: np.ndarray | None = None) -> tuple[pa.Table, dict[str, int]]:
    """A ``ScoredBatch`` -> ``(one table of the predictions schema, {'scored', 'uncertain',
    'out_of_scope', 'human'} counts of decisions)``, built column by column: the class with the
    highest probability (the first on a tie, as ``np.argmax``), ``uncertain`` below
    ``min_confidence``, the ``top_k`` classes when asked. With a ``scope_threshold`` (the model's
    detector in use), each row's ``scope_score`` too, and the decision ``out_of_scope`` where it
    is above the threshold, whatever the confidence. With ``faces`` on, each row's
    ``human_faces`` (int64 [n], -1 where they were not counted: null) and, in the seed app's
    order (the model's classes, then a human, then neither), the decision ``human`` for an image
    with a face whose decision is not a class (``not_confident``). Every row says its ``tta``.
    Columns the run does not compute are null."""
    metadata, images, count = settings.metadata, scored.images, len(scored.images)
    class_names = list(metadata.class_names)
    probabilities = scored.probabilities.astype(np.float64)
    best = np.argmax(probabilities, axis=1)
    confidence = probabilities[np.arange(count), best]
    predicted = pa.array(class_names, pa.string()).take(pa.array(best))
    uncertain = confidence < settings.min_confidence
    decision = pc.if_else(pa.array(uncertain), UNCERTAIN, predicted)
    constants = {"model_version": metadata.model_version, "model_sha256": metadata.sha256,
                 "run_id": settings.run_id}
    columns = {
        "path": pa.array(images.paths, pa.string()),
        "image_id": pa.array([image_id(path) for path in images.paths], pa.int64()),
        "content_sha256": pa.array(images.content_sha256, pa.string()),
        "file_bytes": pa.array(images.file_bytes, pa.int64()),
        "file_updated_seconds": pa.array(images.file_updated_seconds, pa.float64()),
        "predicted_class": predicted,
        **{probability_column(name): probabilities[:, index] for index, name in enumerate(class_names)},
        "confidence": confidence,
        "decision": decision,
        **{name: pa.array([value] * count, pa.string()) for name, value in constants.items()},
        "scored_at": pa.array([utc_now()] * count, pa.timestamp("ms", tz="UTC")),
        "tta": pa.array([settings.tta] * count, pa.string()),
    }
    if settings.top_k:
        columns["top_classes"], columns["top_probabilities"] = top_k_columns(
            probabilities, class_names, settings.top_k)
    flagged = np.zeros(count, bool)
    if settings.scope_threshold is not None:
        if scored.scope_score is None:
            raise ModelContractError(f"model {metadata.model_version} gave no scope_score, though "
                                     "its metadata describes an out-of-scope detector")
        columns["scope_score"] = scored.scope_score.astype(np.float64)
        flagged = columns["scope_score"] > settings.scope_threshold
        columns["decision"] = pc.if_else(pa.array(flagged), OUT_OF_SCOPE, decision)
        uncertain &= ~flagged
    human = np.zeros(count, bool)
    if settings.faces != "off":
        faces = np.asarray(human_faces, np.int64)
        columns["human_faces"] = pa.array(faces, pa.int64(), mask=faces < 0)
        human = (faces > 0) & (uncertain | flagged)
        columns["decision"] = pc.if_else(pa.array(human), HUMAN, columns["decision"])
        uncertain &= ~human
        flagged &= ~human
    schema = prediction_schema(class_names)
    table = pa.Table.from_arrays(
        [columns[field.name] if field.name in columns else pa.nulls(count, field.type) for field in schema],
        schema=schema)
    return table, {"scored": count, "uncertain": int(uncertain.sum()), "out_of_scope": int(flagged.sum()),
                   "human": int(human.sum())}


def paired_rows(ours: pa.Table, theirs: pa.Table, class_names: list[str]) -> pa.Table:
    """One batch's two prediction tables joined by path, the champion's rows in their order: its
    review columns, then ``challenger_decision``, ``challenger_confidence``,
    ``challenger_prob_<class>`` and ``challenger_scope_score``, null where the challenger's
    decoding refused the image. Both models scored the same batch: no shuffle joins them."""
    compared = ["decision", "confidence", *[probability_column(name) for name in class_names], "scope_score"]
    matched = theirs.select(compared).take(pc.index_in(ours["path"], value_set=theirs["path"]))
    review = ours.select(["path", "predicted_class", *compared])
    return pa.Table.from_arrays([*review.columns, *matched.columns],
                                names=[*review.column_names, *(f"challenger_{name}" for name in compared)])


class ToPredictionTableFn(beam.DoFn):
    """A ``ScoredBatch`` -> one ``pyarrow.Table`` of the predictions schema (``prediction_table``).
    With a ``challenger`` (``RowSettings`` of its model), its table of the same batch on
    ``challenger``, and both joined by path on ``pairs`` (``paired_rows``).

    With ``faces`` (``--faces``), the human faces are counted in the batch's pixels (those the
    model scored, decoded once) by ``serving.faces.FaceDetector``, one per worker process
    (``shared.Shared``, as RunInference shares a model; its LiteRT threads the model's share of
    the cores): ``detect``, in every image; ``unsure``, only in the images that the model, or the
    challenger, does not confidently call one of its classes (``not_confident``: where a face
    changes the decision), the others' counts null."""

    def __init__(self, metadata: ModelMetadata, min_confidence: float, run_id: str, top_k: int = 0,
                 scope_threshold: float | None = None, challenger: RowSettings | None = None,
                 tta: str = "none", faces: str = "off", threads: ThreadBudget | None = None):
        self._settings = RowSettings(metadata, min_confidence, run_id, top_k, scope_threshold, tta, faces)
        self._challenger = challenger
        self._threads = threads or ThreadBudget()
        self._shared = shared.Shared()
        self._detector: FaceDetector | None = None
        self._counters = {name: Metrics.counter(METRICS_NAMESPACE, f"images_{name}")
                          for name in ("scored", "uncertain", "out_of_scope", "human")}
        self._challenger_scored = Metrics.counter(METRICS_NAMESPACE, "images_scored_by_challenger")
        self._face_checked = Metrics.counter(METRICS_NAMESPACE, "images_checked_for_faces")

    def setup(self):
        if self._settings.faces != "off":
            threads = self._threads.resolve()[1]
            self._detector = self._shared.acquire(lambda: FaceDetector(threads))

    def human_faces(self, scored: ScoredBatch) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The faces of each of the model's rows and of the challenger's (int64, -1 where not
        counted), counted once per image in the model's pixels; (None, None) with faces off."""
        if self._detector is None:
            return None, None
        wanted = (np.ones(len(scored.images), bool) if self._settings.faces == "detect"
                  else not_confident(scored, self._settings))
        theirs = None
        if scored.challenger is not None:  # their rows: ours, less the images their decoding refused
            row_of = {path: row for row, path in enumerate(scored.images.paths)}
            theirs = np.array([row_of[path] for path in scored.challenger.images.paths], np.int64)
            if self._settings.faces != "detect":
                wanted[theirs[not_confident(scored.challenger, self._challenger)]] = True
        faces = np.full(len(scored.images), -1, np.int64)
        if wanted.any():
            faces[wanted] = self._detector.count(scored.images.pixels[wanted])
            self._face_checked.inc(int(wanted.sum()))
        return faces, None if theirs is None else faces[theirs]

    def process(self, scored: ScoredBatch):
        ours, theirs = self.human_faces(scored)
        scored = dataclasses.replace(scored, images=scored.images.without_pixels())
        table, counts = prediction_table(scored, self._settings, ours)
        for name, count in counts.items():
            self._counters[name].inc(count)
        yield table
        if self._challenger is not None:
            their_table, counts = prediction_table(scored.challenger, self._challenger, theirs)
            self._challenger_scored.inc(counts["scored"])
            yield beam.pvalue.TaggedOutput(CHALLENGER, their_table)
            yield beam.pvalue.TaggedOutput(PAIRS, paired_rows(table, their_table,
                                                              self._settings.metadata.class_names))


@dataclasses.dataclass(frozen=True)
class ChallengerModel:
    """A challenger to score beside the model (``--challenger-model``): its directory, contract
    and out-of-scope threshold (None: no detector in use)."""

    model_dir: str
    metadata: ModelMetadata
    scope_threshold: float | None = None


class ScoreImages(beam.PTransform):
    """``ImageBatch`` in; ``{'predictions': one predictions table per batch}`` out and, with a
    ``challenger``, ``'challenger'``: its table of each batch, ``'pairs'``: both joined by path.
    Without one, the other two are empty. Both models score each image as ``tta`` says; with
    ``faces`` on, the human faces counted in the model's pixels (``ToPredictionTableFn``) go
    into both models' rows and decisions."""

    def __init__(self, model_dir: str, metadata: ModelMetadata, *, min_confidence: float,
                 run_id: str, share_model_across_processes: bool = False, runtime: str = "auto",
                 threads: ThreadBudget | None = None,
                 tflite_invoke_batch: int = LITERT_INVOKE_BATCH, top_k: int = 0,
                 scope_threshold: float | None = None, challenger: ChallengerModel | None = None,
                 tta: str = "none", faces: str = "off"):
        super().__init__()
        def handler(directory, contract):
            return ExportedModelHandler(
                directory, contract, share_across_processes=share_model_across_processes,
                runtime=runtime, threads=threads, tflite_invoke_batch=tflite_invoke_batch, tta=tta,
                keep_pixels=faces != "off")

        champion = handler(model_dir, metadata)
        theirs = None
        if challenger is not None:
            champion = ChallengedModelHandler(champion,
                                              handler(challenger.model_dir, challenger.metadata))
            theirs = RowSettings(challenger.metadata, min_confidence, run_id, top_k,
                                 challenger.scope_threshold, tta, faces)
        self._handler = champion.with_no_batching()
        self._to_table = ToPredictionTableFn(metadata, min_confidence, run_id, top_k, scope_threshold,
                                             theirs, tta, faces, threads)

    def expand(self, batches):
        return (batches
                | "RunInference" >> RunInference(self._handler)
                | "ToPredictionTable" >> beam.ParDo(self._to_table).with_outputs(
                    CHALLENGER, PAIRS, main=PREDICTIONS))
