"""Keras 2 (tf.keras 2.x) ``.h5`` models under Keras 3: their layer configs, translated.

tf.keras 2.x wrote configuration keys that Keras 3 refuses although they change nothing at
inference (``keras.src.legacy.saving.legacy_h5_format`` reads the weights of these files, but
builds each layer with ``cls(**config)``, which rejects any key Keras 3 does not know):

- ``groups: 1`` on depthwise, separable and transposed convolutions (their Keras 2 base class,
  ``Conv``, wrote it; Keras 3 has no grouped form of these layers);
- ``BatchNormalization``'s ``axis`` as a one-element list (Keras 2 stores the built axes);
- ``batch_input_shape`` on the first layer of a nested Sequential (Keras 2's record of
  ``input_shape=``, beside the ``InputLayer`` it built from it);
- a layer's ``dtype`` as a Keras 2 mixed-precision policy (``{"class_name": "Policy", "config":
  {"name": "mixed_float16"}}``), which Keras 3 takes as the policy's name;
- ``dtype`` inside an initializer's config (TF 1.x-era initializers): Keras 3 initializers take
  the dtype when called. Initializers only matter for training: the weights come from the file.

Each known key is translated to the Keras 3 config with the same inference (checked against
files tf-keras 2.21 writes); a value that has no Keras 3 equivalent (``groups`` other than 1,
``renorm=True``, ``virtual_batch_size``, a BatchNormalization over several axes), Keras 2's
``hard_sigmoid``
(``0.2 x + 0.5``, where Keras 3's is ``x / 6 + 0.5``) and TensorFlow functions recorded as layers
(``TFOpLambda``) are refused, naming the layer, the key and what to do instead.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator

import h5py
import keras

_DEPTHWISE = ("DepthwiseConv1D", "DepthwiseConv2D")
_SEPARABLE = ("SeparableConv1D", "SeparableConv2D")
_TRANSPOSED = ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")
# Keys Keras 2 wrote and Keras 3 refuses, dropped when their value changes nothing at inference:
# (layer classes, key, the values that may be dropped or None for any, what the key is).
DROPPED_KEYS = (
    (_DEPTHWISE + _SEPARABLE + _TRANSPOSED, "groups", (1,),
     "written by Keras 2's Conv base class; Keras 3 has no grouped form of these layers"),
    (_SEPARABLE, "kernel_initializer", None, "unused: separable kernels are depthwise_/pointwise_"),
    (_SEPARABLE, "kernel_regularizer", None, "unused: separable kernels are depthwise_/pointwise_"),
    (_SEPARABLE, "kernel_constraint", None, "unused: separable kernels are depthwise_/pointwise_"),
    (("BatchNormalization",), "virtual_batch_size", (None,),
     "ghost batch normalisation, whose weights Keras 2 stores with an extra axis"),
)
# Keras 2's mixed-precision policy classes, as they appear in a layer's serialised "dtype".
KERAS2_POLICIES = frozenset({"Policy", "PolicyV1", "PolicyV2"})
# Layers that hold a TensorFlow function call (x / 127.5 written in a functional model, for one).
TF_FUNCTION_LAYERS = frozenset({"TFOpLambda", "SlicingOpLambda", "TensorFlowOpLayer"})
RESAVE_ADVICE = ("load the file in tf.keras 2 (pip install tf-keras, TF_USE_LEGACY_KERAS=1) and "
                 "pass the SavedModel that model.export(DIR) writes from there as --keras DIR")


class Keras2ConfigError(ValueError):
    """A Keras 2 layer config that Keras 3 cannot build with the same inference."""


def keras_version(path: str) -> str | None:
    """The ``keras_version`` attribute of a Keras ``.h5`` model file, ``""`` when it has none
    (Keras 1 and early Keras 2), ``None`` when the file is not an HDF5 file with a model config."""
    try:
        with h5py.File(path, "r") as handle:
            if "model_config" not in handle.attrs:
                return None
            version = handle.attrs.get("keras_version", b"")
    except OSError:
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def is_keras2_h5(path: str) -> bool:
    """True for a full-model ``.h5`` written by Keras 2 / tf.keras 2.x (Keras 3 writes 3.x)."""
    version = keras_version(path)
    return version is not None and not version.startswith("3.")


def translate_config(config: dict) -> tuple[dict, Counter]:
    """``(Keras 3 config, changes)`` for a Keras 2 ``model_config``: a deep copy with each known
    key translated (module docstring); ``changes`` counts each kind of change, e.g.
    ``{"DepthwiseConv2D: groups=1 dropped": 17}``. Raises ``Keras2ConfigError`` naming the
    layer and key when a value has no Keras 3 equivalent."""
    config = copy.deepcopy(config)
    changes: Counter = Counter()
    for class_name, layer in _layer_configs(config):
        if class_name == "Sequential":
            _input_layer_first(layer, changes)
        _translate_layer(class_name, layer, changes)
    return config, changes


def load_keras2_h5(path: str, safe_mode: bool = True) -> tuple[keras.Model, Counter]:
    """``(model, changes)``: a Keras 2 ``.h5`` model loaded by Keras 3's own legacy loader
    (``keras.saving.load_model``) from a copy whose ``model_config`` is translated; the user's
    file is not modified. Raises ``Keras2ConfigError`` (see ``translate_config``)."""
    with h5py.File(path, "r") as handle:
        config = json.loads(_text(handle.attrs["model_config"]))
    translated, changes = translate_config(config)
    with tempfile.TemporaryDirectory(prefix="petscore-keras2-") as folder:
        copy_path = os.path.join(folder, "model.h5")
        shutil.copyfile(path, copy_path)
        with h5py.File(copy_path, "r+") as handle:
            handle.attrs["model_config"] = json.dumps(translated)
        return keras.saving.load_model(copy_path, compile=False, safe_mode=safe_mode), changes


def describe_load_error(error: BaseException) -> str | None:
    """The layer and config keys named in Keras's "Unrecognized keyword arguments" error (its
    message, or any exception it was raised from), as one sentence; ``None`` if it is another
    error."""
    text = " ".join(str(e) for e in _chain(error))
    refused = re.search(r"Unrecognized keyword arguments passed to (\w+): (\{.*?\})(?:\s|$)", text)
    if not refused:
        return None
    named = re.search(r"'name': '([^']*)'", text)
    layer = f"layer '{named.group(1)}' ({refused.group(1)})" if named else f"a {refused.group(1)} layer"
    return f"{layer} has config keys Keras 3 does not accept: {refused.group(2)}"


def _translate_layer(class_name: str, layer: dict, changes: Counter) -> None:
    name = layer.get("name", "?")
    if class_name in TF_FUNCTION_LAYERS:
        raise Keras2ConfigError(
            f"layer '{name}' ({class_name}) is a TensorFlow function call "
            f"({layer.get('function') or layer.get('node_def', {}).get('op', '?')}) that tf.keras 2 "
            "recorded in the model; Keras 3 cannot rebuild it. If it only scaled pixels "
            "(preprocess_input inside the model), rebuild the model without it and pass --scaling; "
            f"otherwise {RESAVE_ADVICE}")
    for classes, key, honoured, why in DROPPED_KEYS:
        if class_name in classes and key in layer:
            if honoured is not None and layer[key] not in honoured:
                raise Keras2ConfigError(f"layer '{name}' ({class_name}) has {key}={layer[key]!r} "
                                        f"({why}), which Keras 3 cannot load: {RESAVE_ADVICE}")
            del layer[key]
            changes[f"{class_name}: {key} dropped"] += 1
    if class_name == "BatchNormalization":
        _translate_batchnorm(name, layer, changes)
    if layer.get("activation") == "hard_sigmoid":
        raise Keras2ConfigError(
            f"layer '{name}' ({class_name}) uses activation 'hard_sigmoid', which Keras 2 computes "
            "as clip(0.2 x + 0.5) and Keras 3 as clip(x / 6 + 0.5): scores would differ. "
            f"{RESAVE_ADVICE[0].upper()}{RESAVE_ADVICE[1:]}")
    dtype = layer.get("dtype")
    if isinstance(dtype, dict) and dtype.get("class_name") in KERAS2_POLICIES:
        layer["dtype"] = dtype["config"]["name"]
        changes[f"dtype policy {dtype['class_name']} -> '{layer['dtype']}'"] += 1
    for key, value in layer.items():
        if key.endswith("_initializer") and isinstance(value, dict) and "dtype" in value.get("config", {}):
            del value["config"]["dtype"]
            changes[f"{value.get('class_name')} initializer: dtype dropped"] += 1


def _input_layer_first(sequential: dict, changes: Counter) -> None:
    """Keras 2 kept ``batch_input_shape`` (its record of ``input_shape=``) in the config of a
    Sequential's first layer, beside the ``InputLayer`` it built from it (or, in older files,
    instead of one). Keras 3 builds that InputLayer only for the outermost model and refuses the
    key elsewhere: a nested Sequential without an InputLayer gets the one Keras 2 built, named
    as Keras 2 named it, and the key leaves the first layer's config."""
    layers = sequential.get("layers") or []
    has_input = bool(layers) and layers[0].get("class_name") == "InputLayer"
    first = layers[int(has_input)].get("config", {}) if len(layers) > has_input else {}
    if "batch_input_shape" not in first:
        return
    shape = first.pop("batch_input_shape")
    if not has_input:
        layers.insert(0, {"class_name": "InputLayer", "config": {
            "batch_input_shape": shape, "dtype": first.get("dtype", "float32"),
            "name": f"{first.get('name', 'sequential')}_input"}})
    changes["Sequential: batch_input_shape of the first layer -> its InputLayer"] += 1


def _translate_batchnorm(name: str, layer: dict, changes: Counter) -> None:
    axis = layer.get("axis")
    if isinstance(axis, list):
        if len(axis) != 1:
            raise Keras2ConfigError(f"layer '{name}' (BatchNormalization) normalises over axes "
                                    f"{axis}; Keras 3 takes one axis: {RESAVE_ADVICE}")
        layer["axis"] = axis[0]
        changes["BatchNormalization: axis [n] -> n"] += 1
    if layer.get("renorm"):
        raise Keras2ConfigError(f"layer '{name}' (BatchNormalization) has renorm=True, whose "
                                f"weights Keras 3 lays out differently: {RESAVE_ADVICE}")


def _layer_configs(node) -> Iterator[tuple[str, dict]]:
    """``(class_name, config)`` of every layer in a serialised model, nested models, wrapped
    layers (``TimeDistributed``, ``Bidirectional``) and the model itself included. A layer is a
    ``{"class_name", "config"}`` dict whose config has a name (initializers and policies have none)."""
    if isinstance(node, dict):
        inner = node.get("config")
        if "class_name" in node and isinstance(inner, dict) and "name" in inner:
            yield node["class_name"], inner
        for value in node.values():
            yield from _layer_configs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _layer_configs(value)


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
