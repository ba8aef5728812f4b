"""Keras 2 (tf.keras 2.x) ``.h5`` and ``.keras`` model files, written as tf.keras 2.x writes them.

``.keras`` (``save_keras215_zip``): a model built and saved by tf-keras 2.21, rewritten as Keras
2.15 wrote the same model. tf-keras is Keras 2.15's code under the package name ``tf_keras``
(it was forked from Keras 2.15 when Keras 3 took the name ``keras``), and its ``.keras`` writer is
Keras 2.15's: the zip holds ``metadata.json``, ``config.json`` and ``model.weights.h5`` (one group
per layer named after its class; its saving_lib and serialization_lib differ from Keras 2.15's
in comments and usage gauges only). Three things differ: the module of classes Keras 2 does not
export (``tf_keras.src.engine.functional`` where Keras 2.15 wrote ``keras.src.engine.functional``,
as keras#19089 quotes it), ``metadata.json``'s ``keras_version``, and ``optional``, which
tf-keras added to ``InputLayer``'s config after 2.15.

``.h5``:
A model built and saved by Keras 3 (so its weights are real and its predictions known) whose
``model_config`` is rewritten into tf.keras 2.x's serialisation of the same layers, as tf-keras
2.21's ``model.save("x.h5")`` writes it: no ``module``/``registered_name``/``build_config``,
dtypes as names, ``batch_input_shape``, nodes as ``[[["layer", 0, 0, {}]]]``, and the keys Keras
3 refuses: ``groups: 1`` on depthwise, separable and transposed convolutions, the separable
layers' unused ``kernel_*``, ``BatchNormalization``'s built ``axis`` as a list, and
``batch_input_shape`` on the first layer of a nested Sequential. ``keras_version`` says 2.x.
"""

from __future__ import annotations

import json
import zipfile

import h5py
import keras

KERAS2_VERSION = "2.15.0"
GROUPED_IN_KERAS2 = ("DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose")


def save_keras2_h5(model: keras.Model, path: str, edit=None) -> None:
    """Save ``model`` as tf.keras 2.x would; ``edit(config)`` may change the Keras 2 config
    further (a key some file carries) before it is written."""
    model.save(path)
    with h5py.File(path, "r+") as handle:
        config = keras2_config(json.loads(handle.attrs["model_config"]))
        if edit is not None:
            edit(config)
        handle.attrs["model_config"] = json.dumps(config)
        handle.attrs["keras_version"] = KERAS2_VERSION


def save_keras215_zip(tf_keras_model, path: str, edit=None) -> None:
    """Save a ``tf_keras`` model as Keras 2.15's ``model.save("x.keras")`` writes it (module
    docstring); ``edit(config)`` may change its ``config.json`` further."""
    written = f"{path}.tf-keras.keras"
    tf_keras_model.save(written)
    with zipfile.ZipFile(written) as original, zipfile.ZipFile(path, "w") as keras215:
        for member in original.infolist():
            data = original.read(member)
            if member.filename == "config.json":
                config = json.loads(data.replace(b'"tf_keras.src.', b'"keras.src.'))
                for layer in _input_layers(config):
                    layer["config"].pop("optional", None)
                if edit is not None:
                    edit(config)
                data = json.dumps(config).encode()
            elif member.filename == "metadata.json":
                data = json.dumps({**json.loads(data), "keras_version": KERAS2_VERSION}).encode()
            keras215.writestr(member, data)


def _input_layers(node):
    if isinstance(node, dict):
        if node.get("class_name") == "InputLayer":
            yield node
        for value in node.values():
            yield from _input_layers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _input_layers(value)


def keras2_config(node):
    """Keras 3's serialisation of a model (any part of it) rewritten as tf.keras 2.x's."""
    if isinstance(node, list):
        return [keras2_config(value) for value in node]
    if not isinstance(node, dict):
        return node
    if node.get("class_name") == "DTypePolicy":
        return node["config"]["name"]
    built = node.get("build_config", {}).get("input_shape")
    out = {key: keras2_config(value) for key, value in node.items()
           if key not in ("module", "registered_name", "build_config")}
    if "inbound_nodes" in out:
        out["inbound_nodes"] = [_keras2_node(call) for call in node["inbound_nodes"]]
    config = out.get("config")
    if not isinstance(config, dict):
        return out
    class_name = out.get("class_name")
    if class_name == "InputLayer":
        config["batch_input_shape"] = config.pop("batch_shape")
    if class_name in GROUPED_IN_KERAS2:
        config["groups"] = 1
    if class_name == "SeparableConv2D":
        config.update(kernel_initializer={"class_name": "GlorotUniform", "config": {"seed": None}},
                      kernel_regularizer=None, kernel_constraint=None)
    if class_name == "BatchNormalization":
        rank = len(built) if built else 4  # layers inside a nested model: images, NHWC
        config["axis"] = [config["axis"] % rank]  # Keras 2 saves the built axes
        for key in ("synchronized", "renorm", "renorm_clipping", "renorm_momentum"):
            config.pop(key)  # Keras 2 writes the renorm keys only for renorm=True
    if class_name == "Sequential":
        layers = config["layers"]
        if (len(layers) > 1 and layers[0]["class_name"] == "InputLayer"
                and layers[1]["class_name"] not in ("Functional", "Sequential")):  # a layer's, not a model's
            layers[1]["config"]["batch_input_shape"] = layers[0]["config"]["batch_input_shape"]
    if class_name == "Functional":
        for key in ("input_layers", "output_layers"):
            if config[key] and not isinstance(config[key][0], list):
                config[key] = [config[key]]
    return out


def _keras2_node(call: dict) -> list:
    """``{"args": [tensor or [tensors]], "kwargs": {}}`` -> ``[["layer", node, tensor, {}], ...]``."""
    tensors = call["args"][0]
    tensors = tensors if isinstance(tensors, list) else [tensors]
    return [[*tensor["config"]["keras_history"], {}] for tensor in tensors]


def layer_config(config: dict, name: str) -> dict:
    """The config of the layer called ``name``, anywhere in a serialised model."""
    if isinstance(config, dict):
        inner = config.get("config")
        if isinstance(inner, dict) and inner.get("name") == name and "class_name" in config:
            return inner
        values = config.values()
    elif isinstance(config, list):
        values = config
    else:
        return None
    for value in values:
        found = layer_config(value, name)
        if found is not None:
            return found
    return None
