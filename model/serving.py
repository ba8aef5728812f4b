"""Load an exported model for scoring and prove it still honours its metadata.

Scoring loads the SavedModel's ``serving_default`` signature with ``tf.saved_model.load``: it
needs no Keras and executes no deserialised Python (unlike a pickled or Lambda-layer model).
A SavedModel is still a program: load only models from a location you trust (see README).
"""

from __future__ import annotations

import logging

import numpy as np

from model.metadata import SAVED_MODEL_DIR, ModelContractError, ModelMetadata
from model.reference import REFERENCE_TOLERANCE, reference_batch

_LOG = logging.getLogger(__name__)


def configure_devices() -> str:
    """Turn on GPU memory growth (so co-located processes can share a GPU); say what runs."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised in this process: growth was set then
            pass
    return f"GPU x{len(gpus)}" if gpus else "CPU"


class ServingModel:
    """A loaded SavedModel signature: ``predict(uint8 batch) -> probabilities``."""

    def __init__(self, model_dir: str, metadata: ModelMetadata):
        import tensorflow as tf

        self.device = configure_devices()
        self.metadata = metadata
        path = model_dir.rstrip("/") + "/" + SAVED_MODEL_DIR
        try:
            loaded = tf.saved_model.load(path)
        except (OSError, ValueError) as exc:
            raise ModelContractError(f"cannot load SavedModel at {path}: {exc}") from exc
        self._loaded = loaded  # keeps the variables alive
        signature = loaded.signatures.get("serving_default")
        if signature is None:
            raise ModelContractError(f"{path} has no serving_default signature")
        _, inputs = signature.structured_input_signature
        spec = inputs.get(metadata.signature_input)
        expected = [None, metadata.height, metadata.width, 3]
        if spec is None or spec.dtype != tf.uint8 or spec.shape.as_list() != expected:
            raise ModelContractError(
                f"{path}: signature input {metadata.signature_input!r} is {spec}, but the "
                f"metadata promises uint8 {expected}"
            )
        outputs = signature.structured_outputs
        if metadata.signature_output not in outputs:
            raise ModelContractError(f"{path}: signature has no output {metadata.signature_output!r}")
        if outputs[metadata.signature_output].shape.as_list()[-1] != len(metadata.class_names):
            raise ModelContractError(
                f"{path}: the model outputs {outputs[metadata.signature_output].shape[-1]} classes, "
                f"the metadata names {len(metadata.class_names)}: {metadata.class_names}"
            )
        self._signature = signature

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities, shape (batch, classes), for a uint8 batch (batch, height, width, 3)."""
        result = self._signature(**{self.metadata.signature_input: images})
        return result[self.metadata.signature_output].numpy()

    def check_reference_predictions(self) -> float:
        """Re-predict the metadata's reference images; return the largest absolute difference."""
        refs = self.metadata.reference_predictions
        if not refs:
            return 0.0
        seeds = [ref["seed"] for ref in refs]
        got = self.predict(reference_batch(self.metadata.height, self.metadata.width, seeds))
        want = np.array([ref["probabilities"] for ref in refs], dtype=np.float64)
        worst = float(np.max(np.abs(got - want)))
        if worst > REFERENCE_TOLERANCE:
            raise ModelContractError(
                f"reference predictions differ from metadata by {worst:.2e} "
                f"(> {REFERENCE_TOLERANCE}): the model or its preprocessing changed since export"
            )
        _LOG.info("reference predictions match metadata (max abs diff %.2e) on %s", worst, self.device)
        return worst
