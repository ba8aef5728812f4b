"""The user's side: four models built, trained, saved and scored the way common Keras tutorials
do it, with nothing from petscore. ``model.package`` must reproduce these notebooks' own
``model.predict`` scores.

Kept small (tiny inputs, a few steps of training on generated images) so the suite stays fast;
the shapes of the code are the tutorials'.
"""

from __future__ import annotations

import os

import keras
import numpy as np
from keras import layers
from keras.applications import mobilenet, resnet50

# Keras 3 keeps the classic generator here (tf.keras / Keras 2 notebooks import it publicly).
from keras.src.legacy.preprocessing.image import ImageDataGenerator


def train_folder(generator: ImageDataGenerator, folder: str, size: tuple[int, int], class_mode: str):
    return generator.flow_from_directory(folder, target_size=size, batch_size=8, class_mode=class_mode,
                                         shuffle=True, seed=1)


def predict_folder(generator: ImageDataGenerator, folder: str, size: tuple[int, int],
                   model: keras.Model) -> tuple[list[str], np.ndarray]:
    """The notebook's test loop: flow_from_directory over a folder of one sub-folder, in order."""
    flow = generator.flow_from_directory(folder, target_size=size, batch_size=8, class_mode=None,
                                         shuffle=False)
    paths = [os.path.join(folder, name) for name in flow.filenames]
    return paths, model.predict(flow, verbose=0)


def small_cnn(size: tuple[int, int], head: layers.Layer) -> keras.Model:
    return keras.Sequential([
        keras.Input(shape=(*size, 3)),
        layers.Conv2D(8, 3, activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(16, 3, activation="relu"), layers.MaxPooling2D(),
        layers.Flatten(), layers.Dense(16, activation="relu"), head,
    ])


def fit_and_save(model: keras.Model, generator: ImageDataGenerator, train_dir: str, size, class_mode: str,
                 path: str, epochs: int = 1) -> keras.Model:
    """compile, fit on flow_from_directory, model.save(path): the notebook's last cells."""
    loss = "binary_crossentropy" if class_mode == "binary" else "categorical_crossentropy"
    model.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    model.fit(train_folder(generator, train_dir, size, class_mode), epochs=epochs, verbose=0)
    model.save(path)
    return model


def kind1_binary_cnn(train_dir: str, path: str, size=(150, 150), epochs: int = 1) -> keras.Model:
    """CNN from scratch, rescale 1/255, class_mode binary, Dense(1, sigmoid), saved as .h5."""
    return fit_and_save(small_cnn(size, layers.Dense(1, activation="sigmoid")),
                        ImageDataGenerator(rescale=1. / 255), train_dir, size, "binary", path, epochs)


def kind2_softmax_cnn(train_dir: str, path: str, size=(224, 224), epochs: int = 1) -> keras.Model:
    """CNN from scratch, rescale 1/255, class_mode categorical, Dense(2, softmax), saved as .keras."""
    return fit_and_save(small_cnn(size, layers.Dense(2, activation="softmax")),
                        ImageDataGenerator(rescale=1. / 255), train_dir, size, "categorical", path, epochs)


def kind3_mobilenet_transfer(train_dir: str, path: str, size=(128, 128)) -> keras.Model:
    """Frozen MobileNet + GlobalAveragePooling + Dense(2, softmax), preprocess_input outside the
    model (ImageDataGenerator's preprocessing_function), saved as .h5. The base is random with
    BatchNorm statistics estimated from the training images, standing in for ImageNet weights
    (offline), so that its features do not vanish."""
    from model.architecture import calibrate_batchnorm

    base = mobilenet.MobileNet(input_shape=(*size, 3), alpha=0.25, include_top=False, weights=None)
    calibrate_batchnorm("mobilenet", base, load_batch(image_paths(train_dir), size))
    base.trainable = False
    model = keras.Sequential([base, layers.GlobalAveragePooling2D(), layers.Dense(2, activation="softmax")])
    return fit_and_save(model, ImageDataGenerator(preprocessing_function=mobilenet.preprocess_input),
                        train_dir, size, "categorical", path)


def image_paths(folder: str) -> list[str]:
    return sorted(os.path.join(root, name) for root, _, files in os.walk(folder) for name in files)


def load_batch(paths: list[str], size: tuple[int, int]) -> np.ndarray:
    """``load_img`` + ``img_to_array`` per file, the classic single-image loop."""
    return np.stack([keras.utils.img_to_array(keras.utils.load_img(p, target_size=size)) for p in paths])


def kind4_bottleneck_head(paths: list[str], base: keras.Model, classes: int, path: str,
                          seed: int = 0) -> keras.Model:
    """Features of a ResNet50 base computed once (caffe preprocess_input), then a small head
    trained on them alone and saved alone (GlobalAveragePooling2D + Dense(classes, softmax))."""
    size = tuple(base.input_shape[1:3])
    features = base.predict(resnet50.preprocess_input(load_batch(paths, size)), verbose=0)
    labels = np.random.default_rng(seed).integers(0, classes, len(paths))
    head = keras.Sequential([
        layers.GlobalAveragePooling2D(input_shape=features.shape[1:]),
        layers.Dense(classes, activation="softmax"),
    ])
    head.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    head.fit(features, labels, epochs=2, verbose=0)
    head.save(path)
    return head


def predict_bottleneck(paths: list[str], base: keras.Model, head: keras.Model) -> np.ndarray:
    size = tuple(base.input_shape[1:3])
    features = base.predict(resnet50.preprocess_input(load_batch(paths, size)), verbose=0)
    return head.predict(features, verbose=0)
