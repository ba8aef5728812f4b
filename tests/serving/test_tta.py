"""Mirrored scoring (``tta="flip"``): the mean of the probabilities of each image and of its
left-right mirror, the out-of-scope score of the image as it is, on every runtime."""

from __future__ import annotations

import numpy as np
import pytest

from serving.metadata import read_metadata
from serving.reference import reference_batch
from serving.runtimes import ServingModel
from serving.tta import mean_of_views, mirrored, predict_views
from tests.conftest import TINY_SIZE
from tests.model.test_train_export import FLOAT_RUNTIMES_AGREE


@pytest.mark.parametrize("runtime", ["saved_model", "tflite", "keras"])
def test_flip_is_the_mean_of_the_image_and_its_mirrored_copy(trained, runtime):
    model = ServingModel(trained["model_dir"], read_metadata(trained["model_dir"]), runtime)
    images = reference_batch(TINY_SIZE, TINY_SIZE, seeds=range(70, 79))  # 9: LiteRT pads its last invoke
    copies = np.ascontiguousarray(images[:, :, ::-1])  # a mirrored copy, as a mirrored file decodes
    as_is, mirror = model.predict_outputs(images), model.predict_outputs(copies)
    assert np.max(np.abs(as_is.probabilities - mirror.probabilities)) > 1e-4, "mirroring changes nothing"
    flipped = model.predict_outputs(images, tta="flip")
    assert flipped.probabilities.shape == (9, 2) and flipped.probabilities.dtype == np.float32
    np.testing.assert_allclose(flipped.probabilities, (as_is.probabilities + mirror.probabilities) / 2,
                               atol=FLOAT_RUNTIMES_AGREE)
    np.testing.assert_allclose(flipped.scope_score, as_is.scope_score, atol=FLOAT_RUNTIMES_AGREE)
    views = model.predict_views(images, "flip")
    assert views.probabilities.shape == (2, 9, 2)
    np.testing.assert_allclose(views.probabilities[1], mirror.probabilities, atol=FLOAT_RUNTIMES_AGREE)
    np.testing.assert_array_equal(model.predict_outputs(images, tta="none").probabilities,
                                  model.predict(images))
    with pytest.raises(ValueError, match="tta 'rotate' is not one of"):
        model.predict_outputs(images, tta="rotate")


def test_the_mirror_reverses_each_row_and_one_call_or_two_passes_give_the_same_views():
    images = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    mirror = mirrored(images)
    assert mirror.flags.c_contiguous and not np.shares_memory(mirror, images)
    np.testing.assert_array_equal(mirror, images[:, :, ::-1])
    assert mirror[0, 0, 0].tolist() == images[0, 0, 3].tolist()  # a pixel's channels stay in order
    np.testing.assert_array_equal(mirrored(images[:, :, ::-1]), images)  # a view in, too
    calls = []

    def predict(batch):  # "probabilities" that depend on the pixels' left-right order
        calls.append(len(batch))
        weights = np.arange(1, 5, dtype=np.float64)
        left = (batch[..., 0].astype(np.float64) * weights).sum(axis=(1, 2))
        p = (left / (left + 1000.0)).astype(np.float32)
        return np.stack([1 - p, p], axis=1), p * 10

    one = predict_views(predict, images, "flip", one_call=True)
    two = predict_views(predict, images, "flip", one_call=False)
    assert calls == [4, 2, 2]
    np.testing.assert_array_equal(one.probabilities, two.probabilities)
    np.testing.assert_array_equal(one.scope_score, two.scope_score)
    np.testing.assert_array_equal(one.scope_score, predict(images)[1])
    assert not np.array_equal(one.probabilities[0], one.probabilities[1])
    np.testing.assert_allclose(mean_of_views(one.probabilities).sum(axis=1), 1.0, rtol=1e-6)
