"""Parity and speed of notebook-trained models scored by petscore, on real labelled photos.

For each notebook kind (1-4: tests/model/notebook.py builds them the tutorials' way; 5: a
Teachable Machine model, MobileNet + Dense head, written by tf-keras 2.21 as keras_model.h5 with
labels.txt, its predictions those of Teachable Machine's Python sample; 6: Keras's image
classification tutorial, Rescaling(1./255) inside the model, packaged with --scaling none, and
what --scaling 1/255 --allow-double-scaling would score):
train on part of the photos, save, predict the held-out photos with the notebook's own loop
(ImageDataGenerator / load_img + model.predict), package with ``model.package``, score the same
photos with ``pipeline.score`` on both runtimes, and report the largest probability difference,
decisions flipped, accuracy and images/s. The same model packaged with petscore's own loader
shows the skew the notebook's loader avoids.

    python bench/notebook_parity.py --photos ../shared/data/real-photos \
        --mobilenet-weights ../shared/data/weights/mobilenet_2_5_224_tf_no_top.h5 --work /tmp/parity
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras.applications import mobilenet, resnet50  # noqa: E402
from keras.src.legacy.preprocessing.image import ImageDataGenerator  # noqa: E402

from model import package  # noqa: E402
from model.architecture import calibrate_batchnorm  # noqa: E402
from pipeline import score  # noqa: E402
from tests.model import notebook  # noqa: E402
from tests.pipeline.outputs import read_parquet_shards  # noqa: E402


def link_split(photos: str, work: str, train_per_class: int, test_per_class: int) -> dict:
    """Symlinks: work/train/{cat,dog}/ and work/test/all/ (held out), never copies."""
    split = {"train": os.path.join(work, "train"), "test": os.path.join(work, "test")}
    labels = {}
    for label, name in enumerate(("cat", "dog")):
        files = sorted(os.listdir(os.path.join(photos, name)), key=lambda f: int(f.split(".")[1]))
        for i, file in enumerate(files[:train_per_class + test_per_class]):
            folder = (os.path.join(split["train"], name) if i < train_per_class
                      else os.path.join(split["test"], "all"))
            os.makedirs(folder, exist_ok=True)
            target = os.path.join(folder, file)
            if not os.path.exists(target):
                os.symlink(os.path.abspath(os.path.join(photos, name, file)), target)
            if i >= train_per_class:
                labels[file] = label
    return {**split, "labels": labels}


def notebook_loop(model_fn, paths: list[str]) -> tuple[np.ndarray, float]:
    started = time.monotonic()
    probabilities = model_fn()
    return probabilities, len(paths) / (time.monotonic() - started)


def score_run(model_dir: str, images: str, output: str, runtime: str) -> tuple[dict, float]:
    started = time.monotonic()
    assert score.main(["--input", os.path.join(images, "*.jpg"), "--model-dir", model_dir, "--output",
                       output, "--runtime", runtime, "--overwrite"]) == 0
    seconds = time.monotonic() - started
    rows = read_parquet_shards(os.path.join(output, "predictions")).to_pylist()
    return {os.path.basename(r["path"]): [r["prob_cat"], r["prob_dog"]] for r in rows}, len(rows) / seconds


def compare(name: str, paths: list[str], want: np.ndarray, got: dict, labels: dict) -> dict:
    files = [os.path.basename(p) for p in paths]
    have = np.array([got[f] for f in files])
    truth = np.array([labels[f] for f in files])
    return {"kind": name, "images": len(files),
            "max_abs_diff": float(np.max(np.abs(have - want))),
            "mean_abs_diff": float(np.mean(np.abs(have - want))),
            "decisions_flipped": int(np.sum(np.argmax(have, 1) != np.argmax(want, 1))),
            "accuracy_notebook": float(np.mean(np.argmax(want, 1) == truth)),
            "accuracy_petscore": float(np.mean(np.argmax(have, 1) == truth))}


def teachable_machine(args, split: dict) -> tuple[str, str, object]:
    """keras_model.h5 and labels.txt as Teachable Machine exports them, written by tf-keras 2.21
    (tf.keras 2.x): Sequential[MobileNet (ImageNet, frozen, average pooled), Sequential[
    Dense(100, relu), Dense(2, softmax)]], the head trained on the photos as its sample code
    feeds them (ImageOps.fit to 224, LANCZOS, x / 127.5 - 1); and that sample's predictions."""
    import tf_keras  # requirements-dev.txt
    from PIL import Image, ImageOps

    def sample_pixels(paths):
        return np.stack([np.asarray(ImageOps.fit(Image.open(p).convert("RGB"), (224, 224),
                                                 Image.Resampling.LANCZOS), dtype=np.float32)
                         for p in paths]) / 127.5 - 1

    base = tf_keras.applications.MobileNet(input_shape=(224, 224, 3), alpha=0.25, include_top=False,
                                           weights=None, pooling="avg")
    base.load_weights(args.mobilenet_weights)
    base.trainable = False
    train_paths = notebook.image_paths(split["train"])
    features = base.predict(sample_pixels(train_paths), batch_size=32, verbose=0)
    labels = np.array([0 if "/cat/" in p else 1 for p in train_paths])
    head = tf_keras.Sequential([tf_keras.layers.Dense(100, activation="relu", input_shape=features.shape[1:]),
                                tf_keras.layers.Dense(2, activation="softmax", use_bias=False)])
    head.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    head.fit(features, labels, epochs=args.epochs * 5, verbose=0)
    model = tf_keras.Sequential([base, head])
    path = os.path.join(args.work, "keras_model.h5")
    model.save(path)
    labels_path = os.path.join(args.work, "labels.txt")
    with open(labels_path, "w") as handle:
        handle.write("0 cat\n1 dog\n")
    test_paths = notebook.image_paths(split["test"])
    return path, labels_path, lambda: model.predict(sample_pixels(test_paths), batch_size=32, verbose=0)


def tutorial_rescaling_cnn(train_dir: str, path: str, epochs: int) -> keras.Model:
    """Keras's image classification tutorial: augmentation and Rescaling(1./255) inside the model,
    raw pixels fed by the generator, saved as .keras."""
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((128, 128, 3)), layers.RandomFlip("horizontal"), layers.Rescaling(1. / 255),
        layers.Conv2D(16, 3, activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(64, 3, activation="relu"), layers.GlobalAveragePooling2D(),
        layers.Dense(2, activation="softmax")])
    return notebook.fit_and_save(model, ImageDataGenerator(), train_dir, (128, 128), "categorical", path,
                                 epochs * 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", required=True, help="Folder with cat/ and dog/ sub-folders.")
    parser.add_argument("--mobilenet-weights", required=True,
                        help="MobileNet alpha 0.25 no-top weights file.")
    parser.add_argument("--work", required=True)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--kinds", default="1,2,3,4,5,6")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    split = link_split(args.photos, args.work, args.train_per_class, args.test_per_class)
    images = os.path.join(split["test"], "all")
    results = []

    def measure(kind, model_path, package_args, predict, loaders=("keras", "petscore"),
                classes=("--classes", "cat,dog")):
        """The first loader is the notebook's (both runtimes), the second shows the skew."""
        paths = notebook.image_paths(split["test"])
        want, notebook_rate = notebook_loop(predict, paths)
        if want.shape[1] == 1:
            want = np.hstack([1 - want, want])
        for loader in loaders:
            model_dir = os.path.join(args.work, f"kind{kind}-{loader}-{len(results)}")
            assert package.main(["--keras", model_path, "--output", model_dir, *classes,
                                 "--loader", loader, *package_args]) == 0
            for runtime in (("saved_model", "tflite") if loader == loaders[0] else ("tflite",)):
                output = os.path.join(args.work, f"out{kind}-{loader}-{runtime}")
                got, rate = score_run(model_dir, images, output, runtime)
                row = {**compare(f"kind {kind}", paths, want, got, split["labels"]), "loader": loader,
                       "runtime": runtime, "petscore_images_per_s": round(rate, 1),
                       "notebook_images_per_s": round(notebook_rate, 1)}
                print(json.dumps(row), flush=True)
                results.append(row)

    kinds = set(args.kinds.split(","))
    rescale = ImageDataGenerator(rescale=1. / 255)
    for kind, build, file, size in ((1, notebook.kind1_binary_cnn, "best_model.h5", (150, 150)),
                                    (2, notebook.kind2_softmax_cnn, "model2.keras", (224, 224))):
        if str(kind) in kinds:
            path = os.path.join(args.work, file)
            model = build(split["train"], path, size, args.epochs)
            measure(kind, path, ["--scaling", "1/255"],
                    lambda: notebook.predict_folder(rescale, split["test"], size, model)[1])
    if "3" in kinds:
        path = os.path.join(args.work, "model3.h5")
        base = mobilenet.MobileNet(input_shape=(224, 224, 3), alpha=0.25, include_top=False, weights=None)
        base.load_weights(args.mobilenet_weights)
        base.trainable = False
        model = keras.Sequential([base, keras.layers.GlobalAveragePooling2D(),
                                  keras.layers.Dense(2, activation="softmax")])
        generator = ImageDataGenerator(preprocessing_function=mobilenet.preprocess_input)
        notebook.fit_and_save(model, generator, split["train"], (224, 224), "categorical", path, args.epochs)
        measure(3, path, ["--scaling", "tf"],
                lambda: notebook.predict_folder(generator, split["test"], (224, 224), model)[1])
    if "4" in kinds:
        base = resnet50.ResNet50(include_top=False, weights=None, input_shape=(224, 224, 3))
        train_paths = notebook.image_paths(split["train"])
        chosen = np.random.default_rng(0).choice(len(train_paths), 64, replace=False)
        sample = [train_paths[i] for i in chosen]
        calibrate_batchnorm("resnet50", base, notebook.load_batch(sample, (224, 224)))
        weights = os.path.join(args.work, "resnet50_random_notop.weights.h5")
        base.save_weights(weights)
        features = base.predict(resnet50.preprocess_input(notebook.load_batch(train_paths, (224, 224))),
                                batch_size=32, verbose=0)
        labels = np.array([0 if "/cat/" in p else 1 for p in train_paths])
        head = keras.Sequential([keras.Input(features.shape[1:]), keras.layers.GlobalAveragePooling2D(),
                                 keras.layers.Dense(2, activation="softmax")])
        head.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        head.fit(features, labels, epochs=10, verbose=0)
        path = os.path.join(args.work, "bottleneck_head.h5")
        head.save(path)
        measure(4, path, ["--feature-extractor", "resnet50", "--feature-weights", weights],
                lambda: notebook.predict_bottleneck(notebook.image_paths(split["test"]), base, head))
    if "5" in kinds:
        path, labels, predict = teachable_machine(args, split)
        measure(5, path, ["--scaling", "tf"], predict, loaders=("teachable-machine", "keras"),
                classes=("--labels", labels))
    if "6" in kinds:
        path = os.path.join(args.work, "model6.keras")
        model = tutorial_rescaling_cnn(split["train"], path, args.epochs)
        predict = lambda: notebook.predict_folder(ImageDataGenerator(), split["test"], (128, 128),  # noqa: E731
                                                  model)[1]
        measure(6, path, ["--scaling", "none"], predict)
        refused = package.main(["--keras", path, "--output", os.path.join(args.work, "kind6-twice"),
                                "--classes", "cat,dog", "--scaling", "1/255"])
        print(json.dumps({"kind": "kind 6", "scaling": "1/255", "exit_code": refused}), flush=True)
        measure(6, path, ["--scaling", "1/255", "--allow-double-scaling"], predict, loaders=("keras",))
    with open(os.path.join(args.work, "parity.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
