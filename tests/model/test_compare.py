"""``python -m model.compare``: figures with intervals, McNemar's test, the images decided
differently and a verdict that says "no evidence" for two copies of one model."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from model import compare
from model.architecture import final_dense_layer
from model.export import export_model
from model.out_of_scope import load_classifier
from pipeline.promotion import compare_verdict
from serving.metadata import METADATA_FILE, read_metadata


@pytest.fixture(scope="module")
def overconfident(trained, tmp_path_factory) -> str:
    """The tiny trained model with its head's weights multiplied by 5: the same decisions, far
    more confident (on the tests' images it is mostly wrong, so a far worse log loss)."""
    classifier = load_classifier(trained["model_dir"])
    head = final_dense_layer(classifier)
    head.set_weights([weights * 5 for weights in head.get_weights()])
    metadata = read_metadata(trained["model_dir"])
    model_dir = str(tmp_path_factory.mktemp("overconfident") / "model")
    export_model(classifier, model_dir, class_names=metadata.class_names, base="mobilenet",
                 base_weights="none", model_version="tiny-overconfident",
                 preprocessing=metadata.preprocessing, resize_method=metadata.resize_method)
    return model_dir


def copy_with_classes(model_dir: str, copy: str, class_names: list[str]) -> str:
    """A copy of ``model_dir`` whose metadata names its outputs ``class_names``."""
    shutil.copytree(model_dir, copy)
    fields = json.loads(open(os.path.join(copy, METADATA_FILE)).read())
    fields["class_names"] = class_names
    with open(os.path.join(copy, METADATA_FILE), "w") as handle:
        json.dump(fields, handle)
    return copy


def run(a: str, b: str, data: str, output: str, *extra: str) -> dict:
    assert compare.main(["--model", a, "--model", b, "--data", data, "--output", output,
                         "--resamples", "500", *extra]) == 0
    with open(os.path.join(output, "compare.json")) as handle:
        return json.load(handle)


def test_a_clearly_worse_model_is_worse_and_the_other_way_round_better(trained, overconfident,
                                                                          labelled_images, tmp_path):
    worse = run(trained["model_dir"], overconfident, labelled_images, str(tmp_path / "ab"))
    assert worse["verdict"]["verdict"] == "B worse", worse["verdict"]["line"]
    assert worse["images"] == 48 and worse["class_names"] == ["cat", "dog"]
    a, b, difference = worse["models"]["A"], worse["models"]["B"], worse["differences"]
    assert b["log_loss"] > a["log_loss"] + 1
    for figures in (a, b):
        for name in ("accuracy", "log_loss", "expected_calibration_error"):
            low, high = figures[f"{name}_interval"]
            assert low <= figures[name] <= high, name
    assert difference["log_loss"] == pytest.approx(b["log_loss"] - a["log_loss"], abs=1e-5)
    assert difference["log_loss_interval"][0] > compare.LOG_LOSS_MARGIN
    # The same decisions: nothing for McNemar's test, nothing decided differently.
    assert worse["mcnemar"] == {"only_a_right": 0, "only_b_right": 0, "p_value": 1.0}
    assert worse["disagreements"] == [] and difference["accuracy"] == 0
    html = open(tmp_path / "ab" / "compare.html").read()
    assert "B worse" in html and html.count("data:image/png;base64,") == 2  # both reliability diagrams
    better = run(overconfident, trained["model_dir"], labelled_images, str(tmp_path / "ba"))
    assert better["verdict"]["verdict"] == "B better", better["verdict"]["line"]
    assert better["differences"]["log_loss_interval"][1] < -compare.LOG_LOSS_MARGIN
    # deploy/nightly.sh promote reads this file: the verdict on model B, and only on that model.
    candidate = read_metadata(trained["model_dir"]).sha256
    assert compare_verdict(str(tmp_path / "ba" / "compare.json"), candidate) == "B better"
    with pytest.raises(ValueError, match="not the candidate"):
        compare_verdict(str(tmp_path / "ab" / "compare.json"), candidate)


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_two_copies_of_one_model_give_no_evidence(trained, labelled_images, tmp_path, tta):
    copy = str(tmp_path / "copy")
    shutil.copytree(trained["model_dir"], copy)
    result = run(trained["model_dir"], copy, labelled_images, str(tmp_path / "out"), "--tta", tta)
    assert result["verdict"]["verdict"] == "no evidence" and result["tta"] == tta
    assert result["mcnemar"]["p_value"] == 1.0 and result["disagreements"] == []
    for name in ("accuracy", "log_loss", "expected_calibration_error"):
        assert result["differences"][name] == 0 and result["differences"][f"{name}_interval"] == [0, 0]


def test_models_that_decide_differently_are_listed_and_tested(trained, labelled_images, tmp_path):
    """B: A with its classes' names swapped in its metadata, so every decision differs."""
    swapped = copy_with_classes(trained["model_dir"], str(tmp_path / "swapped"), ["dog", "cat"])
    result = run(trained["model_dir"], swapped, labelled_images, str(tmp_path / "out"))
    right_a = round(result["models"]["A"]["accuracy"] * 48)
    assert result["mcnemar"]["only_a_right"] == right_a and result["mcnemar"]["only_b_right"] == 48 - right_a
    assert len(result["disagreements"]) == 48
    first = result["disagreements"][0]
    assert first["a_decision"] != first["b_decision"]
    assert first["a_probabilities"] == pytest.approx(first["b_probabilities"][::-1], abs=1e-6)
    assert os.path.exists(first["path"]) and first["label"] in ("cat", "dog")


def test_models_of_other_classes_are_refused_in_one_line_before_scoring(trained, labelled_images, tmp_path,
                                                                        capsys):
    other = copy_with_classes(trained["model_dir"], str(tmp_path / "other"), ["tabby", "beagle"])
    assert compare.main(["--model", trained["model_dir"], "--model", other, "--data", labelled_images,
                         "--output", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "are not B's ['tabby', 'beagle']" in error
    assert not os.path.exists(tmp_path / "out")
    assert compare.main(["--model", trained["model_dir"], "--data", labelled_images,
                         "--output", str(tmp_path / "out")]) == 1
    assert "give it twice" in capsys.readouterr().err


@pytest.mark.parametrize("p_value, only_a, only_b, interval, want", [
    (0.001, 2, 20, [-0.05, -0.01], "B better"),   # both tests favour B
    (0.5, 5, 7, [-0.05, -0.01], "B better"),      # log loss alone
    (0.001, 2, 20, [-0.01, 0.02], "B better"),    # McNemar alone
    (0.001, 20, 2, [0.01, 0.05], "B worse"),
    (0.5, 5, 7, [0.002, 0.05], "B worse"),
    (0.001, 2, 20, [0.01, 0.05], "no evidence"),  # they disagree
    (0.5, 5, 7, [-0.0009, -0.0001], "no evidence"),  # within the margin
    (1.0, 0, 0, [0.0, 0.0], "no evidence"),
])
def test_the_verdict_rule(p_value, only_a, only_b, interval, want):
    test = {"p_value": p_value, "only_a_right": only_a, "only_b_right": only_b}
    result = compare.verdict(test, interval, compare.LOG_LOSS_MARGIN)
    assert result["verdict"] == want and result["line"].startswith(want)
    assert "McNemar" in result["rule"] and result["alpha"] == 0.05


def test_mcnemar_is_scipys_exact_binomial_test_on_the_discordant_pairs():
    a = np.array([1, 1, 1, 0, 0, 1, 0, 1], bool)
    b = np.array([0, 0, 0, 0, 1, 1, 0, 0], bool)  # A alone right on 4, B alone on 1
    assert compare.mcnemar(a, b) == {"only_a_right": 4, "only_b_right": 1, "p_value": pytest.approx(0.375)}
