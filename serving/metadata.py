"""The model contract: ``metadata.json`` beside an exported model, read and checked by scorers.

An exported model directory looks like::

    MODEL_DIR/
      saved_model/     TF SavedModel; signature ``serving_default``: uint8 images -> probabilities
                       (and ``scope_score`` when the model has an out-of-scope detector)
      model.keras      the Keras model: fine-tuning, evaluation, and scoring on any Keras backend
                       (--runtime keras); absent where a model wraps another SavedModel
      model.tflite     optional: the same model for LiteRT (fast CPU scoring), checked at export
      model_int8.tflite  optional, opt-in: a full-integer model, kept only if it passed its
                       validation (see ``model.quantize``); scored only with --runtime tflite-int8
      metadata.json    this contract

Paths go through Beam's filesystems so a model directory can live on ``gs://`` as well as disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator
from typing import Any

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from serving.preprocessing import PREPROCESSING_VERSIONS

METADATA_FILE = "metadata.json"
SAVED_MODEL_DIR = "saved_model"
KERAS_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
INT8_TFLITE_FILE = "model_int8.tflite"
FORMAT_VERSION = 1
# The out-of-scope detector's output (float32 [batch], higher = further from the training images)
# and the methods this scorer knows (``model.out_of_scope``).
SCOPE_SCORE = "scope_score"
SCOPE_METHODS = ("knn-cosine",)
# How a model's probabilities may have been calibrated at export (``model.calibration``).
CALIBRATION_METHODS = ("temperature",)


class ModelContractError(ValueError):
    """The model directory does not honour the contract; raised before any work is done."""


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    """What a scorer must know about a model, as written to ``metadata.json``."""

    model_version: str
    class_names: list[str]
    input_size: list[int]  # [height, width]
    resize_method: str
    preprocessing: str
    base: str
    base_weights: str
    sha256: str
    signature_input: str = "images"
    signature_output: str = "probabilities"
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    reference_predictions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    created_at: str = ""
    # {"sha256": ..., "max_abs_diff_vs_saved_model": ...} when model.tflite was exported
    tflite: dict[str, Any] | None = None
    # {"sha256": ...} of model.keras when the export wrote one (exports before it record none)
    keras: dict[str, Any] | None = None
    # model.quantize's verdict when an integer model was asked for: {"kept": ..., "sha256": ...,
    # "calibration", "validation", "reference_predictions", "reference_tolerance" or "reason"}
    tflite_int8: dict[str, Any] | None = None
    # The out-of-scope detector inside the model (``model.out_of_scope``), None for models without
    # one (every model exported before it): {"method", "k", "bank_images", "features", "output",
    # "fit", "threshold", "share", "held_out"}; flag an image when its score is above "threshold".
    out_of_scope: dict[str, Any] | None = None
    # The temperature fitted at export (``model.calibration``), None when none was fitted (every
    # model exported before it, ``--no-calibration``, a package without calibration images):
    # {"method": "temperature", "applied", "temperature", "layer", "fit", "held_out"[, "reason"]}.
    # When "applied", the model's probabilities are already calibrated by that temperature (its
    # last layer); scorers need nothing of it, evaluation uses it to show the model before.
    calibration: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = METADATA_FILE) -> ModelMetadata:
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelContractError(f"{source} is not valid JSON: {exc}") from exc
        if not isinstance(fields, dict):
            raise ModelContractError(f"{source} must hold a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - fields.keys())
        if missing:
            raise ModelContractError(f"{source} lacks required fields: {', '.join(missing)}")
        metadata = cls(**{k: v for k, v in fields.items() if k in known})
        metadata.validate(source)
        return metadata

    def validate(self, source: str = METADATA_FILE) -> None:
        """Check internal consistency and that this scorer supports what the model needs."""
        problems = []
        if self.format_version != FORMAT_VERSION:
            problems.append(f"format_version {self.format_version} is not {FORMAT_VERSION}")
        if (not isinstance(self.class_names, list) or len(self.class_names) < 2
                or len(set(self.class_names)) != len(self.class_names)):
            problems.append(f"class_names must list at least two distinct names, got {self.class_names!r}")
        if (not isinstance(self.input_size, list) or len(self.input_size) != 2
                or not all(isinstance(v, int) and v >= 8 for v in self.input_size)):
            problems.append(f"input_size must be [height, width] of ints >= 8, got {self.input_size!r}")
        methods = PREPROCESSING_VERSIONS.get(self.preprocessing)
        if methods is None:
            problems.append(f"preprocessing {self.preprocessing!r} is none of this scorer's "
                            f"{sorted(PREPROCESSING_VERSIONS)} (training/serving skew)")
        elif self.resize_method not in methods:
            problems.append(f"resize_method {self.resize_method!r} is not one of {sorted(methods)} "
                            f"for {self.preprocessing}")
        if not self.model_version:
            problems.append("model_version is empty")
        problems.extend(self._scope_problems())
        problems.extend(self._calibration_problems())
        int8_references = (self.tflite_int8 or {}).get("reference_predictions", [])
        for ref in [*self.reference_predictions, *int8_references]:
            if len(ref.get("probabilities", [])) != len(self.class_names):
                problems.append(f"reference prediction {ref!r} does not have one probability per class")
                break
        if problems:
            raise ModelContractError(f"{source} is inconsistent: " + "; ".join(problems))

    def _scope_problems(self) -> list[str]:
        scope = self.out_of_scope
        if scope is None:
            return []
        if unknown := _unknown_method("out_of_scope", scope, SCOPE_METHODS):
            return [unknown]
        problems = []
        threshold = scope.get("threshold")
        if not _finite_number(threshold):
            problems.append(f"out_of_scope.threshold must be a finite number, got {threshold!r}")
        if scope.get("output") != SCOPE_SCORE:
            problems.append(f"out_of_scope.output must be {SCOPE_SCORE!r}, got {scope.get('output')!r}")
        if any(not isinstance(ref.get(SCOPE_SCORE), (int, float)) for ref in self.reference_predictions):
            problems.append(f"every reference prediction needs a {SCOPE_SCORE} when the model has an "
                            "out-of-scope detector")
        return problems

    def _calibration_problems(self) -> list[str]:
        entry = self.calibration
        if entry is None:
            return []
        if unknown := _unknown_method("calibration", entry, CALIBRATION_METHODS):
            return [unknown]
        if not isinstance(entry.get("applied"), bool):
            return [f"calibration.applied must be true or false, got {entry.get('applied')!r}"]
        temperature = entry.get("temperature")
        if entry["applied"] and not (_finite_number(temperature) and temperature > 0):
            return [f"calibration.temperature must be a finite number above 0, got {temperature!r}"]
        return []

    @property
    def temperature(self) -> float | None:
        """The temperature inside the model (its probabilities are calibrated by it), or None."""
        return self.calibration["temperature"] if self.calibration and self.calibration["applied"] else None

    @property
    def has_scope_detector(self) -> bool:
        """Whether the model computes ``scope_score`` (a second output) with a threshold."""
        return self.out_of_scope is not None

    @property
    def int8_kept(self) -> bool:
        return bool(self.tflite_int8 and self.tflite_int8.get("kept"))

    @property
    def height(self) -> int:
        return self.input_size[0]

    @property
    def width(self) -> int:
        return self.input_size[1]


def _unknown_method(field: str, entry: Any, methods: tuple[str, ...]) -> str | None:
    """Why ``entry`` (the metadata's ``field``) is not a dict naming one of ``methods``, or None."""
    if isinstance(entry, dict) and entry.get("method") in methods:
        return None
    return f"{field}.method {(entry or {}).get('method')!r} is none of this scorer's {list(methods)}"


def _finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def read_metadata(model_dir: str) -> ModelMetadata:
    """Read and validate ``metadata.json``; a missing file is a ``ModelContractError``."""
    path = FileSystems.join(model_dir, METADATA_FILE)
    if not FileSystems.exists(path):
        raise ModelContractError(
            f"{path} not found: a model directory needs metadata.json beside saved_model/ "
            "(export models with `python -m model.train`, or bring a Keras model in with "
            "`python -m model.package`)"
        )
    with FileSystems.open(path) as handle:
        return ModelMetadata.from_json(handle.read().decode("utf-8"), source=path)


def write_metadata(model_dir: str, metadata: ModelMetadata) -> None:
    with FileSystems.create(FileSystems.join(model_dir, METADATA_FILE)) as handle:
        handle.write(metadata.to_json().encode("utf-8"))


def file_chunks(path: str, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """A file's bytes in chunks, through any Beam filesystem, never decompressed because of its
    name; chunked so that neither a hash nor a size cap needs the whole file in one buffer."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        yield from iter(lambda: handle.read(chunk_bytes), b"")


def _hash_file_into(digest, path: str) -> None:
    for chunk in file_chunks(path):
        digest.update(chunk)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    _hash_file_into(digest, path)
    return digest.hexdigest()


def saved_model_sha256(model_dir: str) -> str:
    """SHA-256 over every file of ``saved_model/`` (relative path and bytes, in sorted order)."""
    root = FileSystems.join(model_dir, SAVED_MODEL_DIR)
    pattern = FileSystems.join(root, "**")
    files = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    if not files:
        raise ModelContractError(f"{root} holds no files: the SavedModel is missing")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path[len(root):].lstrip("/").encode("utf-8"))
        _hash_file_into(digest, path)
    return digest.hexdigest()
