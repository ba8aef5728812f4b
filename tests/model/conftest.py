"""Fixtures of the notebook tests: the images a notebook user trains on and scores."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from model.synthetic import write_kaggle_test_folder, write_labelled_folders


def write_odd_images(folder: str) -> None:
    """Images whose loaders disagree unless they are the same: transparency, grayscale, CMYK,
    palette and an EXIF rotation (which Keras's load_img ignores)."""
    rng = np.random.default_rng(5)
    photo = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).resize((180, 120))
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    rgba.save(os.path.join(folder, "rgba.png"))
    photo.convert("L").save(os.path.join(folder, "gray.jpg"))
    photo.convert("CMYK").save(os.path.join(folder, "cmyk.jpg"))
    photo.convert("P").save(os.path.join(folder, "palette.bmp"))
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(os.path.join(folder, "rotated.jpg"), exif=exif)


@pytest.fixture(scope="module")
def notebook_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("notebook")
    train = str(root / "train")
    write_labelled_folders(train, per_class=12, size=(64, 80))
    images = root / "test" / "images"  # flow_from_directory wants one sub-folder
    write_kaggle_test_folder(str(images), 8, side_range=(40, 200))
    write_odd_images(str(images))
    return {"root": root, "train": train, "test": str(root / "test"), "images": str(images)}
