"""Shared fixtures: a tiny trained model (made once per session) and the image corpus."""

from __future__ import annotations

import argparse
import os
import warnings

import pytest

from model.synthetic import write_labelled_folders
from tests.corpus import write_corpus

TINY_SIZE = 32
# model.train's flags for a seconds-long training run: random MobileNet, 32 px, two short phases
TINY_TRAINING_FLAGS = ("--base", "mobilenet", "--alpha", "0.25", "--base-weights", "none",
                       "--input-size", str(TINY_SIZE), "--epochs", "2", "--batch-size", "16",
                       "--learning-rate", "0.01", "--fine-tune-layers", "20", "--fine-tune-epochs", "1",
                       "--model-version", "tiny-test-1")


def tiny_training_args(data: str, output: str, **overrides) -> argparse.Namespace:
    """Arguments for a seconds-long training run (``TINY_TRAINING_FLAGS``)."""
    from model.train import parse_args

    args = parse_args(["--data", data, "--output", output, *TINY_TRAINING_FLAGS])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.fixture(scope="session")
def labelled_images(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("labelled"))
    write_labelled_folders(root, per_class=24, size=(48, 48))
    return root


@pytest.fixture(scope="session")
def trained(labelled_images, tmp_path_factory) -> dict:
    """``{'model_dir', 'metadata', 'epoch_seconds', 'warnings'}`` of a tiny model trained on
    generated images; ``warnings``: every Python warning the training raised."""
    from model.train import train

    model_dir = os.path.join(str(tmp_path_factory.mktemp("model")), "tiny")
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        result = train(tiny_training_args(labelled_images, model_dir))
    return {"model_dir": model_dir, **result, "warnings": raised}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("corpus"))
    return root, write_corpus(root)
