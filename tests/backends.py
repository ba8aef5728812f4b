"""Scoring on another Keras backend than the test process's.

Keras fixes its backend when it is first imported, and the test process imports it on TensorFlow,
so a run on JAX or PyTorch happens in a fresh interpreter with ``KERAS_BACKEND`` set. TensorFlow is
made unimportable there, as on a worker image without it (the lent GPU machine has none), so a
run that still reached for it fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from serving.metadata import read_metadata
from serving.preprocessing import decode_and_resize
from serving.runtimes import ServingModel
from tests.pipeline.outputs import read_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# JAX's CPU wheels are pinned (requirements-jax.txt); PyTorch's wheels from PyPI bring CUDA
# (gigabytes), so its runs are slow-marked and need torch installed beside the project.
BACKENDS = ["jax", pytest.param("torch", marks=[
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")])]
# Another backend's float32 kernels against TensorFlow's, for a deep base with random weights
# (tests' models): one-ulp differences at the first convolution (5e-7) grow through the alpha 0.25
# MobileNet's 27 layers to 1.2e-4 in its pooled features. Measured on the tests' images (JAX;
# PyTorch): 1.7e-5, 5.8e-6 for the tiny trained model (LiteRT against the SavedModel: 2.3e-5);
# 8.6e-6 to 1.1e-5, 1.8e-6 for the packaged MobileNet; 1.6e-5, 1.5e-5 for the packaged ResNet50;
# the small CNNs, under 3e-7 (docs/gpu.md).
DEEP_RANDOM_BASE = 5e-5
# Every import finder made blind to some packages: they are then as absent as on a machine without
# them (importlib.util.find_spec answers None, an import raises ModuleNotFoundError).
WITHOUT = """
import sys
class _Without:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {absent!r} or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, name):
        return getattr(self.finder, name)
sys.meta_path[:] = [_Without(finder) for finder in sys.meta_path]
"""


def run_on_backend(backend: str, code: str, absent: tuple[str, ...] = ("tensorflow",), timeout: int = 900):
    """Run ``code`` in a fresh interpreter on Keras's ``backend`` with the ``absent`` packages
    unimportable; return the JSON value it prints on its last line."""
    process = subprocess.run(
        [sys.executable, "-c", WITHOUT.format(absent=set(absent)) + code], cwd=REPO, capture_output=True,
        text=True, timeout=timeout,
        env={**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert process.returncode == 0, process.stderr[-4000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def score_on_backend(backend: str, runs: list[list[str]]) -> dict:
    """``pipeline.score.main(argv)`` for each argv, in one interpreter on ``backend`` without
    TensorFlow; returns ``{"backend": Keras's, "codes": [exit code per run]}``."""
    code = f"""
import json
from pipeline import score
codes = [score.main(argv) for argv in {runs!r}]
import keras
print(json.dumps({{"backend": keras.backend.backend(), "codes": codes}}))
"""
    return run_on_backend(backend, code)


def saved_model_gap(output: str, model_dir: str) -> float:
    """The largest difference between a run's probabilities and the SavedModel's on the same
    images (decoded with the model's own preprocessing), after checking that the run predicted
    the SavedModel's class for every image without a near tie."""
    metadata = read_metadata(model_dir)
    rows = read_run(output)["predictions"].to_pylist()
    assert rows
    pixels = []
    for row in rows:
        with open(row["path"], "rb") as handle:
            pixels.append(decode_and_resize(handle.read(), (metadata.height, metadata.width),
                                            metadata.resize_method, preprocessing=metadata.preprocessing))
    want = ServingModel(model_dir, metadata, "saved_model").predict(np.stack(pixels))
    got = np.array([[row[f"prob_{name}"] for name in metadata.class_names] for row in rows])
    top_two = np.sort(want, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 1e-4  # a near tie may go either way in float32
    assert clear.any()
    assert np.array_equal(got.argmax(axis=1)[clear], want.argmax(axis=1)[clear])
    return float(np.max(np.abs(got - want)))
