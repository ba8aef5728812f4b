"""The classifier: a frozen ImageNet base, global average pooling, a dropout + softmax head.

The model takes float pixels in [0, 255] (the serving signature casts uint8) and does the base's
own input scaling inside, so no scorer can apply the wrong preprocessing. Augmentation layers
sit in the model too; Keras runs them only when ``training=True``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import keras
from keras import layers

IMAGENET_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
IMAGENET_TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_TORCH_STD_RGB = (0.229, 0.224, 0.225)
SMALLEST_NORMAL_FLOAT32 = 1.1754944e-38  # numpy.finfo(numpy.float32).tiny


@keras.saving.register_keras_serializable(package="petscore")
class CaffePreprocess(layers.Layer):
    """ResNet50's 'caffe' preprocessing: RGB -> BGR, minus the ImageNet channel means.

    A named layer instead of a ``Lambda`` so the ``.keras`` file loads with ``safe_mode=True``.
    """

    def call(self, inputs):
        bgr = keras.ops.flip(inputs, axis=-1)
        return bgr - keras.ops.convert_to_tensor(IMAGENET_CAFFE_MEAN_BGR, dtype=inputs.dtype)


@keras.saving.register_keras_serializable(package="petscore")
class NotebookScaling(layers.Layer):
    """A notebook's pixel scaling computed exactly as it computed it on numpy arrays:
    ``ImageDataGenerator(rescale=1./255)`` multiplies; ``preprocess_input``'s ``tf`` mode
    divides by 127.5 and subtracts 1, ``torch`` divides by 255, subtracts the ImageNet means and
    divides by their deviations (``keras.applications.imagenet_utils``).

    The divisors are (frozen) weights, not constants: TensorFlow's graph optimiser rewrites a
    division by a constant into a multiplication by its reciprocal, which is 1 ulp off for some
    pixel values, and a sensitive network turned that into 1e-5 of probability.
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("1/255", "tf", "torch"):
            raise ValueError(f"unknown scaling mode {mode!r}")
        self.mode = mode

    def build(self, input_shape):
        if self.mode in ("tf", "torch"):
            self.divisor = self.add_weight(
                shape=(), initializer=keras.initializers.Constant(127.5 if self.mode == "tf" else 255.0),
                trainable=False, name="divisor")
        if self.mode == "torch":
            self.std = self.add_weight(shape=(3,), initializer=keras.initializers.Constant(
                IMAGENET_TORCH_STD_RGB), trainable=False, name="std")

    def call(self, inputs):
        if self.mode == "1/255":
            return inputs * (1.0 / 255.0)
        if self.mode == "tf":
            return inputs / self.divisor - 1.0
        mean = keras.ops.convert_to_tensor(IMAGENET_TORCH_MEAN_RGB, dtype=inputs.dtype)
        return (inputs / self.divisor - mean) / self.std

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="petscore")
class SigmoidToTwoClasses(layers.Layer):
    """One sigmoid unit P(second class) -> [P(first), P(second)] = [1 - p, p]: a binary Keras
    model (``class_mode="binary"``) scored as two classes like every other model."""

    def call(self, inputs):
        return keras.ops.concatenate([1.0 - inputs, inputs], axis=-1)


@keras.saving.register_keras_serializable(package="petscore")
class TemperatureScaling(layers.Layer):
    """Calibrated probabilities: for class probabilities p float32 [batch, classes],
    ``softmax(log(p) / temperature)``, which equals dividing the logits by ``temperature`` (the
    logits are log(p) up to a constant per row) and, for a sigmoid made into two classes, the
    logit log(p / (1 - p)). Temperature scaling, Guo et al., "On calibration of modern neural
    networks" (ICML 2017): one number fitted on held-out images (``model.calibration``); it
    changes how confident the model is, never which class is on top.

    The temperature is a configuration value, not a weight: every artefact (SavedModel,
    ``model.tflite``, ``model.keras`` on any backend) multiplies by the same constant 1 / T, and
    the layers with weights stay those of the classifier (``final_dense_layer``). A probability
    of 0 (float32 underflow) is read as the smallest normal float32, so no row holds -inf."""

    def __init__(self, temperature: float, **kwargs):
        super().__init__(**kwargs)
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number above 0, got {temperature!r}")
        self.temperature = float(temperature)

    def call(self, probabilities):
        floor = keras.ops.cast(SMALLEST_NORMAL_FLOAT32, probabilities.dtype)
        logits = keras.ops.log(keras.ops.maximum(probabilities, floor))
        return keras.ops.softmax(logits * (1.0 / self.temperature), axis=-1)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


@keras.saving.register_keras_serializable(package="petscore")
class KnnCosineDistance(layers.Layer):
    """The out-of-scope score: for features float32 [batch, dim], the cosine distance (1 - cosine
    similarity, in [0, 2]) to the ``k``-th nearest of ``bank_size`` in-scope training images'
    features, float32 [batch]. Higher is further from anything the model was trained on.

    ``bank`` ([dim, bank_size], frozen) holds those images' features divided by their L2 norms,
    set at export (``model.out_of_scope``), so a score is one matrix product and a top-k: the
    k-NN out-of-distribution score of Sun et al., "Out-of-distribution detection with deep
    nearest neighbors" (ICML 2022). ``keras.ops`` only, so ``model.keras`` scores on every
    Keras backend, and the SavedModel and ``.tflite`` compute the same inside the model.
    """

    def __init__(self, bank_size: int, k: int, **kwargs):
        super().__init__(**kwargs)
        if not 1 <= k <= bank_size:
            raise ValueError(f"k must be in [1, bank_size={bank_size}], got {k}")
        self.bank_size, self.k = int(bank_size), int(k)

    def build(self, input_shape):
        self.bank = self.add_weight(shape=(int(input_shape[-1]), self.bank_size), initializer="zeros",
                                    trainable=False, name="bank")

    def call(self, features):
        similarity = keras.ops.matmul(keras.ops.normalize(features, axis=-1), self.bank)
        nearest, _ = keras.ops.top_k(similarity, self.k)
        return 1.0 - nearest[:, self.k - 1]

    def compute_output_shape(self, input_shape):
        return (input_shape[0],)

    def get_config(self):
        return {**super().get_config(), "bank_size": self.bank_size, "k": self.k}


# How a notebook scaled its pixels (float [0, 255] in), as a layer that goes inside the exported
# model. Names follow ``keras.applications.imagenet_utils.preprocess_input``'s modes.
SCALINGS: dict[str, Callable[[], layers.Layer | None]] = {
    "1/255": lambda: NotebookScaling("1/255", name="scale_1_255"),
    "tf": lambda: NotebookScaling("tf", name="scale_to_pm1"),
    "caffe": lambda: CaffePreprocess(name="caffe_preprocess"),
    "torch": lambda: NotebookScaling("torch", name="torch_preprocess"),
    "none": lambda: None,
}


@dataclasses.dataclass(frozen=True)
class BaseSpec:
    """How to build one ImageNet base and what its input scaling is."""

    constructor: Callable[..., keras.Model]
    scaling: str  # a key of SCALINGS: the base's own preprocess_input
    takes_alpha: bool = False

    def input_scaling(self) -> layers.Layer | None:
        """The scaling layer of models trained here: Keras's stock layers (no notebook to match
        to the bit, and the graphs of models already exported stay what they were)."""
        stock = {"tf": lambda: layers.Rescaling(1 / 127.5, offset=-1, name="scale_to_pm1"),
                 "caffe": lambda: CaffePreprocess(name="caffe_preprocess"), "none": lambda: None}
        return stock[self.scaling]()


BASES: dict[str, BaseSpec] = {
    "mobilenet_v2": BaseSpec(keras.applications.MobileNetV2, "tf", takes_alpha=True),
    # MobileNet v1 is here because its small official weights file works offline.
    "mobilenet": BaseSpec(keras.applications.MobileNet, "tf", takes_alpha=True),
    "resnet50": BaseSpec(keras.applications.ResNet50, "caffe"),
    # EfficientNet rescales inside the application model itself.
    "efficientnet_b0": BaseSpec(keras.applications.EfficientNetB0, "none"),
}
# Further Keras applications a notebook may have used as a feature extractor
# (``python -m model.package --feature-extractor``); not offered for training here.
FEATURE_EXTRACTORS: dict[str, BaseSpec] = {
    **BASES,
    "vgg16": BaseSpec(keras.applications.VGG16, "caffe"),
    "vgg19": BaseSpec(keras.applications.VGG19, "caffe"),
    "inception_v3": BaseSpec(keras.applications.InceptionV3, "tf"),
    "xception": BaseSpec(keras.applications.Xception, "tf"),
    "densenet121": BaseSpec(keras.applications.DenseNet121, "torch"),
}


def is_weights_file(weights: str) -> bool:
    """``imagenet`` and ``none`` are Keras's own choices; anything else is a local weights file."""
    return weights.lower() not in ("imagenet", "none")


def weights_label(weights: str) -> str:
    """How metadata names the weights: ``imagenet``/``none``, or the weights file's name."""
    return os.path.basename(weights) if is_weights_file(weights) else weights


def build_base(name: str, input_size: tuple[int, int], weights: str, alpha: float = 1.0) -> keras.Model:
    """A Keras application without its top. ``weights``: ``imagenet`` (downloads through Keras),
    ``none`` (random) or a path to a local ``include_top=False`` weights file."""
    spec = FEATURE_EXTRACTORS[name]
    kwargs = {"alpha": alpha} if spec.takes_alpha else {}
    keras_weights = "imagenet" if weights.lower() == "imagenet" else None  # a file loads below
    base = spec.constructor(input_shape=(*input_size, 3), include_top=False, weights=keras_weights,
                            **kwargs)
    if is_weights_file(weights):
        base.load_weights(weights)
    return base


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
    feature_extractor = build_base(base, input_size, base_weights, alpha)
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


def probabilities_only(model: keras.Model) -> keras.Model:
    """``model`` itself, or for an exported model with an out-of-scope detector (outputs
    ``{"probabilities", "scope_score"}``) the same layers with the probabilities as the only
    output: what re-exporting, re-fitting a head or timing the classifier alone takes."""
    if isinstance(model.output, dict):
        return keras.Model(model.inputs, model.output["probabilities"], name=model.name)
    return model


def final_dense_layer(classifier: keras.Model | None) -> layers.Dense | None:
    """The classifier's head: its last top-level layer with weights, when that is a ``Dense``
    (every model ``model.train`` makes, and a packaged notebook model whose output is a ``Dense``
    layer's), not counting an out-of-scope scorer beside it; else None. Its input is the
    features the head reads (the integer export re-fits the head on them, the out-of-scope
    detector measures distances in them)."""
    weighted = [layer for layer in classifier.layers
                if layer.weights and not isinstance(layer, KnnCosineDistance)] if classifier else []
    return weighted[-1] if weighted and isinstance(weighted[-1], layers.Dense) else None


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
