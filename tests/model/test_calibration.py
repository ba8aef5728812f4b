"""Calibration: a temperature fitted at export lives inside every artefact alike, is applied only
when it helps held out, is recorded in metadata.json; models exported without one score as
before; ``model.evaluate`` shows the model before and after it."""

from __future__ import annotations

import json
import math
import os

import keras
import numpy as np
import pytest

from model import evaluate, package
from model.architecture import TemperatureScaling
from model.calibration import MIN_IMAGES, halves, judge_temperature, temperature_scale
from model.out_of_scope import load_classifier
from serving.metadata import METADATA_FILE, ModelContractError, ModelMetadata, read_metadata
from serving.reference import reference_batch
from serving.runtimes import ServingModel
from tests.conftest import TINY_SIZE
from tests.model.test_train_export import FLOAT_RUNTIMES_AGREE


@pytest.fixture(scope="module")
def packaged(trained, labelled_images, tmp_path_factory) -> dict:
    """The tiny trained classifier saved alone, as a notebook saves a model, then packaged with
    ``--calibration-images`` (and an out-of-scope detector) and without either: {"calibrated":
    dir, "plain": dir}."""
    root = tmp_path_factory.mktemp("calibration")
    notebook_file = str(root / "tiny.keras")
    load_classifier(trained["model_dir"]).save(notebook_file)
    common = ["--keras", notebook_file, "--classes", "cat,dog", "--scaling", "none"]
    dirs = {"calibrated": str(root / "calibrated"), "plain": str(root / "plain")}
    assert package.main([*common, "--output", dirs["calibrated"], "--calibration-images", labelled_images,
                         "--scope-images", labelled_images]) == 0
    assert package.main([*common, "--output", dirs["plain"]]) == 0
    return dirs


def test_the_temperature_layer_scales_the_logits_and_survives_saving(tmp_path):
    probabilities = np.array([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]], np.float32)  # 0: float32 underflow
    layer = TemperatureScaling(2.0)
    got = keras.ops.convert_to_numpy(layer(probabilities))
    logits = np.log(np.maximum(probabilities.astype(np.float64), 1.1754944e-38)) / 2.0
    want = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.all(np.isfinite(got)) and np.argmax(got, axis=1).tolist() == [0, 0]
    np.testing.assert_allclose(temperature_scale(probabilities, 2.0), want, rtol=1e-12)
    inputs = keras.Input((3,))
    path = str(tmp_path / "t.keras")
    keras.Model(inputs, TemperatureScaling(0.5, name="t")(inputs)).save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.get_layer("t").temperature == 0.5
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number above 0"):
            TemperatureScaling(bad)


def test_calibrated_probabilities_agree_on_every_runtime_and_are_the_plain_ones_scaled(packaged):
    metadata = read_metadata(packaged["calibrated"])
    temperature = metadata.temperature
    assert metadata.calibration["applied"] and temperature == metadata.calibration["temperature"] > 0
    images = reference_batch(TINY_SIZE, TINY_SIZE, seeds=range(30, 41))  # 11: LiteRT pads its last invoke
    plain = ServingModel(packaged["plain"], read_metadata(packaged["plain"]), "saved_model").predict(images)
    want = temperature_scale(plain, temperature)
    assert np.max(np.abs(want - plain)) > 0.01, "the temperature should change the probabilities"
    scope_scores = []
    for runtime in ("saved_model", "tflite", "keras"):
        model = ServingModel(packaged["calibrated"], metadata, runtime)
        assert model.runtime == runtime
        outputs = model.predict_outputs(images)
        np.testing.assert_allclose(outputs.probabilities, want, atol=FLOAT_RUNTIMES_AGREE)
        scope_scores.append(outputs.scope_score)
        assert model.check_reference_predictions() < FLOAT_RUNTIMES_AGREE
    # The detector beside the calibrated probabilities reads the head's input: untouched.
    assert metadata.has_scope_detector and np.ptp(scope_scores[0]) > 1e-4
    for other in scope_scores[1:]:
        np.testing.assert_allclose(other, scope_scores[0], atol=FLOAT_RUNTIMES_AGREE)
    assert metadata.tflite["max_abs_diff_vs_saved_model"] <= 1e-4
    served = keras.saving.load_model(os.path.join(packaged["calibrated"], "model.keras"), safe_mode=True)
    layer = served.output["probabilities"]._keras_history.operation  # what makes the probabilities
    assert isinstance(layer, TemperatureScaling) and layer.temperature == temperature


def test_the_metadata_records_the_fit_and_its_held_out_figures(packaged, labelled_images):
    entry = read_metadata(packaged["calibrated"]).calibration
    assert entry["fit"] == {"images": 48, "source": labelled_images}
    held_out = entry["held_out"]
    assert held_out["images"] == 48 and len(held_out["fold_temperatures"]) == 2
    assert held_out["log_loss_after"] < held_out["log_loss_before"]
    assert 0 <= held_out["ece_after"] <= 1 and 0 <= held_out["ece_before"] <= 1
    assert held_out["ece_bins"] == 15
    assert read_metadata(packaged["plain"]).calibration is None  # not asked for: nothing fitted


def test_a_fit_that_does_not_lower_the_held_out_log_loss_is_not_applied():
    """One half of the images confidently right, the other confidently wrong: the temperature
    each half fits (sharper; softer) makes the other half's log loss worse, so none is applied."""
    labels = np.array([0, 1] * 20)
    folds = halves(labels, seed=0)
    confidence = np.where(folds == 0, 0.95, 0.3)  # P(true class): right in fold 0, wrong in 1
    confidence[::7] = np.where(folds[::7] == 0, 0.7, 0.45)  # not all alike
    probabilities = np.zeros((len(labels), 2))
    probabilities[np.arange(len(labels)), labels] = confidence
    probabilities[np.arange(len(labels)), 1 - labels] = 1 - confidence
    entry = judge_temperature(labels, probabilities, seed=0)
    assert entry["applied"] is False and entry["temperature"] > 0
    assert entry["held_out"]["log_loss_after"] >= entry["held_out"]["log_loss_before"]
    assert "raises the log loss" in entry["reason"]
    # Both halves alike (every image a little too confident): the same fit helps and is applied.
    alike = np.where(np.arange(len(labels)) % 5 == 0, 0.2, 0.97)
    probabilities[np.arange(len(labels)), labels] = alike
    probabilities[np.arange(len(labels)), 1 - labels] = 1 - alike
    assert judge_temperature(labels, probabilities, seed=0)["applied"] is True


def test_training_on_too_few_validation_images_records_why_and_changes_nothing(trained):
    """The session model's validation split has 10 images: no temperature, and none inside."""
    entry = read_metadata(trained["model_dir"]).calibration
    assert entry["applied"] is False and entry["temperature"] is None
    assert f"at least {MIN_IMAGES}" in entry["reason"] and entry["fit"]["source"] == "validation split"
    served = keras.saving.load_model(os.path.join(trained["model_dir"], "model.keras"), safe_mode=True)
    assert not any(isinstance(layer, TemperatureScaling) for layer in served.layers)


def test_an_earlier_export_without_calibration_scores_exactly_as_before(trained, labelled_images, tmp_path):
    fields = json.loads(open(os.path.join(trained["model_dir"], METADATA_FILE)).read())
    del fields["calibration"]  # a metadata.json written before the field existed
    old = ModelMetadata.from_json(json.dumps(fields))
    assert old.calibration is None and old.temperature is None
    images = reference_batch(TINY_SIZE, TINY_SIZE)
    want = np.array([ref["probabilities"] for ref in fields["reference_predictions"]])
    for runtime in ("saved_model", "tflite"):
        np.testing.assert_allclose(ServingModel(trained["model_dir"], old, runtime).predict(images), want,
                                   atol=FLOAT_RUNTIMES_AGREE)
    out = str(tmp_path / "eval")
    assert evaluate.main(["--model-dir", trained["model_dir"], "--data", labelled_images,
                          "--output", out]) == 0
    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert metrics["calibration"]["temperature"] is None and metrics["reliability_before_calibration"] is None


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(method="platt"), "'platt' is none of"),
    (lambda c: c.update(applied="yes"), "applied must be true or false"),
    (lambda c: c.update(temperature=0), "temperature must be a finite number above 0"),
    (lambda c: c.update(temperature=None), "temperature must be a finite number above 0"),
])
def test_an_inconsistent_calibration_entry_is_refused(packaged, change, message):
    fields = json.loads(read_metadata(packaged["calibrated"]).to_json())
    change(fields["calibration"])
    with pytest.raises(ModelContractError, match=message):
        ModelMetadata.from_json(json.dumps(fields))


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_evaluate_shows_the_model_before_calibration_as_the_uncalibrated_export_scores(
        packaged, labelled_images, tmp_path, tta):
    """The calibrated model's figures before calibration (its temperature undone on each view)
    are the plain export's own, with and without mirrored scoring; the report has both diagrams."""
    metrics = {}
    for name in ("calibrated", "plain"):
        out = str(tmp_path / name)
        assert evaluate.main(["--model-dir", packaged[name], "--data", labelled_images, "--output", out,
                              "--tta", tta]) == 0
        metrics[name] = json.loads(open(os.path.join(out, "metrics.json")).read())
    calibrated, plain = metrics["calibrated"], metrics["plain"]
    assert calibrated["tta"] == tta and calibrated["ece_bins"] == 15
    before = calibrated["calibration"]["before_calibration"]
    for figure in ("accuracy", "log_loss", "expected_calibration_error"):
        assert before[figure] == pytest.approx(plain[figure], abs=1e-4), figure
    assert calibrated["accuracy"] == plain["accuracy"]  # a temperature never changes the top class
    assert calibrated["log_loss"] < plain["log_loss"]
    assert math.isclose(calibrated["reliability_before_calibration"]["expected_calibration_error"],
                        plain["expected_calibration_error"], abs_tol=1e-4)
    html = open(os.path.join(tmp_path, "calibrated", "report.html")).read()
    assert html.count("data:image/png;base64,") == 4 and "reliability diagram before calibration" in html
