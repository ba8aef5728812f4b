"""The out-of-scope detector fitted at export: a second output, ``scope_score``, inside the model.

A cat-versus-dog classifier calls a sofa "dog"; its own confidence separates such images poorly.
A distance in the model's own features does better without any second model: the score is the
cosine distance from an image's features (the input of the classifier's final ``Dense`` layer) to
its ``k``-th nearest neighbour among the features of in-scope training images
(``model.architecture.KnnCosineDistance``). ``bench/out_of_scope.py`` measured it against the
classifier's confidence, energy and class-conditional Mahalanobis distances on real photos
(docs/out-of-scope.md). The threshold is set on held-out in-scope images (the validation split)
so that a stated share of them (``DEFAULT_SHARE``) is flagged, and ``metadata.json`` records the
method, its parameters, the threshold and the held-out figures (``out_of_scope``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from model.architecture import KnnCosineDistance, final_dense_layer, probabilities_only
from model.data import IMAGE_SUFFIXES, readable_batches
from model.metrics import flagged_share, threshold_for_share
from model.quantize import calibration_sample
from serving.metadata import KERAS_FILE, SCOPE_METHODS, SCOPE_SCORE, ModelMetadata

_LOG = logging.getLogger(__name__)
DEFAULT_SHARE = 0.01
# Sun et al. scale k with the bank (50 for CIFAR-10's 50,000 training images, 10 for 1% of
# ImageNet's). On the real alpha 0.25 model (1,280 training photos), k from 1 to 20 were within
# noise of each other, AUROC 0.9913-0.9926 against real out-of-scope photos; 5 the highest
# (bench/out_of_scope.py, docs/out-of-scope.md).
DEFAULT_K = 5
# The bank is a [features, images] matrix inside the model: 2,000 images of 256 features (the
# alpha 0.25 MobileNet) are 2 MB and 0.5 M multiply-adds per image, 1.2% of the network's 41 M;
# of MobileNetV2's 1,280, 10 MB and 2.6 M (under 1% of its 300 M).
MAX_BANK_IMAGES = 2000
FEATURE_BATCH = 64


@dataclasses.dataclass(frozen=True)
class ScopeRequest:
    """What fitting a detector needs: in-scope images to measure distances to (the training
    split; a seeded sample of ``max_bank`` when there are more), held-out in-scope images to set
    the threshold on (the validation split), and the share of those the threshold flags."""

    fit_paths: Sequence[str]
    held_out_paths: Sequence[str]
    fit_source: str
    held_out_source: str
    share: float = DEFAULT_SHARE
    k: int = DEFAULT_K
    max_bank: int = MAX_BANK_IMAGES
    seed: int = 0

    def __post_init__(self):
        """Refuses, before any work, what cannot be fitted."""
        if not 0.0 <= self.share < 1.0:
            raise ValueError(f"--out-of-scope-share must be in [0, 1), got {self.share}")
        if self.max_bank < 1:
            raise ValueError(f"--out-of-scope-bank must be at least 1, got {self.max_bank}")
        if not 1 <= self.k <= min(len(self.fit_paths), self.max_bank):
            raise ValueError(f"--out-of-scope-k must be in [1, {min(len(self.fit_paths), self.max_bank)}] "
                             f"(the in-scope images to fit on), got {self.k}")
        if not self.held_out_paths:
            raise ValueError("the out-of-scope threshold needs held-out in-scope images, got none")


def add_arguments(parser) -> None:
    """The detector's flags, shared by ``model.train`` and ``model.package``."""
    parser.add_argument("--out-of-scope", choices=[*SCOPE_METHODS, "none"], default=SCOPE_METHODS[0],
                        help="Out-of-scope detector fitted at export on the model's own features "
                             "(a second output, scope_score, in every float artefact): "
                             f"{SCOPE_METHODS[0]} (default) = cosine distance to the k-th nearest "
                             "in-scope training image; none = no detector (scoring as before it).")
    parser.add_argument("--out-of-scope-share", type=float, default=DEFAULT_SHARE,
                        help="Share of held-out in-scope images the threshold flags "
                             f"(default {DEFAULT_SHARE:g}).")
    parser.add_argument("--out-of-scope-k", type=int, default=DEFAULT_K,
                        help=f"k of the k-nearest-neighbour distance (default {DEFAULT_K}).")
    parser.add_argument("--out-of-scope-bank", type=int, default=MAX_BANK_IMAGES,
                        help=f"Most in-scope images the model keeps features of (default "
                             f"{MAX_BANK_IMAGES}; a seeded sample when there are more). Smaller "
                             "costs less per image: on the real alpha 0.25 model 500 instead of "
                             "1,280 took its cost from 4%% of the network's CPU time to 0-2%%, "
                             "at AUROC 0.991 instead of 0.993 (docs/out-of-scope.md).")


def split_for_detector(paths: Sequence[str], seed: int,
                       held_out_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """(fit, held-out): a seeded split of in-scope images when no training split exists (a
    packaged model): ``held_out_fraction`` of them, at least one, set the threshold."""
    order = np.random.default_rng(seed).permutation(len(paths))
    cut = max(1, int(round(len(paths) * held_out_fraction)))
    return [paths[i] for i in sorted(order[cut:])], [paths[i] for i in sorted(order[:cut])]


def image_paths(root: str) -> list[str]:
    """Every image file under ``root`` (any depth, by suffix), sorted; other files are ignored."""
    found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root)
                   for name in names if name.lower().endswith(IMAGE_SUFFIXES))
    if not found:
        raise ValueError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def load_classifier(model_dir: str) -> keras.Model:
    """The exported ``model.keras`` (``safe_mode=True``) as a probabilities-only model: for a
    model with a detector, its ``probabilities`` output alone."""
    return probabilities_only(keras.saving.load_model(os.path.join(model_dir, KERAS_FILE), safe_mode=True))


def feature_model(classifier: keras.Model) -> keras.Model | None:
    """float pixels [batch, h, w, 3] -> the features the classifier's final ``Dense`` layer
    reads, float32 [batch, dim]; None when the classifier does not end in a top-level ``Dense``
    layer (``model.architecture.final_dense_layer``)."""
    head = final_dense_layer(classifier)
    if head is None or len(head.input.shape) != 2:
        return None
    return keras.Model(classifier.inputs, head.input)


def model_features(classifier: keras.Model, paths: Sequence[str], metadata: ModelMetadata,
                   ) -> tuple[list[int], np.ndarray]:
    """(indices of the readable ``paths``, their features float32 [n, dim]), each image read
    through the model's own preprocessing. Raises ``ValueError`` when the classifier has no
    final ``Dense`` layer or none of the images can be read."""
    features_of = feature_model(classifier)
    if features_of is None:
        raise ValueError(f"{classifier.name} does not end in a Dense layer: no features to measure")
    kept, rows = [], []
    for indices, pixels in readable_batches(paths, metadata, FEATURE_BATCH, "out-of-scope detector"):
        rows.append(np.asarray(features_of.predict_on_batch(pixels.astype(np.float32)), np.float32))
        kept.extend(indices)
    if not kept:
        raise ValueError("out-of-scope detector: none of the images could be read")
    return kept, np.concatenate(rows)


def knn_bank(features: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded sample of up to ``size`` rows of ``features`` [n, dim], each divided by its L2
    norm, as the [dim, size] float32 bank ``KnnCosineDistance`` multiplies by."""
    rows = np.random.default_rng(seed).permutation(len(features))[:size]
    chosen = np.asarray(features, np.float64)[np.sort(rows)]
    unit = chosen / np.maximum(np.linalg.norm(chosen, axis=1, keepdims=True), 1e-7)
    return unit.T.astype(np.float32)


def attach_detector(classifier: keras.Model, request: ScopeRequest, metadata: ModelMetadata,
                    ) -> tuple[keras.Model, dict[str, Any] | None]:
    """``(model, entry)``: the classifier with a second output ``scope_score`` (float32 [batch])
    beside ``probabilities``, and its metadata entry without a threshold yet (``set_threshold``
    adds it from the exported model's own scores). A classifier without a final ``Dense`` layer
    is returned as it is, with None and a log line saying why."""
    features_of = feature_model(classifier)
    if features_of is None:
        _LOG.warning("no out-of-scope detector: %s does not end in a Dense layer whose input could "
                     "serve as features; the model scores without scope_score", classifier.name)
        return classifier, None
    fit_paths = calibration_sample(request.fit_paths, request.seed, request.max_bank)
    _, features = model_features(classifier, fit_paths, metadata)
    if len(features) < request.k:
        raise ValueError(f"out-of-scope detector: {len(features)} readable images to fit on, "
                         f"fewer than k={request.k}")
    bank = knn_bank(features, len(features), request.seed)
    scorer = KnnCosineDistance(bank.shape[1], request.k, name=SCOPE_SCORE)
    head = final_dense_layer(classifier)
    scores = scorer(head.input)
    scorer.bank.assign(bank)
    model = keras.Model(classifier.inputs, {"probabilities": classifier.output, SCOPE_SCORE: scores},
                        name=classifier.name)
    entry = {"method": SCOPE_METHODS[0], "k": request.k, "bank_images": int(bank.shape[1]),
             "features": f"input of the final Dense layer {head.name!r} ({bank.shape[0]} values)",
             "output": SCOPE_SCORE, "fit": {"source": request.fit_source, "images": int(bank.shape[1])}}
    return model, entry


def set_threshold(entry: dict[str, Any], held_out_scores: np.ndarray,
                  request: ScopeRequest) -> dict[str, Any]:
    """``entry`` with the threshold that flags at most ``request.share`` of the held-out in-scope
    images' scores (``model.metrics.threshold_for_share``) and what it does on them."""
    scores = np.asarray(held_out_scores, np.float64)
    threshold = threshold_for_share(scores, request.share)
    quantiles = {f"p{q}": round(float(np.quantile(scores, q / 100)), 6) for q in (50, 90, 99)}
    return {**entry, "threshold": threshold, "share": request.share,
            "held_out": {"source": request.held_out_source, "images": len(scores),
                         "flagged": round(flagged_share(scores, threshold), 6),
                         **quantiles, "max": round(float(scores.max()), 6)}}


def describe(entry: dict[str, Any]) -> str:
    """One line for the commands' output: the detector and what its threshold does held out."""
    held_out = entry["held_out"]
    return (f"out-of-scope detector: {entry['method']} k={entry['k']} over {entry['bank_images']} "
            f"{entry['fit']['source']} images, threshold {entry['threshold']:.4f} flags "
            f"{held_out['flagged']:.2%} of {held_out['images']} {held_out['source']} images "
            f"(asked: at most {entry['share']:.2%})")
