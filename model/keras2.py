"""Keras 2 (tf.keras 2.x) ``.h5`` and ``.keras`` models under Keras 3: their configs, translated.

Keras 3 reads the weights of these files (``.h5``: ``keras.src.legacy.saving.legacy_h5_format``;
``.keras`` zips of Keras 2.13-2.15 and tf-keras: ``keras.src.saving.saving_lib``, whose
``model.weights.h5`` layout, one group per layer named after its class, Keras 2 and 3 share) but
builds each layer with ``cls(**config)``, which rejects any key it does not know, numbers nodes
its own way, and in a ``.keras`` zip imports the module Keras 2 named for each class
(``keras.src.engine.functional``: keras#19089, tensorflow#62836). tf.keras 2.x wrote, at no
difference in inference:

- the module of its engine classes (``Functional``, ``Sequential``, ``Model``, ``InputLayer``),
  ``keras.src.engine.*`` (``tf_keras.src.engine.*`` from tf-keras), which Keras 3 keeps elsewhere;

- ``groups: 1`` on depthwise, separable and transposed convolutions (their Keras 2 base class,
  ``Conv``, wrote it; Keras 3 has no grouped form of these layers), and the separable layers'
  unused ``kernel_initializer``/``_regularizer``/``_constraint``;
- ``BatchNormalization``'s ``axis`` as a one-element list (Keras 2 stores the built axes);
- ``rng_type`` on augmentation layers (``RandomFlip``, ``RandomRotation``, ...): their random
  generator, which only draws while training;
- node indices of calls to a nested Sequential in a functional model (tf.keras 2 counted the
  node it built the Sequential with);
- ``batch_input_shape`` on the first layer of a nested Sequential (Keras 2's record of
  ``input_shape=``, beside the ``InputLayer`` it built from it);
- a layer's ``dtype`` as a Keras 2 mixed-precision policy (``{"class_name": "Policy", "config":
  {"name": "mixed_float16"}}``), which Keras 3 takes as the policy's name;
- ``dtype`` inside an initializer's config (TF 1.x-era initializers): Keras 3 initializers take
  the dtype when called (and the weights come from the file);
- TensorFlow functions of a tensor and a number recorded as ``TFOpLambda`` layers (``x / 127.5
  - 1``: ``preprocess_input`` inside the model, as TensorFlow's transfer learning tutorial saves
  it), which become the ``Rescaling`` layer that computes them.

Each is translated to the Keras 3 config with the same inference (checked against files tf-keras
2.21 writes), and a file is loaded only when the model's weights are then exactly the file's
(``check_weights_loaded``). What has no Keras 3 equivalent is refused, naming the layer, the key
and what to do instead: ``groups`` other than 1, ``renorm=True``, ``virtual_batch_size``, a BatchNormalization
over several axes, Keras 2's ``hard_sigmoid`` (``0.2 x + 0.5``, where Keras 3's is ``x / 6 +
0.5``) and other TensorFlow functions recorded as layers.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator

import h5py
import keras
import numpy as np

_DEPTHWISE = ("DepthwiseConv1D", "DepthwiseConv2D")
_SEPARABLE = ("SeparableConv1D", "SeparableConv2D")
_TRANSPOSED = ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")
# Keys Keras 2 wrote and Keras 3 refuses, dropped when their value changes nothing at inference:
# (layer classes or None for any, key, the values that may be dropped or None for any, what it is).
DROPPED_KEYS = (
    (_DEPTHWISE + _SEPARABLE + _TRANSPOSED, "groups", (1,),
     "written by Keras 2's Conv base class; Keras 3 has no grouped form of these layers"),
    (_SEPARABLE, "kernel_initializer", None, "unused: separable kernels are depthwise_/pointwise_"),
    (_SEPARABLE, "kernel_regularizer", None, "unused: separable kernels are depthwise_/pointwise_"),
    (_SEPARABLE, "kernel_constraint", None, "unused: separable kernels are depthwise_/pointwise_"),
    (("BatchNormalization",), "virtual_batch_size", (None,),
     "ghost batch normalisation, whose weights Keras 2 stores with an extra axis"),
    (None, "rng_type", None, "the random generator of augmentation and noise layers: training only"),
)
# Keras 2's mixed-precision policy classes, as they appear in a layer's serialised "dtype".
KERAS2_POLICIES = frozenset({"Policy", "PolicyV1", "PolicyV2"})
# Layers that hold a TensorFlow function call (x / 127.5 written in a functional model, for one).
TF_FUNCTION_LAYERS = frozenset({"TFOpLambda", "SlicingOpLambda", "TensorFlowOpLayer"})
# TFOpLambda functions of a tensor and a number, as (scale, offset) of Keras 3's Rescaling, which
# computes x * scale + offset: what preprocess_input inside a model, or x / 255, records. A
# division becomes the product with the reciprocal, as TensorFlow's graph optimiser also makes it
# (within one float32 rounding).
SCALAR_FUNCTIONS = {
    "math.truediv": lambda y: (1 / y, 0.0), "math.divide": lambda y: (1 / y, 0.0),
    "math.multiply": lambda y: (y, 0.0), "math.subtract": lambda y: (1.0, -y),
    "math.add": lambda y: (1.0, y), "__operators__.add": lambda y: (1.0, y),
}
# Keras 2's engine classes by the module a Keras 2 .keras zip names (keras.src.engine.functional,
# tf-keras's tf_keras.src.engine.functional, Keras 2.12's keras.engine...), as Keras 3 names them.
KERAS2_ENGINE_MODULE = re.compile(r"^(tf_)?keras(\.src)?\.engine\.")
KERAS3_MODULES = {"Functional": "keras.src.models.functional", "Sequential": "keras", "Model": "keras",
                  "InputLayer": "keras.layers"}
# Groups of a .keras zip's model.weights.h5 that hold the training state, not the model's weights.
TRAINING_STATE_GROUPS = ("optimizer", "metrics")
RESAVE_ADVICE = ("load the file in tf.keras 2 (pip install tf-keras, TF_USE_LEGACY_KERAS=1) and "
                 "pass the SavedModel that model.export(DIR) writes from there as --keras DIR")


class Keras2ConfigError(ValueError):
    """A Keras 2 model file that Keras 3 cannot load with the same inference: a layer config with
    no Keras 3 equivalent, or weights that Keras 3 did not read."""


def keras_version(path: str) -> str | None:
    """The Keras version that saved a model file: ``keras_version`` in a ``.keras`` zip's
    ``metadata.json`` or in a ``.h5``'s attributes; ``""`` when it has none (Keras 1 and early
    Keras 2); ``None`` when the file is neither a zip with a ``config.json`` nor an HDF5 file
    with a model config."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if "config.json" not in names:
                return None
            try:
                metadata = json.loads(archive.read("metadata.json")) if "metadata.json" in names else {}
            except ValueError:
                metadata = {}
        return str(metadata.get("keras_version", "")) if isinstance(metadata, dict) else ""
    try:
        with h5py.File(path, "r") as handle:
            if "model_config" not in handle.attrs:
                return None
            return _text(handle.attrs.get("keras_version", b""))
    except OSError:
        return None


def is_keras2_file(path: str) -> bool:
    """True for a full-model ``.h5`` or ``.keras`` written by Keras 2 / tf.keras 2.x (Keras 3
    writes 3.x)."""
    version = keras_version(path)
    return version is not None and not version.startswith("3.")


def read_model_config(path: str) -> dict:
    """The serialised model of a ``.keras`` zip (``config.json``) or a ``.h5`` (``model_config``),
    as Keras wrote it. Raises ``OSError``/``KeyError``/``ValueError`` for a file that has none."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    with h5py.File(path, "r") as handle:
        return json.loads(_text(handle.attrs["model_config"]))


def translate_config(config: dict) -> tuple[dict, Counter]:
    """``(Keras 3 config, changes)`` for a Keras 2 ``model_config``: a deep copy with each known
    key translated (module docstring); ``changes`` counts each kind of change, e.g.
    ``{"DepthwiseConv2D: groups dropped": 17}``. Raises ``Keras2ConfigError`` naming the
    layer and key when a value has no Keras 3 equivalent."""
    config = copy.deepcopy(config)
    changes: Counter = Counter()
    for node in _layer_nodes(config):
        _keras3_module(node, changes)
        if node["class_name"] == "TFOpLambda":
            _tf_function_as_rescaling(node, changes)
        if node["class_name"] == "Sequential":
            _input_layer_first(node["config"], changes)
        if node["class_name"] in ("Functional", "Model"):
            _first_call_of_nested_sequentials(node["config"], changes)
        _translate_layer(node["class_name"], node["config"], changes)
    return config, changes


def load_keras2(path: str, safe_mode: bool = True) -> tuple[keras.Model, Counter]:
    """``(model, changes)``: a Keras 2 ``.h5`` or ``.keras`` model loaded by Keras 3's own loader
    (``keras.saving.load_model``: the legacy HDF5 loader, or ``saving_lib`` for a zip) from a
    copy whose config (``model_config``, ``config.json``) is translated; the user's file is not
    modified. Raises ``Keras2ConfigError`` (see ``translate_config`` and
    ``check_weights_loaded``); Keras's own errors pass through."""
    zipped = zipfile.is_zipfile(path)
    translated, changes = translate_config(read_model_config(path))
    with tempfile.TemporaryDirectory(prefix="petscore-keras2-") as folder:
        copy_path = os.path.join(folder, "model.keras" if zipped else "model.h5")
        if zipped:
            with zipfile.ZipFile(path) as original, zipfile.ZipFile(copy_path, "w") as copied:
                for member in original.infolist():
                    copied.writestr(member, json.dumps(translated) if member.filename == "config.json"
                                    else original.read(member))
        else:
            shutil.copyfile(path, copy_path)
            with h5py.File(copy_path, "r+") as handle:
                handle.attrs["model_config"] = json.dumps(translated)
        model = keras.saving.load_model(copy_path, compile=False, safe_mode=safe_mode)
    check_weights_loaded(model, path)
    return model, changes


def check_weights_loaded(model: keras.Model, path: str) -> None:
    """Raise ``Keras2ConfigError`` unless the model's weights are exactly the arrays of the Keras
    file at ``path`` (``.h5``: ``model_weights``; ``.keras``: ``model.weights.h5`` without the
    optimizer's and metrics' state), one to one by shape and value. Keras 3 reads a Keras 2 file
    layer by layer, and a layer it does not find in the file keeps its fresh initial weights
    (for some layouts with only a warning): its scores would be noise."""
    in_model = [(weight.path, _array_key(weight.numpy())) for weight in model.weights]
    in_file = [(name, _array_key(value)) for name, value in _file_weights(path)]
    unread = Counter(key for _, key in in_file) - Counter(key for _, key in in_model)
    fresh = Counter(key for _, key in in_model) - Counter(key for _, key in in_file)
    if unread or fresh:
        first_fresh = next((f" (first: {name})" for name, key in in_model if key in fresh), "")
        first_unread = next((f" (first: {name})" for name, key in in_file if key in unread), "")
        raise Keras2ConfigError(
            f"Keras {keras.__version__} loaded the model but not all of its weights: "
            f"{fresh.total()} of the model's {len(in_model)} weights are not the file's{first_fresh} "
            f"and {unread.total()} of the file's {len(in_file)} arrays were not read{first_unread}; "
            f"the scores would not be the model's. {RESAVE_ADVICE[0].upper()}{RESAVE_ADVICE[1:]}")


def _file_weights(path: str) -> list[tuple[str, np.ndarray]]:
    """``(path in the file, array)`` for each weight array of a Keras model file."""
    found: list[tuple[str, np.ndarray]] = []

    def collect(group: h5py.Group, skip: tuple[str, ...]) -> None:
        group.visititems(lambda name, item: found.append((name, item[()])) if isinstance(item, h5py.Dataset)
                         and name.split("/")[0] not in skip else None)

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            weights = io.BytesIO(archive.read("model.weights.h5"))
        with h5py.File(weights, "r") as h5:
            collect(h5, TRAINING_STATE_GROUPS)
    else:
        with h5py.File(path, "r") as h5:
            collect(h5["model_weights"], ())
    return found


def _array_key(value) -> tuple:
    """A weight array's identity, whatever dtype holds it: its shape and a digest of its values."""
    values = np.ascontiguousarray(value, dtype=np.float64)
    return values.shape, hashlib.blake2b(values.tobytes(), digest_size=16).hexdigest()


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
        if (classes is None or class_name in classes) and key in layer:
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


def _keras3_module(node: dict, changes: Counter) -> None:
    """In a ``.keras`` zip's config, the module Keras 2 named for an engine class becomes Keras
    3's (``KERAS3_MODULES``), in place: Keras 3 imports the module it names."""
    module, class_name = node.get("module"), node["class_name"]
    if isinstance(module, str) and KERAS2_ENGINE_MODULE.match(module) and class_name in KERAS3_MODULES:
        node["module"] = KERAS3_MODULES[class_name]
        changes[f"{class_name}: module {module} -> {node['module']}"] += 1


def _tf_function_as_rescaling(node: dict, changes: Counter) -> None:
    """A ``TFOpLambda`` of one of ``SCALAR_FUNCTIONS`` with a number ``y`` becomes the
    ``Rescaling`` layer that computes it, in place (anything else is left to be refused)."""
    config, calls = node["config"], node.get("inbound_nodes") or []
    function = SCALAR_FUNCTIONS.get(config.get("function"))
    call = calls[0] if len(calls) == 1 else None  # [layer, node index, tensor index, kwargs]
    if function is None or not (isinstance(call, list) and len(call) == 4 and isinstance(call[3], dict)):
        return
    arguments = {key: value for key, value in call[3].items() if key != "name"}
    y = arguments.get("y")
    if set(arguments) != {"y"} or isinstance(y, bool) or not isinstance(y, int | float) or y == 0:
        return
    scale, offset = function(float(y))
    node.update(class_name="Rescaling", inbound_nodes=[[[*call[:3], {}]]], config={
        "name": config["name"], "trainable": config.get("trainable", True),
        "dtype": config.get("dtype", "float32"), "scale": scale, "offset": offset})
    if "module" in node:  # a .keras zip's config names where the class is, and its registration
        node.update(module="keras.layers", registered_name=None)
    changes[f"TFOpLambda {config['function']}(x, y) -> Rescaling"] += 1


def _first_call_of_nested_sequentials(functional: dict, changes: Counter) -> None:
    """tf.keras 2 gave a Sequential a node of its own when it built it, so a functional model
    calling it (``data_augmentation(inputs)``, Keras's tutorials) names its first call node 1;
    Keras 3 numbers that call 0 (its Functional models keep the built node, its Sequentials do
    not). References to a nested Sequential's nodes, in the layers' inbound nodes and the
    model's inputs and outputs, move down by one."""
    sequentials = {layer.get("name", layer["config"].get("name")) for layer in functional.get("layers", [])
                   if layer.get("class_name") == "Sequential"}

    def renumber(value) -> None:  # [layer name, node index, tensor index(, call kwargs)]
        if not isinstance(value, list):
            return
        if (3 <= len(value) <= 4 and isinstance(value[0], str) and isinstance(value[1], int)
                and value[0] in sequentials and value[1] >= 1):
            value[1] -= 1
            changes["nested Sequential: its first call's node index 1 -> 0"] += 1
            return
        for item in value:
            renumber(item)

    if sequentials:
        for layer in functional["layers"]:
            renumber(layer.get("inbound_nodes"))
        renumber(functional.get("input_layers"))
        renumber(functional.get("output_layers"))


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


def _layer_nodes(node) -> Iterator[dict]:
    """Every layer's ``{"class_name", "config", ...}`` dict in a serialised model: nested models,
    wrapped layers (``TimeDistributed``, ``Bidirectional``) and the model itself included. A layer's
    config has a name (initializers' and policies' have none). Each is yielded before its config
    is walked, so a caller may change it."""
    if isinstance(node, dict):
        if "class_name" in node and isinstance(node.get("config"), dict) and "name" in node["config"]:
            yield node
        for value in list(node.values()):
            yield from _layer_nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _layer_nodes(value)


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
