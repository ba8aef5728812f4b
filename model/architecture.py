"""The classifier: a frozen ImageNet base, global average pooling, a dropout + softmax head.

The model takes float pixels in [0, 255] (the serving signature casts uint8) and does the base's
own input scaling inside, so no scorer can apply the wrong preprocessing. Augmentation layers
sit in the model too; Keras runs them only when ``training=True``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
from keras import layers

IMAGENET_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="petscore")
class CaffePreprocess(layers.Layer):
    """ResNet50's 'caffe' preprocessing: RGB -> BGR, minus the ImageNet channel means.

    A named layer instead of a ``Lambda`` so the ``.keras`` file loads with ``safe_mode=True``.
    """

    def call(self, inputs):
        bgr = keras.ops.flip(inputs, axis=-1)
        return bgr - keras.ops.convert_to_tensor(IMAGENET_CAFFE_MEAN_BGR, dtype=inputs.dtype)


@dataclasses.dataclass(frozen=True)
class BaseSpec:
    """How to build one ImageNet base and what its input scaling is."""

    constructor: Callable[..., keras.Model]
    input_scaling: Callable[[], layers.Layer | None]
    takes_alpha: bool = False


BASES: dict[str, BaseSpec] = {
    "mobilenet_v2": BaseSpec(keras.applications.MobileNetV2,
                             lambda: layers.Rescaling(1 / 127.5, offset=-1, name="scale_to_pm1"),
                             takes_alpha=True),
    # MobileNet v1 is here because its small official weights file works offline.
    "mobilenet": BaseSpec(keras.applications.MobileNet,
                          lambda: layers.Rescaling(1 / 127.5, offset=-1, name="scale_to_pm1"),
                          takes_alpha=True),
    "resnet50": BaseSpec(keras.applications.ResNet50, lambda: CaffePreprocess(name="caffe_preprocess")),
    # EfficientNet rescales inside the application model itself.
    "efficientnet_b0": BaseSpec(keras.applications.EfficientNetB0, lambda: None),
}


def build_classifier(
    base: str,
    input_size: tuple[int, int],
    num_classes: int,
    base_weights: str = "imagenet",
    alpha: float = 1.0,
    dropout: float = 0.2,
    augment: bool = True,
    seed: int = 0,
) -> tuple[keras.Model, keras.Model]:
    """Return ``(classifier, frozen_base)``.

    ``base_weights``: ``imagenet`` (downloads through Keras), ``none`` (random, for tests and
    offline demos) or a path to a local weights file (``include_top=False`` variant).
    """
    if base not in BASES:
        raise ValueError(f"unknown base {base!r}; choose one of {sorted(BASES)}")
    spec = BASES[base]
    kwargs = {"alpha": alpha} if spec.takes_alpha else {}
    weights = {"imagenet": "imagenet", "none": None}.get(base_weights.lower(), None)
    feature_extractor = spec.constructor(
        input_shape=(*input_size, 3), include_top=False, weights=weights, **kwargs
    )
    if base_weights.lower() not in ("imagenet", "none"):
        feature_extractor.load_weights(base_weights)
    feature_extractor.trainable = False

    inputs = keras.Input(shape=(*input_size, 3), dtype="float32", name="pixels")
    x = inputs
    if augment:
        x = layers.RandomFlip("horizontal", seed=seed, name="aug_flip")(x)
        x = layers.RandomRotation(0.1, seed=seed, name="aug_rotate")(x)
        x = layers.RandomZoom(0.1, seed=seed, name="aug_zoom")(x)
        x = layers.RandomTranslation(0.1, 0.1, seed=seed, name="aug_shift")(x)
    scaling = spec.input_scaling()
    if scaling is not None:
        x = scaling(x)
    # training=False keeps BatchNorm statistics frozen even when the top layers are fine-tuned.
    x = feature_extractor(x, training=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, seed=seed, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"petscore_{base}"), feature_extractor


def unfreeze_top_layers(feature_extractor: keras.Model, count: int) -> int:
    """Make the top ``count`` layers of the base trainable (BatchNorm stays frozen)."""
    feature_extractor.trainable = True
    boundary = max(len(feature_extractor.layers) - count, 0)
    unfrozen = 0
    for index, layer in enumerate(feature_extractor.layers):
        trainable = index >= boundary and not isinstance(layer, layers.BatchNormalization)
        layer.trainable = trainable
        unfrozen += trainable
    return unfrozen


def calibrate_batchnorm(base: str, feature_extractor: keras.Model, pixels) -> None:
    """Estimate a randomly initialised base's BatchNorm statistics from a batch of images.

    With ``base_weights='none'`` the BatchNorm layers hold their initial statistics (mean 0,
    variance 1), under which activations shrink layer by layer until the pooled features are
    ~1e-12 and a frozen random base gives the head nothing to learn from. Setting each layer's
    moving mean/variance to what it actually sees (front to back) yields well-scaled random
    features. ImageNet bases never need this. ``pixels``: float images in [0, 255].
    """
    scaling = BASES[base].input_scaling()
    inputs = scaling(pixels) if scaling is not None else pixels
    for layer in feature_extractor.layers:
        if isinstance(layer, layers.BatchNormalization):
            probe = keras.Model(feature_extractor.input, layer.input)
            seen = keras.ops.convert_to_numpy(probe(inputs, training=False))
            axes = tuple(range(seen.ndim - 1))
            layer.moving_mean.assign(seen.mean(axis=axes))
            layer.moving_variance.assign(seen.var(axis=axes))
