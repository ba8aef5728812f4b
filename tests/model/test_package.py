"""Notebook-trained models packaged with ``python -m model.package`` and scored through the real
CLI equal the notebook's own ``model.predict``; every refusal happens before anything is written."""

from __future__ import annotations

import csv
import json
import os

import keras
import numpy as np
import pytest
from keras import layers
from keras.src.legacy.preprocessing.image import ImageDataGenerator

from model import package
from model.architecture import calibrate_batchnorm
from model.export import TFLITE_TOLERANCE
from model.notebook_model import load_notebook_model
from pipeline import score
from serving.metadata import read_metadata
from serving.preprocessing import KERAS_LOAD_IMG
from serving.reference import reference_batch
from serving.runtimes import ServingModel
from tests.backends import BACKENDS, DEEP_RANDOM_BASE, saved_model_gap, score_on_backend
from tests.model import notebook
from tests.pipeline.outputs import read_run

TOLERANCE = {"saved_model": 1e-5, "tflite": TFLITE_TOLERANCE, "keras": 1e-5}
BREEDS = [f"breed_{i:03d}" for i in range(133)]


def score_packaged(model_dir: str, data: dict, output: str, runtime: str, *extra: str) -> dict:
    """The real CLI on the notebook's test images; returns ``{file name: row}`` and the run."""
    code = score.main(["--input", os.path.join(data["images"], "*"), "--model-dir", model_dir,
                       "--output", output, "--runtime", runtime, *extra])
    assert code == 0
    run = read_run(output)
    assert run["summary"]["errors"] == 0
    return {"rows": {os.path.basename(r["path"]): r for r in run["predictions"].to_pylist()}, "run": run}


def assert_parity(scored: dict, paths: list[str], expected: np.ndarray, class_names: list[str],
                  tolerance: float) -> None:
    rows = scored["rows"]
    assert sorted(rows) == sorted(os.path.basename(p) for p in paths)
    got = np.array([[rows[os.path.basename(p)][f"prob_{c}"] for c in class_names] for p in paths])
    assert np.max(np.abs(got - expected)) <= tolerance
    assert [rows[os.path.basename(p)]["predicted_class"] for p in paths] == \
        [class_names[i] for i in np.argmax(expected, axis=1)]
    assert np.ptp(expected[:, -1]) > 1e-6, "the notebook model answers every image alike"


def package_cli(*argv: str) -> int:
    return package.main(list(argv))


@pytest.fixture(scope="module")
def kind1(notebook_data):
    """Binary CNN (Dense(1, sigmoid)), rescale 1/255, best_model.h5."""
    path = str(notebook_data["root"] / "best_model.h5")
    model = notebook.kind1_binary_cnn(notebook_data["train"], path)
    paths, dog = notebook.predict_folder(ImageDataGenerator(rescale=1. / 255), notebook_data["test"],
                                         (150, 150), model)
    model_dir = str(notebook_data["root"] / "kind1")
    assert package_cli("--keras", path, "--output", model_dir, "--classes-from", notebook_data["train"],
                       "--scaling", "1/255", "--model-version", "kind1") == 0
    return {"model_dir": model_dir, "paths": paths, "expected": np.hstack([1 - dog, dog])}


@pytest.mark.parametrize("runtime", ["saved_model", "tflite", "keras"])
def test_kind1_binary_h5_scores_as_the_notebook(kind1, notebook_data, tmp_path, runtime):
    scored = score_packaged(kind1["model_dir"], notebook_data, str(tmp_path / "out"), runtime)
    assert_parity(scored, kind1["paths"], kind1["expected"], ["cat", "dog"], TOLERANCE[runtime])
    # The Kaggle CSV's label is P(dog) = the sigmoid output, for the integer-named images.
    expected_dog = {os.path.basename(p)[:-4]: e[1] for p, e in zip(kind1["paths"], kind1["expected"],
                                                                    strict=True)}
    csv_rows = scored["run"]["csv"]
    assert csv_rows[0] == ["id", "label"] and len(csv_rows) == 1 + 8
    for image_id, label in csv_rows[1:]:
        assert float(label) == pytest.approx(expected_dog[image_id], abs=TOLERANCE[runtime] + 1e-6)


def test_kind1_metadata_records_the_notebook_loader_and_scaling(kind1):
    metadata = read_metadata(kind1["model_dir"])
    assert metadata.preprocessing == KERAS_LOAD_IMG and metadata.resize_method == "nearest"
    assert metadata.input_size == [150, 150] and metadata.class_names == ["cat", "dog"]
    origin = metadata.training["packaged_from"]
    assert origin["format"] == "h5" and origin["scaling"] == "1/255" and origin["output"] == "sigmoid"
    assert len(origin["sha256"]) == 64 and metadata.tflite is not None
    assert os.path.exists(os.path.join(kind1["model_dir"], "model.keras"))


@pytest.fixture(scope="module")
def kind2(notebook_data):
    """CNN from scratch, rescale 1/255, Dense(2, softmax), model.keras."""
    path = str(notebook_data["root"] / "model.keras")
    # Seeded: one epoch from an unlucky initialisation leaves every ReLU dead and the model
    # answering every image alike, which depended on the tests that ran before.
    keras.utils.set_random_seed(2)
    model = notebook.kind2_softmax_cnn(notebook_data["train"], path)
    paths = notebook.image_paths(notebook_data["images"])
    expected = model.predict(notebook.load_batch(paths, (224, 224)) / 255., verbose=0)
    model_dir = str(notebook_data["root"] / "kind2")
    assert package_cli("--keras", path, "--output", model_dir, "--classes", "cat,dog",
                       "--scaling", "1/255") == 0
    return {"model_dir": model_dir, "paths": paths, "expected": expected}


@pytest.mark.parametrize("runtime", ["saved_model", "tflite"])
def test_kind2_softmax_keras_file_scores_as_the_notebook(kind2, notebook_data, tmp_path, runtime):
    scored = score_packaged(kind2["model_dir"], notebook_data, str(tmp_path / "out"), runtime)
    assert_parity(scored, kind2["paths"], kind2["expected"], ["cat", "dog"], TOLERANCE[runtime])


@pytest.fixture(scope="module")
def kind3(notebook_data):
    """Frozen MobileNet + GlobalAveragePooling + Dense(2, softmax), preprocess_input outside, .h5."""
    path = str(notebook_data["root"] / "mobilenet_transfer.h5")
    model = notebook.kind3_mobilenet_transfer(notebook_data["train"], path)
    generator = ImageDataGenerator(preprocessing_function=keras.applications.mobilenet.preprocess_input)
    paths, expected = notebook.predict_folder(generator, notebook_data["test"], (128, 128), model)
    model_dir = str(notebook_data["root"] / "kind3")
    assert package_cli("--keras", path, "--output", model_dir, "--classes-from", notebook_data["train"],
                       "--scaling", "tf") == 0
    return {"model_dir": model_dir, "paths": paths, "expected": expected}


def test_kind3_mobilenet_transfer_h5_with_preprocess_input_scores_as_the_notebook(kind3, notebook_data,
                                                                                   tmp_path):
    for runtime in ("saved_model", "tflite"):
        scored = score_packaged(kind3["model_dir"], notebook_data, str(tmp_path / runtime), runtime)
        assert_parity(scored, kind3["paths"], kind3["expected"], ["cat", "dog"], TOLERANCE[runtime])


@pytest.fixture(scope="module")
def kind4(notebook_data):
    """133 dog breeds on ResNet50 features (random base, BatchNorm calibrated, its weights file
    as the user has it): a bottleneck head saved alone, packaged behind its feature extractor."""
    root = notebook_data["root"]
    keras.utils.set_random_seed(3)
    base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    train_paths = notebook.image_paths(notebook_data["train"])
    calibrate_batchnorm("resnet50", base, notebook.load_batch(train_paths, (64, 64)))
    weights = str(root / "resnet50_notop.weights.h5")
    base.save_weights(weights)
    head_path = str(root / "bottleneck_head.h5")
    head = notebook.kind4_bottleneck_head(train_paths, base, len(BREEDS), head_path)
    paths = notebook.image_paths(notebook_data["images"])
    expected = notebook.predict_bottleneck(paths, base, head)
    model_dir = str(root / "kind4")
    assert package_cli("--keras", head_path, "--feature-extractor", "resnet50", "--feature-weights",
                       weights, "--input-size", "64", "--classes", ",".join(BREEDS),
                       "--output", model_dir) == 0  # --scaling: resnet50's own (caffe)
    return {"model_dir": model_dir, "paths": paths, "expected": expected}


def test_kind4_bottleneck_head_behind_a_resnet50_scores_as_the_notebook(kind4, notebook_data, tmp_path):
    """Multi-class CSV with hex-like ids and top-5 columns."""
    paths, expected, model_dir = kind4["paths"], kind4["expected"], kind4["model_dir"]
    assert read_metadata(model_dir).training["packaged_from"]["scaling"] == "caffe"
    scored = score_packaged(model_dir, notebook_data, str(tmp_path / "out"), "saved_model")
    assert_parity(scored, paths, expected, BREEDS, TOLERANCE["saved_model"])
    for path, want in zip(paths, expected, strict=True):
        row = scored["rows"][os.path.basename(path)]
        # The five most probable, most probable first (near-ties may swap within the tolerance).
        np.testing.assert_allclose(row["top_probabilities"], np.sort(want)[::-1][:5], atol=1e-5)
        np.testing.assert_allclose([want[BREEDS.index(name)] for name in row["top_classes"]],
                                   row["top_probabilities"], atol=1e-5)
        assert row["top_classes"][0] == row["predicted_class"]
    csv_rows = scored["run"]["csv"]
    assert csv_rows[0] == ["id", *BREEDS] and len(csv_rows) == 1 + len(paths)
    assert [r[0] for r in csv_rows[1:]] == sorted(os.path.splitext(os.path.basename(p))[0] for p in paths)
    # The CSV holds the Parquet probabilities to 6 significant digits; those are the notebook's
    # within TOLERANCE (checked above), which a relative bound on the CSV alone would tighten.
    scored_by_stem = {os.path.splitext(name)[0]: [row[f"prob_{breed}"] for breed in BREEDS]
                      for name, row in scored["rows"].items()}
    for row in csv_rows[1:]:
        np.testing.assert_allclose([float(v) for v in row[1:]], scored_by_stem[row[0]], rtol=5e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_packaged_kind_scores_on_another_keras_backend_as_on_the_saved_model(
        backend, kind1, kind2, kind3, kind4, notebook_data, tmp_path):
    """The four kinds' model.keras, custom layers and all (NotebookScaling with and without
    weights, CaffePreprocess, SigmoidToTwoClasses), through the real CLI with --runtime keras on
    JAX's CPU (PyTorch where installed), without TensorFlow, against the SavedModel on the same
    images: within 1e-5 for the two small CNNs; within DEEP_RANDOM_BASE for the random MobileNet
    and ResNet50 bases, where float32 rounding differences grow layer by layer (docs/gpu.md)."""
    kinds = {"kind1": kind1, "kind2": kind2, "kind3": kind3, "kind4": kind4}
    outputs = {name: str(tmp_path / name) for name in kinds}
    ran = score_on_backend(backend, [
        ["--input", os.path.join(notebook_data["images"], "*"), "--model-dir", kind["model_dir"],
         "--output", outputs[name], "--runtime", "keras"] for name, kind in kinds.items()])
    assert ran == {"backend": backend, "codes": [0] * len(kinds)}
    gaps = {name: saved_model_gap(outputs[name], kind["model_dir"]) for name, kind in kinds.items()}
    tolerance = {"kind1": TOLERANCE["keras"], "kind2": TOLERANCE["keras"], "kind3": DEEP_RANDOM_BASE,
                 "kind4": DEEP_RANDOM_BASE}
    print(f"{backend} against the SavedModel, largest difference: {gaps}")  # docs/gpu.md's figures
    assert all(gaps[name] <= tolerance[name] for name in kinds), gaps


def test_a_savedmodel_directory_packages_and_scores_as_the_notebook(notebook_data, tmp_path):
    model = notebook.small_cnn((96, 96), layers.Dense(2, activation="softmax"))
    export_dir = str(tmp_path / "exported")
    model.export(export_dir, verbose=False)
    paths = notebook.image_paths(notebook_data["images"])
    images = notebook.load_batch(paths, (96, 96))
    expected = model.predict(images / 255., verbose=0)
    model_dir = str(tmp_path / "from-savedmodel")
    assert package_cli("--keras", export_dir, "--output", model_dir, "--classes", "cat,dog",
                       "--scaling", "1/255", "--interpolation", "bilinear") == 0
    assert not os.path.exists(os.path.join(model_dir, "model.keras"))
    scored = score_packaged(model_dir, notebook_data, str(tmp_path / "out"), "saved_model")
    rows = scored["rows"]
    bilinear = np.stack([keras.utils.img_to_array(keras.utils.load_img(p, target_size=(96, 96),
                                                                       interpolation="bilinear"))
                         for p in paths])
    want = model.predict(bilinear / 255., verbose=0)
    got = np.array([[rows[os.path.basename(p)][f"prob_{c}"] for c in ("cat", "dog")] for p in paths])
    assert np.max(np.abs(got - want)) <= 1e-5
    assert np.max(np.abs(want - expected)) > 1e-5, "interpolation should matter on these images"


def test_int8_images_calibrate_on_one_half_and_judge_on_the_other(kind1, notebook_data, tmp_path, capsys):
    path = str(notebook_data["root"] / "best_model.h5")  # written by the kind1 fixture
    model_dir = str(tmp_path / "int8")
    assert package_cli("--keras", path, "--output", model_dir, "--classes", "cat,dog",
                       "--scaling", "1/255", "--int8-images", notebook_data["train"]) == 0
    entry = read_metadata(model_dir).tflite_int8
    assert entry["calibration"]["images"] == 12 and entry["validation"]["images"] == 12
    assert entry["calibration"]["source"] == f"{notebook_data['train']} (seeded half)"
    # The notebook's Dense head is called at the packaged model's top level: it is re-fitted on the
    # integer base's features of the calibration half, and judged on the other half.
    assert entry["head"] == {"refit": True, "images": 12, "epochs": 10,
                             "source": f"{notebook_data['train']} (seeded half)"}
    assert os.path.exists(os.path.join(model_dir, "model_int8.tflite")) == entry["kept"]
    assert "model_int8.tflite kept" in capsys.readouterr().out or not entry["kept"]


def test_the_notebook_head_is_split_off_with_its_own_weights_and_arithmetic(kind1, notebook_data):
    from model.architecture import final_dense_layer

    notebook_model = keras.saving.load_model(str(notebook_data["root"] / "best_model.h5"))
    features, head = package.split_off_head(notebook_model)
    images = np.random.default_rng(3).uniform(0, 1, (4, 150, 150, 3)).astype("float32")
    np.testing.assert_array_equal(head(features(images)), notebook_model(images))
    classifier, _, _ = package.wrap(notebook_model, (150, 150), "1/255", None, from_logits=False)
    top_level_head = final_dense_layer(classifier)
    assert top_level_head in classifier.layers and top_level_head is not notebook_model.layers[-1]
    for mine, notebooks in zip(top_level_head.get_weights(), notebook_model.layers[-1].get_weights(),
                               strict=True):
        np.testing.assert_array_equal(mine, notebooks)
    # A model whose output is not a Dense layer's keeps its head inside (nothing to re-fit).
    ends_in_activation = keras.Sequential([keras.Input((8,)), layers.Dense(2), layers.Activation("softmax")])
    assert package.split_off_head(ends_in_activation) == (None, None)


# --- refusals: one line, exit 1, nothing written ---------------------------------------------

def test_int8_images_of_other_classes_are_refused(kind1, notebook_data, tmp_path, capsys):
    message = refused(capsys, str(tmp_path / "m"), "--keras", str(notebook_data["root"] / "best_model.h5"),
                      "--classes", "tabby,beagle", "--scaling", "1/255",
                      "--int8-images", notebook_data["train"])
    assert "holds classes ['cat', 'dog'], the model's are ['tabby', 'beagle']" in message

def refused(capsys, output: str, *argv: str) -> str:
    assert package_cli(*argv, "--output", output) == 1
    assert not os.path.exists(output)
    message = capsys.readouterr().err
    assert message.startswith("petscore: refused before writing anything: ") and message.count("\n") == 1
    return message


@pytest.fixture(scope="module")
def logits_model(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("logits") / "logits.keras")
    keras.utils.set_random_seed(1)
    notebook.small_cnn((32, 32), layers.Dense(2)).save(path)
    return path


def test_logits_are_refused_and_from_logits_scores_their_softmax(logits_model, notebook_data, tmp_path,
                                                                  capsys):
    message = refused(capsys, str(tmp_path / "a"), "--keras", logits_model, "--classes", "cat,dog",
                      "--scaling", "none")
    assert "look like logits" in message and "--from-logits" in message
    model_dir = str(tmp_path / "b")
    assert package_cli("--keras", logits_model, "--classes", "cat,dog", "--scaling", "none",
                       "--from-logits", "--output", model_dir) == 0
    paths = notebook.image_paths(notebook_data["images"])
    logits = keras.saving.load_model(logits_model).predict(notebook.load_batch(paths, (32, 32)), verbose=0)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    scored = score_packaged(model_dir, notebook_data, str(tmp_path / "out"), "saved_model")
    assert_parity(scored, paths, expected, ["cat", "dog"], 1e-5)


def test_a_class_count_that_does_not_match_the_output_is_refused(logits_model, tmp_path, capsys):
    message = refused(capsys, str(tmp_path / "m"), "--keras", logits_model, "--classes", "cat,dog,bird",
                      "--scaling", "none", "--from-logits")
    assert "outputs 2 value(s) per image (2 classes), but 3 class names were given" in message


def test_an_output_holding_other_files_is_refused_and_kept_and_an_earlier_model_is_replaced(
        logits_model, tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    argv = ["--keras", logits_model, "--classes", "cat,dog", "--scaling", "none", "--from-logits"]
    assert package_cli(*argv, "--output", str(folder)) == 1
    message = capsys.readouterr().err
    assert message.startswith("petscore: refused before writing anything: ") and message.count("\n") == 1
    assert "not a petscore model (no metadata.json)" in message and "new or empty directory" in message
    assert os.listdir(folder) == ["notes.txt"] and (folder / "notes.txt").read_text() == "mine"

    model_dir = str(tmp_path / "model")
    for version in ("first", "second"):  # a re-export under the same name replaces the model
        assert package_cli(*argv, "--model-version", version, "--output", model_dir) == 0
        assert read_metadata(model_dir).model_version == version


def test_a_grayscale_model_is_refused(tmp_path, capsys):
    path = str(tmp_path / "gray.keras")
    keras.Sequential([keras.Input((32, 32, 1)), layers.Flatten(), layers.Dense(2, activation="softmax")]
                     ).save(path)
    message = refused(capsys, str(tmp_path / "m"), "--keras", path, "--classes", "cat,dog",
                      "--scaling", "1/255")
    assert "(None, 32, 32, 1)" in message and "RGB" in message


def pixels_over_255(x):
    return x / 255.0


def model_with_code(kind: str, writer: str):
    """A model whose second layer Keras builds only by running code: a ``Lambda`` of a named
    function (``Could not locate function 'pixels_over_255'`` from Keras 3 alone) or a custom
    layer class this process does not know, built by Keras 3 or by tf-keras (Keras 2)."""
    k = keras if writer == "keras 3" else pytest.importorskip("tf_keras")

    class Doubling(k.layers.Layer):
        def call(self, x):
            return x * 2.0

    middle = k.layers.Lambda(pixels_over_255, name="scale") if kind == "Lambda" else Doubling(name="doubling")
    return k.Sequential([k.Input((8, 8, 3)), middle, k.layers.Flatten(),
                         k.layers.Dense(2, activation="softmax")])


@pytest.mark.parametrize("writer", ["keras 3", "tf-keras"])
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("kind, named", [
    ("Lambda", "layer 'scale' (Lambda) is Python code saved in the model file"),
    ("custom", "layer 'doubling' (Doubling) is a custom layer class, whose code a model file does not hold"),
], ids=["Lambda", "custom"])
def test_a_lambda_or_custom_layer_is_refused_naming_it_with_what_to_do(
        tmp_path, capsys, writer, suffix, kind, named):
    path = str(tmp_path / f"model{suffix}")
    model_with_code(kind, writer).save(path)
    message = refused(capsys, str(tmp_path / "m"), "--keras", path, "--classes", "cat,dog",
                      "--scaling", "none")
    assert f"{path}: {named}, and petscore never runs code to load a model file (Keras safe_mode)" in message
    assert "pass --scaling" in message and "model.export(DIR)" in message and "--keras DIR" in message


def test_the_savedmodel_a_code_layer_refusal_advises_loads_with_the_layers_computation(tmp_path):
    model = model_with_code("Lambda", "keras 3")
    model.export(str(tmp_path / "exported"), verbose=False)
    loaded, source_format, _ = load_notebook_model(str(tmp_path / "exported"))
    images = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3)).astype("float32")
    assert source_format == "saved_model"
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)


def test_a_missing_feature_extractor_weights_file_is_refused(logits_model, tmp_path, capsys):
    message = refused(capsys, str(tmp_path / "m"), "--keras", logits_model, "--classes", "cat,dog",
                      "--feature-extractor", "resnet50", "--feature-weights",
                      str(tmp_path / "absent.h5"))
    assert "absent.h5 is not a file" in message


def test_a_head_whose_features_do_not_match_the_extractor_is_refused(tmp_path, capsys):
    path = str(tmp_path / "head.keras")
    keras.Sequential([keras.Input((7, 7, 2048)), layers.GlobalAveragePooling2D(),
                      layers.Dense(3, activation="softmax")]).save(path)
    message = refused(capsys, str(tmp_path / "m"), "--keras", path, "--classes", "a,b,c",
                      "--feature-extractor", "mobilenet", "--feature-weights", "none",
                      "--alpha", "0.25", "--input-size", "64")
    assert "outputs features of shape (2, 2, 256), the head takes (7, 7, 2048)" in message


def test_an_unfixed_input_size_needs_input_size(tmp_path, capsys):
    path = str(tmp_path / "any.keras")
    keras.Sequential([keras.Input((None, None, 3)), layers.GlobalAveragePooling2D(),
                      layers.Dense(2, activation="softmax")]).save(path)
    assert "pass --input-size" in refused(capsys, str(tmp_path / "m"), "--keras", path,
                                          "--classes", "cat,dog", "--scaling", "1/255")
    assert package_cli("--keras", path, "--classes", "cat,dog", "--scaling", "1/255",
                       "--input-size", "40", "--output", str(tmp_path / "ok")) == 0
    assert read_metadata(str(tmp_path / "ok")).input_size == [40, 40]


def test_scaling_is_required_without_a_feature_extractor(logits_model, tmp_path, capsys):
    assert "--scaling is required" in refused(capsys, str(tmp_path / "m"), "--keras", logits_model,
                                              "--classes", "cat,dog")


def test_packaged_metadata_is_the_contract_an_old_scorer_refuses_clearly(kind1):
    """A scorer without the Keras loader must refuse, not score with other pixels."""
    from serving.metadata import ModelContractError, ModelMetadata

    fields = json.loads(read_metadata(kind1["model_dir"]).to_json())
    fields["preprocessing"] = "keras-load-img-v0"
    with pytest.raises(ModelContractError, match="training/serving skew"):
        ModelMetadata.from_json(json.dumps(fields))
    fields["preprocessing"], fields["resize_method"] = KERAS_LOAD_IMG, "magic"
    with pytest.raises(ModelContractError, match="resize_method 'magic'"):
        ModelMetadata.from_json(json.dumps(fields))


def test_binary_csv_is_refused_for_a_many_class_model_and_multiclass_has_every_class(
        logits_model, notebook_data, tmp_path):
    model_dir = str(tmp_path / "m")
    assert package_cli("--keras", logits_model, "--classes", "cats,dogs", "--scaling", "none",
                       "--from-logits", "--output", model_dir) == 0
    out = str(tmp_path / "out")
    # Two classes without 'dog': the binary label is the second class, the sigmoid's one.
    assert score.main(["--input", os.path.join(notebook_data["images"], "*"), "--model-dir", model_dir,
                       "--output", out, "--csv-format", "multiclass"]) == 0
    with open(os.path.join(out, "submission.csv"), newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id", "cats", "dogs"] and len(rows) == 1 + 13
    for row in rows[1:]:
        assert float(row[1]) + float(row[2]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("mode", ["tf", "torch", "caffe"])
def test_scaling_inside_the_model_equals_preprocess_input_in_a_graph(mode):
    """Exported models run as graphs, where TF would turn x / 127.5 into x * (1 / 127.5)."""
    import tensorflow as tf

    from model.architecture import SCALINGS

    pixels = np.tile(np.arange(256, dtype=np.float32)[:, None, None], (1, 2, 3)).reshape(1, 256, 2, 3)
    layer = SCALINGS[mode]()
    graph = tf.function(lambda x: layer(x))
    want = keras.applications.imagenet_utils.preprocess_input(pixels.copy(), mode=mode)
    assert np.array_equal(graph(tf.constant(pixels)).numpy(), want)


def rescaling_cnn(size: tuple[int, int]) -> keras.Model:
    """Keras's image classification tutorial: augmentation, then Rescaling(1./255) inside the model."""
    keras.utils.set_random_seed(4)
    augmentation = keras.Sequential([layers.RandomFlip("horizontal"), layers.RandomRotation(0.1)],
                                    name="data_augmentation")
    rescaling = layers.Rescaling(1. / 255, name="rescaling")
    return keras.Sequential([keras.Input((*size, 3)), augmentation, rescaling,
                             *notebook.small_cnn(size, layers.Dense(2, activation="softmax")).layers])


def test_scaling_pixels_a_model_scales_itself_is_refused_and_none_scores_as_the_notebook(
        notebook_data, tmp_path, capsys):
    path = str(tmp_path / "rescaling.keras")
    model = rescaling_cnn((64, 64))
    model.save(path)
    message = refused(capsys, str(tmp_path / "twice"), "--keras", path, "--classes", "cat,dog",
                      "--scaling", "1/255")
    assert ("the model's input layer 'rescaling' (Rescaling(scale=0.00392156862745098, offset=0.0)) "
            "already scales pixels, so --scaling 1/255 would scale them twice: pass --scaling none, "
            "or --allow-double-scaling") in message
    model_dir = str(tmp_path / "once")
    assert package_cli("--keras", path, "--classes", "cat,dog", "--scaling", "none",
                       "--output", model_dir) == 0
    paths = notebook.image_paths(notebook_data["images"])
    expected = model.predict(notebook.load_batch(paths, (64, 64)), verbose=0)
    scored = score_packaged(model_dir, notebook_data, str(tmp_path / "out"), "saved_model")
    assert_parity(scored, paths, expected, ["cat", "dog"], TOLERANCE["saved_model"])
    # Said to be intended, the double scaling is packaged, and recorded.
    allowed = str(tmp_path / "allowed")
    assert package_cli("--keras", path, "--classes", "cat,dog", "--scaling", "1/255",
                       "--allow-double-scaling", "--output", allowed) == 0
    assert read_metadata(allowed).training["packaged_from"]["double_scaling_allowed"] is True


def nested_normalization(size: tuple[int, int]) -> keras.Model:
    """keras.applications with include_preprocessing (EfficientNet, ConvNeXt): a nested base whose
    first layer normalises."""
    image = keras.Input((*size, 3))
    x = layers.Normalization(mean=[120.0, 110.0, 100.0], variance=[3000.0] * 3, name="normalization")(image)
    base = keras.Model(image, layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3)(x)), name="base")
    return keras.Sequential([keras.Input((*size, 3)), base, layers.Dense(2, activation="softmax")])


@pytest.mark.parametrize("build, scaling_layer", [
    (rescaling_cnn, "rescaling"),
    (nested_normalization, "normalization"),
    (lambda size: notebook.small_cnn(size, layers.Dense(2, activation="softmax")), None),
    (lambda size: keras.Sequential([keras.Input((*size, 3)), layers.Conv2D(4, 3), layers.Rescaling(2.0),
                                    layers.Flatten(), layers.Dense(2, activation="softmax")]), None),
])
def test_the_scaling_layer_at_a_models_input_is_found_and_only_there(build, scaling_layer):
    layer = package.input_scaling_layer(build((16, 16)))
    assert (layer.name if layer is not None else None) == scaling_layer


def test_scope_images_fit_a_detector_on_the_notebook_heads_features(kind1, notebook_data, tmp_path, capsys):
    path = str(notebook_data["root"] / "best_model.h5")  # written by the kind1 fixture
    model_dir = str(tmp_path / "scoped")
    assert package_cli("--keras", path, "--output", model_dir, "--classes", "cat,dog", "--scaling", "1/255",
                       "--scope-images", notebook_data["train"], "--out-of-scope-k", "5",
                       "--out-of-scope-bank", "12") == 0
    metadata = read_metadata(model_dir)
    scope = metadata.out_of_scope
    # 24 images: 19 to fit on, of which a seeded 12 make the bank, and 5 held out.
    assert (scope["k"], scope["bank_images"], scope["held_out"]["images"]) == (5, 12, 5)
    assert scope["held_out"]["source"] == f"{notebook_data['train']} (the other 20%)"
    assert scope["features"].startswith("input of the final Dense layer")
    assert "out-of-scope detector: knn-cosine k=5" in capsys.readouterr().out
    # The notebook's probabilities are untouched; the score agrees across the float runtimes.
    images = reference_batch(150, 150, seeds=range(30, 35)).astype("uint8")
    plain = ServingModel(kind1["model_dir"], read_metadata(kind1["model_dir"]), "saved_model").predict(images)
    saved = ServingModel(model_dir, metadata, "saved_model").predict_outputs(images)
    tflite = ServingModel(model_dir, metadata, "tflite").predict_outputs(images)
    np.testing.assert_array_equal(saved.probabilities, plain)
    np.testing.assert_allclose(tflite.scope_score, saved.scope_score, atol=TFLITE_TOLERANCE)
    assert read_metadata(kind1["model_dir"]).out_of_scope is None  # no --scope-images: no detector


def test_a_model_without_a_final_dense_layer_gets_no_detector_and_says_so(notebook_data, tmp_path, caplog):
    path = str(tmp_path / "activation.keras")
    keras.utils.set_random_seed(2)
    notebook.small_cnn((32, 32), layers.Dense(2)).save(str(tmp_path / "logits.keras"))
    logits = keras.saving.load_model(str(tmp_path / "logits.keras"))
    keras.Sequential([logits, layers.Activation("softmax")]).save(path)
    with caplog.at_level("WARNING"):
        assert package_cli("--keras", path, "--output", str(tmp_path / "m"), "--classes", "cat,dog",
                           "--scaling", "1/255", "--scope-images", notebook_data["train"]) == 0
    assert read_metadata(str(tmp_path / "m")).out_of_scope is None
    assert "no out-of-scope detector" in caplog.text and "does not end in a Dense layer" in caplog.text


def test_scope_images_without_images_are_refused_before_anything_is_written(kind1, notebook_data, tmp_path,
                                                                            capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = refused(capsys, str(tmp_path / "m"), "--keras", str(notebook_data["root"] / "best_model.h5"),
                      "--classes", "cat,dog", "--scaling", "1/255", "--scope-images", str(empty))
    assert f"--scope-images: {empty} holds no images" in message
