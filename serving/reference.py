"""Reference images: a few deterministic inputs whose predictions travel in the metadata.

A scorer regenerates them from their seeds, predicts, and compares with the exported values;
a mismatch means the model, its runtime or the preprocessing changed since export.
"""

from __future__ import annotations

import numpy as np

from serving.metadata import SCOPE_SCORE

REFERENCE_SEEDS = (0, 1, 2, 3)
REFERENCE_TOLERANCE = 1e-3
# The out-of-scope score is a cosine distance in [0, 2], on the probabilities' scale: the same
# absolute tolerance. Float runtimes agree on it to ~1e-6.
SCOPE_REFERENCE_TOLERANCE = REFERENCE_TOLERANCE
# An integer model's probabilities move in steps of its output's quantum (1/256), and kernels that
# round intermediate values differently move them by steps: XNNPACK gave identical values for any
# thread count and batch size, TFLite's built-in kernels differed by 4 steps (alpha 0.25
# MobileNet) and 14 (MobileNetV2) on the reference images.
INT8_REFERENCE_TOLERANCE = 16 / 256


def reference_image(seed: int, height: int, width: int) -> np.ndarray:
    """A smooth random colour field (not noise, so it looks like the statistics of a photo)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 4, 3)).astype(np.float64)
    rows = np.linspace(0, 3, height)
    cols = np.linspace(0, 3, width)
    r0 = np.floor(rows).astype(int).clip(0, 2)
    c0 = np.floor(cols).astype(int).clip(0, 2)
    fr = (rows - r0)[:, None, None]
    fc = (cols - c0)[None, :, None]
    top = coarse[r0][:, c0] * (1 - fc) + coarse[r0][:, c0 + 1] * fc
    bottom = coarse[r0 + 1][:, c0] * (1 - fc) + coarse[r0 + 1][:, c0 + 1] * fc
    return np.round(top * (1 - fr) + bottom * fr).astype(np.uint8)


def reference_batch(height: int, width: int, seeds=REFERENCE_SEEDS) -> np.ndarray:
    return np.stack([reference_image(seed, height, width) for seed in seeds])


def reference_predictions(probabilities: np.ndarray, scope_score: np.ndarray | None = None) -> list[dict]:
    """The metadata's record of predictions on ``reference_batch(...)``: one row per seed, with
    the out-of-scope score (``scope_score``) when the model computes one."""
    rows = [{"seed": seed, "probabilities": [round(float(p), 7) for p in row]}
            for seed, row in zip(REFERENCE_SEEDS, probabilities, strict=True)]
    if scope_score is not None:
        for row, score in zip(rows, scope_score, strict=True):
            row[SCOPE_SCORE] = round(float(score), 7)
    return rows
