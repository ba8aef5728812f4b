"""Train a tiny model, export it, and check everything a scorer relies on."""

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from model import evaluate
from serving.metadata import ModelContractError, ModelMetadata, read_metadata, saved_model_sha256
from serving.preprocessing import CV2_JPEG, PREPROCESSING_VERSION
from serving.reference import REFERENCE_SEEDS, REFERENCE_TOLERANCE, reference_batch
from serving.runtimes import ServingModel
from tests.conftest import TINY_SIZE, TINY_TRAINING_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# float32 kernels (LiteRT's XNNPACK, TF's and Keras's oneDNN) differ in the last bits: 2e-6 to
# 1.3e-5 in probability for the tiny models trained so far, ten times inside the contract's tolerance.
FLOAT_RUNTIMES_AGREE = REFERENCE_TOLERANCE / 10


def test_training_raises_no_user_warning(trained):
    """Keras warned twice in every training run: ``shuffle=True`` (fit's default) ignored for a
    tf.data.Dataset, and the input "ran out of data" at the end of the first epoch of a dataset
    whose length tf.data did not know (unreadable images are skipped)."""
    assert [f"{w.category.__name__}: {w.message}" for w in trained["warnings"]
            if issubclass(w.category, UserWarning)] == []


@pytest.mark.slow
def test_the_training_command_prints_no_false_alarm(labelled_images, tmp_path):
    """``python -m model.train`` as the demo runs it, on the tiny configuration, with the log
    level a new user has (unset): no TensorFlow error line (cuInit on a machine without a GPU)
    and no Python warning, only Keras's progress and petscore's own lines."""
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    process = subprocess.run([sys.executable, "-m", "model.train", "--data", labelled_images, "--output",
                              str(tmp_path / "model"), *TINY_TRAINING_FLAGS], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-3000:]
    output = process.stdout + process.stderr
    assert "trained tiny-test-1" in process.stdout
    for alarm in ("E0000", "cuInit", "Warning", "ERROR", "Traceback"):
        assert alarm not in output, output[-3000:]


def test_export_writes_the_contract(trained):
    metadata = read_metadata(trained["model_dir"])
    assert metadata.class_names == ["cat", "dog"]
    assert metadata.input_size == [TINY_SIZE, TINY_SIZE]
    assert metadata.preprocessing == CV2_JPEG  # what model.train gives new models
    assert metadata.base == "mobilenet" and metadata.base_weights == "none"
    assert metadata.model_version == "tiny-test-1"
    assert metadata.sha256 == saved_model_sha256(trained["model_dir"])
    assert metadata.training["train"]["images"] + metadata.training["validation"]["images"] == 48
    assert metadata.training["validation"]["per_class"] == {"cat": 5, "dog": 5}
    assert set(metadata.training["phases"]) == {"head", "fine_tune"}
    assert len(metadata.training["epoch_seconds"]) == len(trained["epoch_seconds"]) >= 2
    assert 0.0 <= metadata.metrics["val_accuracy"] <= 1.0 and metadata.metrics["val_loss"] > 0
    assert [ref["seed"] for ref in metadata.reference_predictions] == list(REFERENCE_SEEDS)


def test_serving_signature_takes_uint8_images_and_returns_probabilities(trained):
    loaded = tf.saved_model.load(os.path.join(trained["model_dir"], "saved_model"))
    signature = loaded.signatures["serving_default"]
    _, inputs = signature.structured_input_signature
    assert inputs["images"].dtype == tf.uint8
    assert inputs["images"].shape.as_list() == [None, TINY_SIZE, TINY_SIZE, 3]
    probabilities = signature(images=reference_batch(TINY_SIZE, TINY_SIZE))["probabilities"].numpy()
    assert probabilities.shape == (len(REFERENCE_SEEDS), 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_reference_predictions_reproduce_and_vary(trained):
    metadata = read_metadata(trained["model_dir"])
    model = ServingModel(trained["model_dir"], metadata)
    assert model.check_reference_predictions() < FLOAT_RUNTIMES_AGREE
    dogs = [ref["probabilities"][1] for ref in metadata.reference_predictions]
    assert max(dogs) - min(dogs) > 1e-4, "a trained model should not answer every image alike"


def test_keras_file_loads_in_safe_mode_and_agrees_with_the_saved_model(trained):
    classifier = keras.saving.load_model(os.path.join(trained["model_dir"], "model.keras"),
                                         safe_mode=True)
    images = reference_batch(TINY_SIZE, TINY_SIZE)
    # A model with an out-of-scope detector (model.train's default) names its two outputs.
    keras_probs = classifier.predict(images.astype("float32"), verbose=0)["probabilities"]
    serving = ServingModel(trained["model_dir"], read_metadata(trained["model_dir"]))
    np.testing.assert_allclose(keras_probs, serving.predict(images), atol=FLOAT_RUNTIMES_AGREE)


def test_tampered_reference_predictions_are_detected(trained):
    metadata = read_metadata(trained["model_dir"])
    refs = [dict(ref, probabilities=[0.99, 0.01]) for ref in metadata.reference_predictions]
    model = ServingModel(trained["model_dir"], dataclasses.replace(metadata, reference_predictions=refs))
    with pytest.raises(ModelContractError, match="reference predictions differ"):
        model.check_reference_predictions()


def test_metadata_promising_another_input_size_is_refused(trained):
    metadata = dataclasses.replace(read_metadata(trained["model_dir"]), input_size=[64, 64])
    with pytest.raises(ModelContractError, match=r"metadata promises uint8 \[None, 64, 64, 3\]"):
        ServingModel(trained["model_dir"], metadata)


def test_metadata_naming_more_classes_than_the_model_outputs_is_refused(trained):
    metadata = dataclasses.replace(read_metadata(trained["model_dir"]),
                                   class_names=["cat", "dog", "rabbit"], reference_predictions=[])
    with pytest.raises(ModelContractError, match="outputs 2 classes, the metadata names 3"):
        ServingModel(trained["model_dir"], metadata)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("class_names"), "lacks required fields: class_names"),
    (lambda m: m.update(class_names=["dog", "dog"]), "at least two distinct names"),
    (lambda m: m.update(input_size=[224]), "input_size must be"),
    (lambda m: m.update(resize_method="lanczos9"), "resize_method 'lanczos9'"),
    (lambda m: m.update(preprocessing="tf-image-v0"), "training/serving skew"),
])
def test_inconsistent_metadata_is_refused(trained, change, message):
    fields = json.loads(read_metadata(trained["model_dir"]).to_json())
    change(fields)
    with pytest.raises(ModelContractError, match=message):
        ModelMetadata.from_json(json.dumps(fields))


def test_epochs_is_a_cap_early_stopping_ends_training_and_the_best_epoch_is_exported(
        labelled_images, tmp_path):
    """``--epochs`` (default 30) only bounds the head phase: early stopping on validation loss
    ends it, and the exported model is the best epoch's, not the last one's. (Trained with
    ``--no-calibration`` too: nothing is fitted, no temperature layer is exported.)"""
    from model.architecture import TemperatureScaling
    from model.train import parse_args, train
    from tests.conftest import tiny_training_args

    assert parse_args(["--data", "d", "--output", "o", "--no-calibration"]).no_calibration
    result = train(tiny_training_args(labelled_images, str(tmp_path / "m"), epochs=12, patience=1,
                                      fine_tune_layers=0, no_calibration=True))
    metadata = result["metadata"]
    assert metadata.calibration is None and read_metadata(str(tmp_path / "m")).calibration is None
    served = keras.saving.load_model(str(tmp_path / "m" / "model.keras"), safe_mode=True)
    assert not any(isinstance(layer, TemperatureScaling) for layer in served.layers)
    head = metadata.training["phases"]["head"]
    assert head["epochs_run"] < 12
    assert head["epochs_run"] == head["best_epoch"] + 1  # one epoch without improvement: stop
    assert len(result["epoch_seconds"]) == head["epochs_run"]
    # Measured again on the exported model after training: the best epoch's validation loss.
    assert metadata.metrics["val_loss"] == pytest.approx(head["best_val_loss"], rel=1e-4)


def test_evaluate_writes_metrics_and_an_html_report(trained, labelled_images, tmp_path):
    out = str(tmp_path / "eval")
    assert evaluate.main(["--model-dir", trained["model_dir"], "--data", labelled_images,
                          "--output", out, "--target-accuracy", "0.6"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 48 and metrics["unreadable"] == 0
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.sum() == 48 and matrix.sum(axis=1).tolist() == [24, 24]
    assert metrics["accuracy"] == pytest.approx(np.trace(matrix) / 48)
    assert sum(b["count"] for b in metrics["reliability"]["bins"]) == 48
    html = (tmp_path / "eval" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # confusion, reliability, coverage
    curve = metrics["accuracy_coverage"]
    assert curve[-1]["coverage"] == 1.0 and curve[-1]["accuracy"] == pytest.approx(metrics["accuracy"])
    withholding = metrics["withholding"]
    reached = [p for p in curve if p["accuracy"] >= 0.6]
    if reached:  # the smallest threshold that reaches it, and what it withholds
        assert withholding["min_confidence"] == min(p["min_confidence"] for p in reached)
        assert withholding["withheld"] == pytest.approx(1 - withholding["coverage"])
    else:
        assert withholding["min_confidence"] is None
    assert html.count("data:image/jpeg;base64,") >= 6
    assert "most confident wrong" in html and "least confident" in html


def test_tflite_export_agrees_with_the_saved_model(trained):
    metadata = read_metadata(trained["model_dir"])
    assert metadata.tflite and metadata.tflite["max_abs_diff_vs_saved_model"] <= 1e-4
    images = reference_batch(TINY_SIZE, TINY_SIZE, seeds=range(20, 30))
    tflite = ServingModel(trained["model_dir"], metadata, runtime="tflite")
    saved = ServingModel(trained["model_dir"], metadata, runtime="saved_model")
    assert (tflite.runtime, saved.runtime) == ("tflite", "saved_model")
    np.testing.assert_allclose(tflite.predict(images), saved.predict(images), atol=1e-4)
    # Batch size changes re-allocate the interpreter's tensors.
    np.testing.assert_allclose(tflite.predict(images[:3]), saved.predict(images[:3]), atol=1e-4)
    assert tflite.check_reference_predictions() < 1e-4


def test_auto_runtime_is_tflite_on_cpu_and_saved_model_without_an_export():
    from serving.runtimes import choose_runtime

    base = dict(model_version="v", class_names=["cat", "dog"], input_size=[32, 32],
                resize_method="bilinear", preprocessing=PREPROCESSING_VERSION, base="mobilenet",
                base_weights="none", sha256="x")
    with_tflite = ModelMetadata(**base, tflite={"sha256": "y"})
    assert choose_runtime("auto", with_tflite, "CPU") == "tflite"
    assert choose_runtime("auto", with_tflite, "GPU x1") == "saved_model"
    assert choose_runtime("auto", ModelMetadata(**base), "CPU") == "saved_model"
    with pytest.raises(ModelContractError, match="no model.tflite"):
        choose_runtime("tflite", ModelMetadata(**base), "CPU")


def test_a_gpu_machine_scores_in_full_float32_not_tf32(monkeypatch):
    """TF32 (TensorFlow's default on Ampere+) moved real predictions by 4.4e-3 on an H100."""
    from serving import runtimes as serving

    monkeypatch.setattr(serving, "gpu_possible", lambda: True)
    tf.config.experimental.enable_tensor_float_32_execution(True)
    try:
        assert serving.configure_devices() == "CPU"  # this machine has no GPU behind the node
        assert not tf.config.experimental.tensor_float_32_execution_enabled()
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(True)
