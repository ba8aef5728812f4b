"""The notebook's model file, loaded for packaging without running anything it holds.

``model.package`` takes whatever a notebook saved: a ``.keras`` zip or a legacy ``.h5`` written
by Keras 3, the same written by Keras 2 / tf.keras 2.x (translated for Keras 3 by
``model.keras2``), or a SavedModel directory. Keras files load with ``safe_mode=True`` and only
Keras's own layers (and petscore's registered ones) are built from them: a ``Lambda`` layer is
Python code kept in the file, and a custom layer's code is not in the file at all (only its
class name and settings), so both are refused before loading, naming the layer, with what to
do instead. Every refusal is one line (``PackagingError``).
"""

from __future__ import annotations

import os
import zipfile

import keras

from model.keras2 import (
    RESAVE_ADVICE,
    TF_FUNCTION_LAYERS,
    Keras2ConfigError,
    describe_load_error,
    keras_version,
    load_keras2,
    read_model_config,
)

# What a user can do about a layer petscore will not build from a model file.
CODE_LAYER_ADVICE = (
    "Rebuild the model with Keras's own layers in its place (one that only scaled pixels: leave it "
    "out and pass --scaling), or export the model where its code is defined (model.export(DIR), in "
    "Keras 3 or tf.keras 2) and pass --keras DIR: a SavedModel holds the computation, not Python code")
MODEL_CLASSES = frozenset({"Functional", "Sequential", "Model"})
# Why a layer is refused
LAMBDA = "Python code saved in the model file"
CUSTOM_CLASS = "a custom layer class, whose code a model file does not hold"
REMOVED_IN_KERAS3 = "a Keras 2 layer that Keras {keras} does not have"
# A Keras error can carry the whole model config on one line: a refusal quotes its start.
QUOTED_ERROR_CHARACTERS = 300
NAMED_LAYERS = 3


class PackagingError(ValueError):
    """The model cannot be packaged as asked; raised before anything is written."""


def load_notebook_model(path: str) -> tuple[keras.Model, str, dict[str, int]]:
    """``(model, format, keras2_changes)`` for ``--keras PATH``. ``format`` is ``saved_model``,
    ``keras`` or ``h5`` (the file's suffix for Keras 3 files); ``keras2_changes`` counts each
    translation of a Keras 2 file's config (``model.keras2``), empty for other files. Raises
    ``PackagingError``, one line saying which Keras saved the file and what to do, when it
    cannot be loaded with the same inference or holds a layer petscore does not build."""
    if not os.path.exists(path):
        raise PackagingError(f"--keras {path} does not exist")
    if os.path.isdir(path):
        return _saved_model_as_keras(path), "saved_model", {}
    version = keras_version(path)
    keras2 = version is not None and not version.startswith("3.")
    saved_by = f"Keras {version}" if version else "an unrecorded Keras version"
    try:
        if version is not None:
            refuse_code_layers(read_model_config(path), path, keras2)
        if keras2:
            model, changes = load_keras2(path)
            return model, "keras" if zipfile.is_zipfile(path) else "h5", dict(changes)
        return keras.saving.load_model(path, compile=False, safe_mode=True), os.path.splitext(path)[1][1:], {}
    except PackagingError:
        raise
    except Keras2ConfigError as error:
        raise PackagingError(f"{path} was saved by {saved_by}: {error}") from error
    except Exception as error:  # noqa: BLE001 - every loading failure becomes one clear refusal
        advice = RESAVE_ADVICE if keras2 else "save the model again with this Keras version"
        if keys := describe_load_error(error):
            raise PackagingError(f"Keras {keras.__version__} cannot load {path} (saved by {saved_by}): "
                                 f"{keys}. To package it, {advice}") from error
        text = " ".join(str(error).split()).split(" Full object config:")[0]
        if len(text) > QUOTED_ERROR_CHARACTERS:
            text = text[:QUOTED_ERROR_CHARACTERS] + " ..."
        raise PackagingError(f"Keras {keras.__version__} cannot load {path} (saved by {saved_by}): "
                             f"{type(error).__name__}: {text}. To package it, {advice}") from error


def refuse_code_layers(config: dict, path: str, keras2: bool) -> None:
    """Raise ``PackagingError`` naming the layers of a serialised model (``config.json`` or a
    ``.h5``'s ``model_config``) that Keras would build only by running code: ``Lambda`` layers
    (Python code saved in the file) and classes that are not Keras's own layers nor registered
    (a custom class: the file holds its name and settings, not its code), or, in a Keras 2 file,
    a Keras 2 layer that Keras 3 removed. TensorFlow function layers of a Keras 2 file are left
    to ``model.keras2``, which translates or refuses them."""
    refused = []
    for layer in _layers(config):
        class_name = layer["class_name"]
        if class_name == "Lambda":
            refused.append((layer, LAMBDA))
        elif not (_is_known_layer(layer) or (keras2 and class_name in TF_FUNCTION_LAYERS)):
            removed = keras2 and str(layer.get("module") or "").startswith("keras.")
            refused.append((layer, REMOVED_IN_KERAS3 if removed else CUSTOM_CLASS))
    if not refused:
        return
    names = [f"'{layer['config'].get('name')}' ({layer['class_name']})" for layer, _ in refused]
    named = f"layer {names[0]}"
    if len(names) > 1:
        more = " ..." if len(names) > NAMED_LAYERS + 1 else ""
        named += f" (also {', '.join(names[1:NAMED_LAYERS + 1])}{more})"
    why = refused[0][1]
    if why == REMOVED_IN_KERAS3:
        raise PackagingError(f"{path}: {named} is {why.format(keras=keras.__version__)}. To package it, "
                             f"{RESAVE_ADVICE}")
    raise PackagingError(f"{path}: {named} is {why}, and petscore never runs code to load a model "
                         f"file (Keras safe_mode). {CODE_LAYER_ADVICE}")


def _layers(node: dict):
    """The model and every layer in it, nested models' and wrapped layers' (``TimeDistributed``,
    ``Bidirectional``) included, as their serialised ``{"class_name", "config", ...}`` dicts."""
    if not isinstance(node, dict) or not isinstance(node.get("config"), dict):
        return
    yield node
    config = node["config"]
    for child in config.get("layers") or []:
        yield from _layers(child)
    for key in ("layer", "backward_layer"):
        yield from _layers(config.get(key))


def _is_known_layer(layer: dict) -> bool:
    """A class Keras builds from a config alone: a Keras model or layer, or one registered
    with ``keras.saving.register_keras_serializable`` in this process (petscore's own)."""
    class_name = layer["class_name"]
    if class_name in MODEL_CLASSES or isinstance(getattr(keras.layers, class_name, None), type):
        return True
    return any(keras.saving.get_registered_object(name) is not None
               for name in (layer.get("registered_name"), class_name) if name)


def _saved_model_as_keras(path: str) -> keras.Model:
    """A SavedModel directory (``model.export``, ``tf.saved_model.save``, Keras 2's
    ``model.save``) as a Keras model: its ``serving_default`` signature in a ``TFSMLayer``."""
    import tensorflow as tf

    try:
        signature = tf.saved_model.load(path).signatures.get("serving_default")
    except (OSError, ValueError) as error:
        raise PackagingError(f"cannot load the SavedModel at {path}: {error}") from error
    if signature is None:
        raise PackagingError(f"{path} has no serving_default signature")
    _, inputs = signature.structured_input_signature
    if len(inputs) != 1 or len(signature.structured_outputs) != 1:
        raise PackagingError(f"{path}: serving_default takes {sorted(inputs)} and returns "
                             f"{sorted(signature.structured_outputs)}; one image input and one "
                             "output are needed")
    spec = next(iter(inputs.values()))
    image = keras.Input(shape=spec.shape.as_list()[1:], dtype=spec.dtype.name)
    outputs = keras.layers.TFSMLayer(path, call_endpoint="serving_default")(image)
    return keras.Model(image, next(iter(outputs.values())) if isinstance(outputs, dict) else outputs)
