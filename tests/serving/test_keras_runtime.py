"""``--runtime keras``: the export's model.keras on JAX (and PyTorch where installed) scores as the
SavedModel does, ``auto`` picks it where only a Keras backend sees a GPU, and what it cannot
serve is refused before any work."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import types

import keras
import numpy as np
import pytest

from pipeline import score
from serving import runtimes
from serving.metadata import ModelMetadata, file_sha256, read_metadata, write_metadata
from serving.preprocessing import PREPROCESSING_VERSION
from serving.runtimes import ServingModel, choose_runtime
from tests.backends import BACKENDS, DEEP_RANDOM_BASE, run_on_backend, saved_model_gap, score_on_backend
from tests.corpus import GOOD


def copy_model(trained: dict, target: str, without: str | None = None) -> str:
    shutil.copytree(trained["model_dir"], target,
                    ignore=shutil.ignore_patterns(without) if without else None)
    return target


def refused(capsys, argv: list[str], output: str) -> str:
    assert score.main([*argv, "--output", output]) == 1
    assert not os.path.exists(output)
    message = capsys.readouterr().err
    assert message.startswith("petscore: refused before any work: ") and message.count("\n") == 1
    return message


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_trained_model_scores_on_another_keras_backend_as_on_the_saved_model(backend, trained, corpus,
                                                                                tmp_path):
    root, expected = corpus
    output = str(tmp_path / "out")
    ran = score_on_backend(backend, [["--input", os.path.join(root, "*"), "--model-dir", trained["model_dir"],
                                      "--output", output, "--runtime", "keras", "--max-error-rate", "1"]])
    assert ran == {"backend": backend, "codes": [0]}
    with open(os.path.join(output, "summary.json")) as handle:
        summary = json.load(handle)
    assert summary["predictions"] == sum(outcome == GOOD for outcome in expected.values())
    gap = saved_model_gap(output, trained["model_dir"])
    print(f"{backend} against the SavedModel, largest difference: {gap:.2e}")  # docs/gpu.md's figures
    assert gap <= DEEP_RANDOM_BASE


def test_auto_picks_keras_where_jax_sees_a_gpu_and_tensorflow_does_not(trained, tmp_path):
    """A worker image with JAX and no TensorFlow on a GPU machine (the GPU faked in JAX's own
    answer): auto scores with model.keras, on any batch size (padded to a compiled one)."""
    bare = copy_model(trained, str(tmp_path / "no-keras"), without="model.keras")
    code = f"""
import json, os
import jax
import numpy as np
from serving import runtimes
from serving.metadata import read_metadata
from serving.reference import reference_batch
runtimes.gpu_possible = lambda: True
jax.default_backend, jax.device_count = lambda: "gpu", lambda: 1
model = runtimes.ServingModel({trained["model_dir"]!r}, read_metadata({trained["model_dir"]!r}), "auto")
images = reference_batch(32, 32, seeds=range(40, 51))
whole = model.predict(images)
parts = np.concatenate([model.predict(images[:1]), model.predict(images[1:10]), model.predict(images[10:])])
fallback = runtimes.ServingModel({bare!r}, read_metadata({bare!r}), "auto")
print(json.dumps({{"runtime": model.runtime, "device": model.device, "rows": len(whole),
                  "batches_agree": float(np.max(np.abs(whole - parts))),
                  "reference": model.check_reference_predictions(),
                  "preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
                  "without_model_keras": fallback.runtime}}))
"""
    result = run_on_backend("jax", code)
    assert result["runtime"] == "keras" and result["device"] == "GPU x1" and result["rows"] == 11
    assert result["batches_agree"] <= 1e-6 and result["reference"] <= DEEP_RANDOM_BASE
    assert result["preallocate"] == "false"  # other SDK processes on the worker share the GPU
    assert result["without_model_keras"] == "tflite"


def fake_torch(gpus: int, per_operator_precision: bool = True) -> types.SimpleNamespace:
    """What ``keras_devices`` touches of PyTorch: its GPU count and its TF32 switches (2.9+'s
    per-operator ``fp32_precision``, or the older ``allow_tf32`` flags)."""
    def switch(**flags):
        return types.SimpleNamespace(**flags)
    if per_operator_precision:
        backends = switch(cuda=switch(matmul=switch(fp32_precision="tf32")),
                          cudnn=switch(conv=switch(fp32_precision="tf32")))
    else:
        backends = switch(cuda=switch(matmul=switch(allow_tf32=True)), cudnn=switch(allow_tf32=True))
    return types.SimpleNamespace(cuda=switch(device_count=lambda: gpus), backends=backends)


@pytest.mark.parametrize("per_operator_precision", [True, False])
def test_auto_picks_keras_where_pytorch_sees_a_gpu_in_full_float32(monkeypatch, per_operator_precision):
    torch = fake_torch(2, per_operator_precision)
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setattr(runtimes, "gpu_possible", lambda: True)
    assert runtimes.keras_devices("torch") == "GPU x2"
    if per_operator_precision:
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "ieee"
    else:
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    metadata = tiny_metadata(tflite={"sha256": "y"})
    assert choose_runtime("auto", metadata, "CPU", runtimes.keras_devices("torch")) == "keras"
    monkeypatch.setitem(sys.modules, "torch", fake_torch(0))
    assert runtimes.keras_devices("torch") == "CPU"
    assert choose_runtime("auto", metadata, "CPU", runtimes.keras_devices("torch")) == "tflite"


def test_without_a_gpu_node_no_backend_library_is_imported(monkeypatch):
    monkeypatch.setattr(runtimes, "gpu_possible", lambda: False)
    monkeypatch.setitem(sys.modules, "torch", None)  # importing it would raise
    monkeypatch.setitem(sys.modules, "jax", None)
    assert runtimes.keras_devices("torch") == runtimes.keras_devices("jax") == "CPU"


def tiny_metadata(**fields) -> ModelMetadata:
    return ModelMetadata(model_version="v", class_names=["cat", "dog"], input_size=[32, 32],
                         resize_method="bilinear", preprocessing=PREPROCESSING_VERSION,
                         base="mobilenet", base_weights="none", sha256="x", **fields)


def test_auto_prefers_tensorflows_gpu_then_a_keras_backends_then_litert():
    with_tflite, without = tiny_metadata(tflite={"sha256": "y"}), tiny_metadata()
    assert choose_runtime("auto", with_tflite, "GPU x1", "GPU x1") == "saved_model"
    assert choose_runtime("auto", with_tflite, "CPU", "GPU x1") == "keras"
    assert choose_runtime("auto", with_tflite, "CPU", "CPU") == "tflite"
    assert choose_runtime("auto", without, "CPU", "CPU") == "saved_model"
    assert choose_runtime("keras", without, "CPU") == "keras"  # asked for: on the CPU too


def test_the_keras_runtime_on_tensorflow_equals_the_saved_model(trained):
    """The test process's own backend: the same kernels as the SavedModel, to the bit."""
    metadata = read_metadata(trained["model_dir"])
    model = ServingModel(trained["model_dir"], metadata, "keras")
    assert (model.runtime, model.device, keras.backend.backend()) == ("keras", "CPU", "tensorflow")
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    saved_model = ServingModel(trained["model_dir"], metadata, "saved_model")
    np.testing.assert_array_equal(model.predict(images), saved_model.predict(images))


# --- refusals: one line, exit 1, before any work --------------------------------------------

def test_a_directory_without_model_keras_is_refused(trained, corpus, tmp_path, capsys):
    """A model packaged from a SavedModel directory has no model.keras."""
    model_dir = copy_model(trained, str(tmp_path / "m"), without="model.keras")
    message = refused(capsys, ["--input", os.path.join(corpus[0], "*"), "--model-dir", model_dir,
                               "--runtime", "keras"], str(tmp_path / "out"))
    assert "has no model.keras" in message and "--runtime saved_model" in message


def test_a_layer_that_does_not_load_on_the_backend_is_refused(trained, corpus, tmp_path, capsys,
                                                               monkeypatch):
    """An export whose model.keras holds a layer this scorer does not know (a notebook's own)."""

    @keras.saving.register_keras_serializable(package="notebook")
    class Brighten(keras.layers.Layer):
        def call(self, inputs):
            return inputs * 1.1

    model_dir = copy_model(trained, str(tmp_path / "m"))
    keras_file = os.path.join(model_dir, "model.keras")
    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(Brighten()(inputs))
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(pooled)).save(keras_file)
    metadata = read_metadata(model_dir)
    write_metadata(model_dir, dataclasses.replace(metadata, keras={"sha256": file_sha256(keras_file)}))
    monkeypatch.delitem(keras.saving.get_custom_objects(), "notebook>Brighten")
    message = refused(capsys, ["--input", os.path.join(corpus[0], "*"), "--model-dir", model_dir,
                               "--runtime", "keras"], str(tmp_path / "out"))
    assert "does not load on Keras's tensorflow backend" in message and "Brighten" in message
    assert "--runtime saved_model or tflite" in message


def test_a_runtime_whose_library_is_not_installed_is_refused(trained, corpus, tmp_path):
    """Keras's configured backend (PyTorch here) or TensorFlow missing, as on a slim worker image."""
    code = f"""
import contextlib, io, json
from pipeline import score
refusals = []
for runtime in ("keras", "saved_model"):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = score.main(["--input", {os.path.join(corpus[0], "*")!r}, "--model-dir",
                           {trained["model_dir"]!r}, "--output", {str(tmp_path / "out")!r},
                           "--runtime", runtime])
    refusals.append([code, stderr.getvalue()])
print(json.dumps(refusals))
"""
    (keras_code, keras_message), (tf_code, tf_message) = run_on_backend("torch", code,
                                                                        absent=("tensorflow", "torch"))
    assert keras_code == tf_code == 1 and not os.path.exists(tmp_path / "out")
    for message in (keras_message, tf_message):
        assert message.startswith("petscore: refused before any work: ") and message.count("\n") == 1
    assert "runtime 'keras' cannot start Keras's 'torch' backend" in keras_message
    assert "KERAS_BACKEND" in keras_message
    assert "runtime 'saved_model' needs TensorFlow" in tf_message
    assert "--runtime keras or tflite" in tf_message


def test_a_changed_model_keras_is_refused_whatever_the_runtime(trained, corpus, tmp_path, capsys):
    model_dir = copy_model(trained, str(tmp_path / "m"))
    assert read_metadata(model_dir).keras == {"sha256": file_sha256(os.path.join(model_dir, "model.keras"))}
    with open(os.path.join(model_dir, "model.keras"), "ab") as handle:
        handle.write(b"\0")
    message = refused(capsys, ["--input", os.path.join(corpus[0], "*"), "--model-dir", model_dir],
                      str(tmp_path / "out"))
    assert "model.keras hashes to" in message and "changed after export" in message
