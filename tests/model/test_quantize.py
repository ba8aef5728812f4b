"""The opt-in integer model: kept only when it passes its validation, scored only when asked."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import keras
import numpy as np
import pytest

from model.data import find_labelled_images, split_train_validation
from model.export import export_model
from model.out_of_scope import ScopeRequest
from model.quantize import (
    MAX_ACCURACY_DROP,
    MAX_LOG_LOSS_RISE,
    Int8Request,
    acceptance_failures,
    calibration_sample,
)
from pipeline import score
from serving.metadata import INT8_TFLITE_FILE, ModelContractError, file_sha256, read_metadata
from serving.preprocessing import decode_and_resize
from serving.reference import INT8_REFERENCE_TOLERANCE, reference_batch
from serving.runtimes import ServingModel, choose_runtime
from tests.pipeline.outputs import read_run


def export_with_int8(trained: dict, labelled_images: str, output: str, scope: bool = False,
                     **bars) -> tuple:
    """The tiny trained model exported again, asking for an integer model judged with ``bars``
    (and with ``scope``, an out-of-scope detector fitted on the calibration split)."""
    data = find_labelled_images(labelled_images)
    calibration, validation = split_train_validation(data, 0.25, seed=1)
    request = Int8Request(calibration_sample(calibration.paths, seed=1, count=16), validation.paths,
                          validation.labels, "test calibration", "test validation", **bars)
    detector = ScopeRequest(calibration.paths, validation.paths, "test calibration",
                            "test validation") if scope else None
    classifier = keras.saving.load_model(os.path.join(trained["model_dir"], "model.keras"))
    metadata = export_model(classifier, output, class_names=data.class_names, base="mobilenet",
                            base_weights="none", model_version="tiny-int8", int8=request, scope=detector)
    return metadata, validation


@pytest.fixture(scope="module")
def kept(trained, labelled_images, tmp_path_factory):
    """Bars no model can miss: the integer model is kept, so its scoring can be checked. The
    float model has an out-of-scope detector, as model.train's have by default."""
    model_dir = str(tmp_path_factory.mktemp("int8") / "kept")
    metadata, validation = export_with_int8(trained, labelled_images, model_dir, scope=True,
                                            max_accuracy_drop=1.0, max_log_loss_rise=100.0)
    return {"model_dir": model_dir, "metadata": metadata, "validation": validation}


@pytest.mark.parametrize("drop, rise, failing", [
    (MAX_ACCURACY_DROP, MAX_LOG_LOSS_RISE, []),                  # on the bar: kept
    (-0.02, -0.05, []),                                          # better than float: kept
    (MAX_ACCURACY_DROP + 1e-4, 0.0, ["accuracy drops by 0.51 points"]),
    (0.0, MAX_LOG_LOSS_RISE + 1e-4, ["log loss rises by 0.0101"]),
    (0.0075, 0.0233, ["accuracy drops by 0.75 points", "log loss rises by 0.0233"]),
])
def test_the_acceptance_rule_allows_half_a_point_and_a_hundredth_of_log_loss(drop, rise, failing):
    failures = acceptance_failures({"accuracy_drop": drop, "log_loss_rise": rise},
                                   MAX_ACCURACY_DROP, MAX_LOG_LOSS_RISE)
    assert len(failures) == len(failing)
    for failure, start in zip(failures, failing, strict=True):
        assert failure.startswith(start)


def test_a_kept_integer_model_records_its_figures_and_its_own_references(kept):
    metadata, validation = kept["metadata"], kept["validation"]
    entry = read_metadata(kept["model_dir"]).tflite_int8
    assert entry == metadata.tflite_int8 and entry["kept"] is True
    assert entry["sha256"] == file_sha256(os.path.join(kept["model_dir"], INT8_TFLITE_FILE))
    assert entry["calibration"] == {"images": 16, "source": "test calibration"}
    figures = entry["validation"]
    assert figures["images"] == len(validation.paths) and figures["source"] == "test validation"
    assert figures["accuracy_drop"] == pytest.approx(figures["float_accuracy"] - figures["int8_accuracy"],
                                                     abs=2e-6)
    assert figures["log_loss_rise"] == pytest.approx(figures["int8_log_loss"] - figures["float_log_loss"],
                                                     abs=2e-6)
    # The figures are what the two runtimes give on the validation images, recomputed here.
    pixels = np.stack([decode_and_resize(open(path, "rb").read(), (metadata.height, metadata.width),
                                         metadata.resize_method, preprocessing=metadata.preprocessing)
                       for path in validation.paths])
    labels = np.array(validation.labels)
    float_probabilities = ServingModel(kept["model_dir"], metadata, "tflite").predict(pixels)
    int8_model = ServingModel(kept["model_dir"], metadata, "tflite-int8")
    int8_probabilities = int8_model.predict(pixels)
    assert figures["int8_accuracy"] == pytest.approx(
        np.mean(np.argmax(int8_probabilities, axis=1) == labels), abs=1e-6)
    assert figures["max_abs_diff"] == pytest.approx(
        np.max(np.abs(int8_probabilities - float_probabilities)), abs=1e-6)
    assert figures["max_abs_diff"] > 0, "an integer model that equals the float one was not quantized"
    assert entry["reference_tolerance"] == INT8_REFERENCE_TOLERANCE
    assert int8_model.check_reference_predictions() < 1e-6  # the same kernels here as at export


def test_a_failing_integer_model_is_not_kept_and_says_why(trained, labelled_images, corpus, tmp_path,
                                                          caplog):
    model_dir = str(tmp_path / "refused")
    with caplog.at_level(logging.WARNING, logger="model.quantize"):
        metadata, _ = export_with_int8(trained, labelled_images, model_dir, max_accuracy_drop=-1.0)
    entry = metadata.tflite_int8
    assert entry["kept"] is False and entry["sha256"] is None
    assert entry["reason"].startswith("accuracy drops by") and "(> -100)" in entry["reason"]
    assert "validation" in entry and "reference_predictions" not in entry
    assert not os.path.exists(os.path.join(model_dir, INT8_TFLITE_FILE))
    assert read_metadata(model_dir).tflite_int8 == entry
    assert f"{INT8_TFLITE_FILE} not kept: {entry['reason']}" in caplog.text
    # The float model is exported as usual; asking for the integer one is refused before any work.
    output = str(tmp_path / "out")
    assert score.main(["--input", os.path.join(corpus[0], "*"), "--model-dir", model_dir,
                       "--output", output]) == 3
    assert score.main(["--input", os.path.join(corpus[0], "*"), "--model-dir", model_dir,
                       "--output", str(tmp_path / "int8"), "--runtime", "tflite-int8"]) == 1
    assert not os.path.exists(tmp_path / "int8")


def test_only_an_explicit_request_picks_the_integer_runtime(kept, trained):
    with_int8 = kept["metadata"]
    without = read_metadata(trained["model_dir"])
    assert choose_runtime("auto", with_int8, "CPU") == "tflite"
    assert choose_runtime("auto", with_int8, "GPU x1") == "saved_model"
    assert choose_runtime("tflite-int8", with_int8, "GPU x1") == "tflite-int8"
    with pytest.raises(ModelContractError, match="export it with `model.train --int8`"):
        choose_runtime("tflite-int8", without, "CPU")
    refused = dataclasses.replace(with_int8, tflite_int8={"kept": False, "reason": "it was worse"})
    with pytest.raises(ModelContractError, match="not kept at export because it was worse"):
        choose_runtime("tflite-int8", refused, "CPU")


def test_the_integer_runtime_scores_with_the_integer_model(kept, corpus, tmp_path):
    root, _ = corpus
    runs = {}
    for runtime in ("tflite", "tflite-int8"):
        output = str(tmp_path / runtime)
        assert score.main(["--input", os.path.join(root, "*"), "--model-dir", kept["model_dir"],
                           "--output", output, "--runtime", runtime]) == 3
        runs[runtime] = read_run(output)
    assert runs["tflite-int8"]["summary"]["runtime"] == "tflite-int8"
    rows = {runtime: {r["path"]: r["prob_dog"] for r in run["predictions"].to_pylist()}
            for runtime, run in runs.items()}
    assert rows["tflite"].keys() == rows["tflite-int8"].keys() and rows["tflite"]
    metadata = kept["metadata"]
    paths = sorted(rows["tflite"])
    pixels = np.stack([decode_and_resize(open(path, "rb").read(), (metadata.height, metadata.width),
                                         metadata.resize_method, preprocessing=metadata.preprocessing)
                       for path in paths])
    int8_dog = ServingModel(kept["model_dir"], metadata, "tflite-int8").predict(pixels)[:, 1]
    np.testing.assert_allclose([rows["tflite-int8"][p] for p in paths], int8_dog, atol=1e-7)
    assert any(rows["tflite-int8"][p] != rows["tflite"][p] for p in paths)


def test_a_changed_integer_model_is_refused_before_any_work(kept, corpus, tmp_path):
    broken = str(tmp_path / "model")
    shutil.copytree(kept["model_dir"], broken)
    with open(os.path.join(broken, INT8_TFLITE_FILE), "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelContractError, match=f"{INT8_TFLITE_FILE} hashes to"):
        score.run(["--input", os.path.join(corpus[0], "*"), "--model-dir", broken,
                   "--output", str(tmp_path / "o"), "--runtime", "tflite-int8"])
    entry = kept["metadata"].tflite_int8
    moved = [dict(ref, probabilities=[p + 2 * INT8_REFERENCE_TOLERANCE * (-1) ** i
                                      for i, p in enumerate(ref["probabilities"])])
             for ref in entry["reference_predictions"]]
    metadata = dataclasses.replace(kept["metadata"],
                                   tflite_int8={**entry, "reference_predictions": moved})
    with pytest.raises(ModelContractError, match="tflite-int8: reference predictions differ"):
        ServingModel(kept["model_dir"], metadata, "tflite-int8").check_reference_predictions()


def test_training_with_int8_calibrates_on_training_images_and_judges_on_validation(
        labelled_images, tmp_path):
    from model.train import train
    from tests.conftest import tiny_training_args

    result = train(tiny_training_args(labelled_images, str(tmp_path / "m"), int8=True,
                                      int8_calibration_images=12, fine_tune_layers=0))
    entry = result["metadata"].tflite_int8
    assert entry["calibration"] == {"images": 12, "source": "training split"}
    assert entry["validation"]["images"] == result["metadata"].training["validation"]["images"]
    kept_file = os.path.exists(tmp_path / "m" / INT8_TFLITE_FILE)
    assert kept_file == entry["kept"] == (not acceptance_failures(
        entry["validation"], MAX_ACCURACY_DROP, MAX_LOG_LOSS_RISE))


def test_the_integer_models_head_is_refit_on_the_integer_bases_features(labelled_images, tmp_path):
    """A head that knows nothing (zero weights: P = 1/2 for every image) learns the classes again
    from the integer base's features, for the integer model only: the float model keeps its head.
    The 'base' is the images' mean colour, which tells the generated classes apart."""
    data = find_labelled_images(labelled_images)
    training, validation = split_train_validation(data, 0.25, seed=1)
    pixels = keras.Input((32, 32, 3), name="pixels")
    features = keras.layers.GlobalAveragePooling2D(name="pool")(keras.layers.Rescaling(1 / 127.5, -1)(pixels))
    head = keras.layers.Dense(2, activation="softmax", name="probabilities", kernel_initializer="zeros")
    classifier = keras.Model(pixels, head(features))
    request = Int8Request(calibration_sample(training.paths, seed=1, count=16), validation.paths,
                          validation.labels, "test training", "test validation", max_accuracy_drop=1.0,
                          max_log_loss_rise=100.0, head_paths=training.paths, head_labels=training.labels,
                          head_epochs=200)
    metadata = export_model(classifier, str(tmp_path / "m"), class_names=data.class_names, base="colour",
                            base_weights="none", model_version="zero-head", int8=request)
    entry = metadata.tflite_int8
    assert entry["head"] == {"refit": True, "images": len(training.paths), "epochs": 200,
                             "source": "test training"}
    figures = entry["validation"]
    assert figures["float_accuracy"] == 0.5
    assert figures["float_log_loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert figures["int8_accuracy"] == 1.0 and figures["int8_log_loss"] < np.log(2) - 0.01
    assert all(not weights.any() for weights in head.get_weights()), "the float head was changed"


def test_without_labelled_training_images_the_head_stays_as_trained(kept):
    assert kept["metadata"].tflite_int8["head"] == {
        "refit": False, "reason": "no labelled training images were given"}


def test_the_integer_model_does_not_carry_the_scope_score_the_float_ones_do(kept):
    """Its features are quantized, and its score's range would be calibrated on in-scope images
    only (docs/out-of-scope.md): the integer runtime gives no scope_score."""
    metadata = kept["metadata"]
    assert metadata.int8_kept and metadata.has_scope_detector
    images = reference_batch(metadata.height, metadata.width)
    int8_model = ServingModel(kept["model_dir"], metadata, "tflite-int8")
    assert not int8_model.has_scope_score and int8_model.predict_outputs(images).scope_score is None
    assert int8_model.check_reference_predictions() <= INT8_REFERENCE_TOLERANCE
    on_float = ServingModel(kept["model_dir"], metadata, "tflite")
    assert on_float.has_scope_score and on_float.predict_outputs(images).scope_score.shape == (4,)
    assert on_float.check_reference_predictions() < 1e-4
