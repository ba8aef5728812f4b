"""Keras 2 (tf.keras 2.x) ``.h5`` models, Teachable Machine's among them, package and score as
their own ``model.predict``; a Keras 2 file that Keras 3 cannot rebuild is refused naming the
layer, the key and what to do."""

from __future__ import annotations

import h5py
import keras
import numpy as np
import pytest
from keras import layers
from PIL import Image, ImageOps

from model import package
from model.keras2 import Keras2ConfigError, check_weights_loaded, translate_config
from model.notebook_model import load_notebook_model
from serving.metadata import file_sha256, read_metadata
from serving.preprocessing import PILLOW_FIT
from tests.model import notebook
from tests.model.keras2_files import layer_config, save_keras2_h5, save_keras215_zip
from tests.model.test_package import (
    TOLERANCE,
    assert_parity,
    package_cli,
    refused,
    score_packaged,
)


def mobilenet_like(size: int) -> keras.Model:
    """The layers of Teachable Machine's MobileNet base, few and narrow: ZeroPadding, Conv2D,
    BatchNormalization, ReLU(6), DepthwiseConv2D, global average pooling (1280 features there)."""
    image = keras.Input((size, size, 3), name="input_1")
    x = layers.ZeroPadding2D(((0, 1), (0, 1)), name="Conv1_pad")(image)
    x = layers.Conv2D(8, 3, strides=4, use_bias=False, name="Conv1")(x)
    x = layers.BatchNormalization(name="bn_Conv1")(x)
    x = layers.ReLU(6.0, name="Conv1_relu")(x)
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="expanded_conv_depthwise")(x)
    x = layers.BatchNormalization(name="expanded_conv_depthwise_BN")(x)
    x = layers.ReLU(6.0, name="out_relu")(x)
    return keras.Model(image, layers.GlobalAveragePooling2D(name="gap")(x), name="model1")


@pytest.fixture(scope="module")
def teachable_machine(tmp_path_factory) -> dict:
    """keras_model.h5 as Teachable Machine exports it: Sequential[MobileNet base, Sequential[
    Dense(100, relu), Dense(classes, softmax)]], 224x224, pixels cropped to a square and scaled
    x / 127.5 - 1 by its sample code, and labels.txt ("0 Cats")."""
    root = tmp_path_factory.mktemp("teachable")
    keras.utils.set_random_seed(7)
    base = mobilenet_like(224)
    # BatchNorm statistics as training leaves them, so the features do not vanish.
    for layer in base.layers:
        if isinstance(layer, layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(np.random.default_rng(1).normal(0, 0.5, channels))
            layer.moving_variance.assign(np.random.default_rng(2).uniform(0.5, 2, channels))
    head = keras.Sequential([keras.Input((8,)), layers.Dense(100, activation="relu"),
                             layers.Dense(2, activation="softmax", use_bias=False)], name="sequential_4")
    model = keras.Sequential([keras.Input((224, 224, 3)), base, head], name="sequential_5")
    path = str(root / "keras_model.h5")
    save_keras2_h5(model, path)
    labels = root / "labels.txt"
    labels.write_text("0 Cats\n1 Dogs\n")
    return {"root": root, "path": path, "labels": str(labels), "model": model}


def test_a_teachable_machine_model_with_its_labels_txt_scores_as_its_own_predict(
        teachable_machine, notebook_data, tmp_path):
    with h5py.File(teachable_machine["path"]) as handle:  # Keras 3 alone refuses the file
        assert '"groups": 1' in handle.attrs["model_config"]
    with pytest.raises(TypeError, match="could not be deserialized|Error when deserializing"):
        keras.saving.load_model(teachable_machine["path"], compile=False)

    model_dir = str(tmp_path / "tm")
    assert package_cli("--keras", teachable_machine["path"], "--labels", teachable_machine["labels"],
                       "--scaling", "tf", "--loader", "teachable-machine", "--output", model_dir) == 0
    metadata = read_metadata(model_dir)
    assert metadata.class_names == ["Cats", "Dogs"] and metadata.input_size == [224, 224]
    assert (metadata.preprocessing, metadata.resize_method) == (PILLOW_FIT, "lanczos")
    assert metadata.training["packaged_from"]["keras2_translations"] == {
        "DepthwiseConv2D: groups dropped": 1, "BatchNormalization: axis [n] -> n": 2,
        "Sequential: batch_input_shape of the first layer -> its InputLayer": 1}
    paths = notebook.image_paths(notebook_data["images"])
    expected = teachable_machine["model"].predict(teachable_machine_sample_pixels(paths) / 127.5 - 1,
                                                  verbose=0)
    for runtime in ("saved_model", "tflite"):
        scored = score_packaged(model_dir, notebook_data, str(tmp_path / runtime), runtime)
        assert_parity(scored, paths, expected, ["Cats", "Dogs"], TOLERANCE[runtime])


def teachable_machine_sample_pixels(paths: list[str], size: int = 224) -> np.ndarray:
    """What Teachable Machine's exported Python sample feeds model.predict, before scaling."""
    return np.stack([np.asarray(ImageOps.fit(Image.open(path).convert("RGB"), (size, size),
                                             Image.Resampling.LANCZOS), dtype=np.float32)
                     for path in paths])


def tf_keras_teachable_machine(tf_keras, size: int = 96):
    """Teachable Machine's shape (MobileNetV2 alpha 0.35 and a Dense head in nested Sequentials)
    built by tf-keras 2.21, the tf.keras 2.x line."""
    base = tf_keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=0.35, include_top=False,
                                             weights=None, pooling="avg")
    head = tf_keras.Sequential([tf_keras.layers.Dense(16, activation="relu", input_shape=(1280,)),
                                tf_keras.layers.Dense(2, activation="softmax")])
    return tf_keras.Sequential([base, head])


def tf_keras_transfer_tutorial(tf_keras):
    """TensorFlow's transfer learning tutorial built by tf-keras 2.21: an augmentation Sequential
    called in a functional model (its first call is node 1 in tf.keras 2), MobileNetV2's
    preprocess_input inside the model (x / 127.5 - 1, recorded as TFOpLambda layers), a base and a
    Dense head."""
    k2 = tf_keras.layers
    image = tf_keras.Input((32, 32, 3))
    x = tf_keras.Sequential([k2.RandomFlip("horizontal"), k2.RandomRotation(0.2)])(image)
    x = tf_keras.applications.mobilenet_v2.preprocess_input(x)
    x = k2.GlobalAveragePooling2D()(k2.Conv2D(4, 3, activation="relu")(x))
    return tf_keras.Model(image, k2.Dense(2, activation="softmax")(x))


def tf_keras_small_teachable_machine(tf_keras, size: int = 32):
    """Teachable Machine's layout (a functional base and a Dense head in nested Sequentials) with a
    base of two of MobileNet's blocks, whose BatchNormalization statistics are as training leaves
    them: a random MobileNetV2's features vanish (1e-10), this one's answers differ per image."""
    k2 = tf_keras.layers
    image = tf_keras.Input((size, size, 3))
    x = k2.ReLU(6.0)(k2.BatchNormalization()(k2.Conv2D(8, 3, strides=2, use_bias=False)(image)))
    x = k2.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    base = tf_keras.Model(image, k2.GlobalAveragePooling2D()(k2.ReLU(6.0)(k2.BatchNormalization()(x))))
    rng = np.random.default_rng(1)
    for layer in base.layers:
        if isinstance(layer, k2.BatchNormalization):
            gamma, beta, _, _ = layer.get_weights()
            layer.set_weights([gamma, beta, rng.normal(0, 0.5, 8), rng.uniform(0.5, 2, 8)])
    head = tf_keras.Sequential([k2.Dense(16, activation="relu", input_shape=(8,)),
                                k2.Dense(2, activation="softmax")])
    return tf_keras.Sequential([base, head])


TEACHABLE_MACHINE_CHANGES = {"DepthwiseConv2D: groups dropped": 17, "BatchNormalization: axis [n] -> n": 52,
                             "Sequential: batch_input_shape of the first layer -> its InputLayer": 1}
TRANSFER_TUTORIAL_CHANGES = {"nested Sequential: its first call's node index 1 -> 0": 1,
                             "RandomFlip: rng_type dropped": 1, "RandomRotation: rng_type dropped": 1,
                             "TFOpLambda math.truediv(x, y) -> Rescaling": 1,
                             "TFOpLambda math.subtract(x, y) -> Rescaling": 1}


def test_a_file_tf_keras_writes_predicts_as_it_does_under_tf_keras(tmp_path):
    """The real thing, not an edited config: Teachable Machine's shape saved by tf-keras 2.21."""
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras_teachable_machine(tf_keras)
    path = str(tmp_path / "keras_model.h5")
    model.save(path)
    images = np.random.default_rng(0).uniform(-1, 1, (4, 96, 96, 3)).astype("float32")
    loaded, _, changes = load_notebook_model(path)
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
    assert changes == TEACHABLE_MACHINE_CHANGES


def test_tensorflows_transfer_learning_tutorial_model_loads_and_its_scaling_is_found(tmp_path, capsys):
    """The tutorial's model saved by tf-keras 2.21 as .h5 predicts as under tf-keras, and
    --scaling tf would scale its pixels twice."""
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras_transfer_tutorial(tf_keras)
    path = str(tmp_path / "transfer.h5")
    model.save(path)
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    loaded, _, changes = load_notebook_model(path)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0),
                               atol=1e-6)  # x / 127.5 is computed as x * (1 / 127.5)
    assert changes == TRANSFER_TUTORIAL_CHANGES
    message = refused(capsys, str(tmp_path / "m"), "--keras", path, "--classes", "cat,dog", "--scaling", "tf")
    assert "input layer 'tf.math.truediv' (Rescaling(scale=0.00784313725490196, offset=0.0))" in message


def every_known_key_model() -> keras.Model:
    image = keras.Input((24, 24, 3), name="pixels")
    x = layers.SeparableConv2D(6, 3, name="separable")(image)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.Conv2DTranspose(4, 3, name="transposed")(x)
    x = layers.DepthwiseConv2D(3, name="depthwise")(x)
    x = layers.Conv2D(4, 3, name="conv")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(image, layers.Dense(3, activation="softmax", name="dense")(x))


def test_every_known_keras2_key_loads_with_the_models_own_predictions(tmp_path):
    keras.utils.set_random_seed(3)
    model = every_known_key_model()
    path = str(tmp_path / "every.h5")

    def older_keys(config):  # what older tf.keras versions also wrote
        layer_config(config, "dense")["dtype"] = {"class_name": "Policy", "config": {"name": "float32"}}
        layer_config(config, "conv")["kernel_initializer"] = {"class_name": "VarianceScaling", "config": {
            "scale": 1.0, "mode": "fan_avg", "distribution": "uniform", "seed": None, "dtype": "float32"}}

    save_keras2_h5(model, path, older_keys)
    loaded, source_format, changes = load_notebook_model(path)
    images = np.random.default_rng(0).uniform(0, 1, (4, 24, 24, 3)).astype("float32")
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
    assert source_format == "h5"
    assert changes == {
        "SeparableConv2D: groups dropped": 1, "SeparableConv2D: kernel_initializer dropped": 1,
        "SeparableConv2D: kernel_regularizer dropped": 1, "SeparableConv2D: kernel_constraint dropped": 1,
        "BatchNormalization: axis [n] -> n": 1,
        "Conv2DTranspose: groups dropped": 1, "DepthwiseConv2D: groups dropped": 1,
        "dtype policy Policy -> 'float32'": 1, "VarianceScaling initializer: dtype dropped": 1}


def test_a_mixed_precision_policy_becomes_its_keras3_name():
    config = {"class_name": "Dense", "config": {"name": "dense", "units": 2, "dtype": {
        "class_name": "Policy", "config": {"name": "mixed_float16"}}}}
    translated, changes = translate_config(config)
    assert translated["config"]["dtype"] == "mixed_float16"
    assert keras.layers.Dense.from_config(translated["config"]).dtype_policy.name == "mixed_float16"
    assert changes == {"dtype policy Policy -> 'mixed_float16'": 1}
    assert config["config"]["dtype"]["class_name"] == "Policy"  # the caller's config is untouched


def set_in(name: str, **keys):
    return lambda config: layer_config(config, name).update(keys)


def tf_function_layer(config):
    """tf.keras 2's record of ``tf.math.reduce_mean(x, axis=-1, keepdims=True)`` in a functional
    model: no Keras 3 layer computes it from the config."""
    config["config"]["layers"].insert(1, {
        "class_name": "TFOpLambda", "name": "tf.math.reduce_mean", "inbound_nodes": [
            ["pixels", 0, 0, {"axis": -1, "keepdims": True, "name": None}]],
        "config": {"name": "tf.math.reduce_mean", "trainable": True, "dtype": "float32",
                   "function": "math.reduce_mean"}})


@pytest.mark.parametrize("edit, message", [
    (set_in("depthwise", groups=2),
     "layer 'depthwise' (DepthwiseConv2D) has groups=2 (written by Keras 2's Conv base class"),
    (set_in("bn", virtual_batch_size=4),
     "layer 'bn' (BatchNormalization) has virtual_batch_size=4 (ghost batch normalisation"),
    (set_in("bn", renorm=True), "layer 'bn' (BatchNormalization) has renorm=True"),
    (set_in("dense", activation="hard_sigmoid"),
     "layer 'dense' (Dense) uses activation 'hard_sigmoid', which Keras 2 computes as clip(0.2 x + 0.5)"),
    (tf_function_layer, "layer 'tf.math.reduce_mean' (TFOpLambda) is a TensorFlow function call "
                        "(math.reduce_mean)"),
    (set_in("conv", kernel_quantizer="int4"),  # no translation known: Keras 3's own error, made plain
     "cannot load PATH (saved by Keras 2.15.0): layer 'conv' (Conv2D) has config keys Keras 3 does not "
     "accept: {'kernel_quantizer': 'int4'}. To package it, load the file in tf.keras 2"),
])
def test_a_keras2_file_keras3_cannot_rebuild_is_refused_naming_layer_key_and_what_to_do(
        tmp_path, capsys, edit, message):
    path = str(tmp_path / "model.h5")
    save_keras2_h5(every_known_key_model(), path, edit)
    text = refused(capsys, str(tmp_path / "m"), "--keras", path, "--classes", "a,b,c", "--scaling", "none")
    assert message.replace("PATH", path) in text
    assert "saved by Keras 2.15.0" in text and "pip install tf-keras" in text and "model.export(DIR)" in text


@pytest.mark.parametrize("text, names", [
    ("0 Cats\n1 Dogs\n", ["Cats", "Dogs"]),  # Teachable Machine
    ("\ufeff0 Golden Retriever\r\n1 Tabby cat\r\n\r\n", ["Golden Retriever", "Tabby cat"]),
    ("cat\ndog\n", ["cat", "dog"]),  # one name per line
    ("1 cat\ndog\n", ["1 cat", "dog"]),  # not every line numbered: the numbers are names
])
def test_labels_files_give_class_names_in_output_order(tmp_path, text, names):
    path = tmp_path / "labels.txt"
    path.write_bytes(text.encode())
    assert package.read_labels(str(path)) == names


def test_labels_numbered_out_of_order_are_refused(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("1 Dogs\n0 Cats\n")
    with pytest.raises(package.PackagingError, match=r"numbers its lines \[1, 0\], not 0 to 1 in order"):
        package.read_labels(str(path))


def test_the_users_file_is_not_modified(teachable_machine):
    before = file_sha256(teachable_machine["path"])
    load_notebook_model(teachable_machine["path"])
    assert file_sha256(teachable_machine["path"]) == before


KERAS215_FUNCTIONAL = "Functional: module keras.src.engine.functional -> keras.src.models.functional"
SMALL_TEACHABLE_MACHINE_CHANGES = {
    "DepthwiseConv2D: groups dropped": 1, "BatchNormalization: axis [n] -> n": 2,
    "Sequential: batch_input_shape of the first layer -> its InputLayer": 1}


@pytest.fixture(scope="module")
def keras215_zip(tmp_path_factory) -> dict:
    """Teachable Machine's layout at 32x32 in a .keras zip as Keras 2.15 writes it, and the tf-keras
    model it was saved from (its predictions are the file's own)."""
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras_small_teachable_machine(tf_keras)
    path = str(tmp_path_factory.mktemp("keras215") / "keras_model.keras")
    save_keras215_zip(model, path)
    return {"model": model, "path": path}


@pytest.mark.parametrize("writer", ["keras 2.15", "tf-keras 2.21", "keras 2.15 transfer tutorial"])
def test_a_keras2_keras_zip_loads_on_a_copy_with_the_predictions_it_has_under_keras2(
        keras215_zip, tmp_path, writer):
    """keras#19089: Keras 3 alone refuses the zip (the module of Functional); translated, the
    model predicts as under tf-keras, the file unchanged."""
    tf_keras = pytest.importorskip("tf_keras")
    low, high = -1, 1  # Teachable Machine's pixels, scaled
    if writer == "keras 2.15":
        model, path, expected = keras215_zip["model"], keras215_zip["path"], {
            **SMALL_TEACHABLE_MACHINE_CHANGES, KERAS215_FUNCTIONAL: 1}
    elif writer == "tf-keras 2.21":
        model, path = keras215_zip["model"], str(tmp_path / "tf_keras.keras")
        model.save(path)
        expected = {**SMALL_TEACHABLE_MACHINE_CHANGES,
                    "Functional: module tf_keras.src.engine.functional -> keras.src.models.functional": 1}
    else:
        model, path = tf_keras_transfer_tutorial(tf_keras), str(tmp_path / "transfer.keras")
        save_keras215_zip(model, path)
        expected = {**TRANSFER_TUTORIAL_CHANGES, KERAS215_FUNCTIONAL: 1}
        low, high = 0, 255  # it scales them inside
    with pytest.raises(TypeError, match="class 'Functional'"):
        keras.saving.load_model(path, compile=False)
    before = file_sha256(path)
    loaded, source_format, changes = load_notebook_model(path)
    images = np.random.default_rng(0).uniform(low, high, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0),
                               atol=1e-6)  # x / 127.5 is computed as x * (1 / 127.5)
    assert np.ptp(model.predict(images, verbose=0)[:, 1]) > 1e-6, "the model answers every image alike"
    assert (source_format, changes, file_sha256(path)) == ("keras", expected, before)


def test_a_keras215_zip_packages_and_scores_as_its_own_predict(keras215_zip, notebook_data, tmp_path):
    model_dir = str(tmp_path / "tm")
    assert package_cli("--keras", keras215_zip["path"], "--classes", "Cats,Dogs", "--scaling", "tf",
                       "--loader", "teachable-machine", "--output", model_dir) == 0
    origin = read_metadata(model_dir).training["packaged_from"]
    assert origin["format"] == "keras"
    assert origin["keras2_translations"] == {**SMALL_TEACHABLE_MACHINE_CHANGES, KERAS215_FUNCTIONAL: 1}
    paths = notebook.image_paths(notebook_data["images"])
    pixels = teachable_machine_sample_pixels(paths, size=32)
    expected = keras215_zip["model"].predict(pixels / 127.5 - 1, verbose=0)
    scored = score_packaged(model_dir, notebook_data, str(tmp_path / "scored"), "saved_model")
    assert_parity(scored, paths, expected, ["Cats", "Dogs"], TOLERANCE["saved_model"])


def removed_in_keras3(config):
    """The layer called 'flatten' as a Keras 2 layer Keras 3 removed."""
    node = next(layer for layer in config["config"]["layers"] if layer["config"]["name"] == "flatten")
    node["class_name"] = "LocallyConnected2D"


@pytest.mark.parametrize("edit, message", [
    (set_in("depthwise", groups=2), "PATH was saved by Keras 2.15.0: layer 'depthwise' (DepthwiseConv2D) "
                                    "has groups=2"),
    (removed_in_keras3, "PATH: layer 'flatten' (LocallyConnected2D) is a Keras 2 layer that Keras "
                        f"{keras.__version__} does not have. To package it, load the file in tf.keras 2"),
], ids=["groups", "removed layer"])
def test_a_keras215_zip_keras3_cannot_rebuild_is_refused_saying_what_to_do(tmp_path, capsys, edit, message):
    tf_keras = pytest.importorskip("tf_keras")
    k2 = tf_keras.layers
    model = tf_keras.Sequential([tf_keras.Input((8, 8, 3)), k2.DepthwiseConv2D(3, name="depthwise"),
                                 k2.Flatten(name="flatten"), k2.Dense(2, activation="softmax")])
    path = str(tmp_path / "model.keras")
    save_keras215_zip(model, path, edit)
    text = refused(capsys, str(tmp_path / "m"), "--keras", path, "--classes", "a,b", "--scaling", "none")
    assert message.replace("PATH", path) in text
    assert "pip install tf-keras" in text and "model.export(DIR)" in text


def test_weights_keras3_did_not_read_from_the_file_are_refused_naming_one(keras215_zip):
    loaded, _, _ = load_notebook_model(keras215_zip["path"])
    check_weights_loaded(loaded, keras215_zip["path"])  # as loaded: every weight is the file's
    kernel = loaded.layers[-1].layers[-1].kernel
    kernel.assign(kernel.numpy() + 1)  # as if Keras 3 had left it as initialised
    with pytest.raises(Keras2ConfigError, match=rf"1 of the model's {len(loaded.weights)} weights are not "
                       rf"the file's \(first: {kernel.path}\) and 1 of the file's \d+ arrays were not read "
                       r"\(first: layers/sequential/layers/dense_1/vars/0\)"):
        check_weights_loaded(loaded, keras215_zip["path"])
