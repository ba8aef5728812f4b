"""Mirrored scoring (--tta flip) and human faces (--faces detect) through the real CLI.

Three nights of the session's model on made PNGs under one ``scores/`` prefix: 1 ``--tta flip
--faces detect`` with the model as its own ``--challenger-model``; 2 the same files plainly;
3 mirrored copies of the files, plainly, compared with the two earlier nights. The files are
at the model's input size and lossless, so decoding a mirrored file gives exactly the mirror of
the decoded image (no resize, no JPEG), and the flip night must equal the mean of nights 2 and 3
up to float32 rounding of that mean. Photos of people: ``test_the_shared_photos_of_people_are_human``
(needs ``../shared``, the project's real data, beside the repository).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline import score
from pipeline.rows import HUMAN
from tests.conftest import TINY_SIZE, tiny_training_args
from tests.pipeline.outputs import ReportParser, read_parquet_shards, read_run
from tests.pipeline.test_out_of_scope import model_with_threshold

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The project's real data: ../shared/data beside the repository (PETSCORE_SHARED_DATA elsewhere).
SHARED_DATA = os.environ.get("PETSCORE_SHARED_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
PEOPLE = [os.path.join(SHARED_DATA, "faces", name) for name in ("astronaut.png", "camera.png")]
# The flip night's probabilities are float32 means of two float32 views, stored as float64; the
# plain nights' are the two views themselves. Their mean differs from the stored one by float32
# rounding only (at most half an ulp of a probability <= 1: 6e-8).
FLOAT32_MEAN = 2e-7


def write_pngs(folder, count: int, mirror: bool = False) -> None:
    """``count`` smooth but lopsided RGB images at the model's input size (a left-right
    gradient plus seeded noise), or their left-right mirrors, as lossless PNGs."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(5)
    ramp = np.linspace(0, 200, TINY_SIZE)[np.newaxis, :, np.newaxis]
    for index in range(count):
        pixels = np.clip(ramp * rng.uniform(0.2, 1.2, 3) + rng.normal(0, 25, (TINY_SIZE, TINY_SIZE, 3)),
                         0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        (image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else image).save(
            os.path.join(folder, f"{index + 1}.png"))


def run_cli(*args: str) -> int:
    return score.main([*args, "--max-error-rate", "0"])


@pytest.fixture(scope="module")
def nights(trained, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mirrored")
    write_pngs(root / "images", 6)
    write_pngs(root / "mirrored", 6, mirror=True)
    outputs = [str(root / "scores" / f"dt=2026-11-2{day}") for day in (1, 2, 3)]
    model = ["--model-dir", trained["model_dir"], "--run-id", "night"]
    codes = [
        run_cli("--input", str(root / "images" / "*.png"), *model, "--output", outputs[0], "--run-date",
                "2026-11-21", "--tta", "flip", "--faces", "detect",
                "--challenger-model", trained["model_dir"]),
        run_cli("--input", str(root / "images" / "*.png"), *model, "--output", outputs[1], "--run-date",
                "2026-11-22"),
        run_cli("--input", str(root / "mirrored" / "*.png"), *model, "--output", outputs[2], "--run-date",
                "2026-11-23", "--compare-to", str(root / "scores" / "dt=*")),
    ]
    return {"codes": codes, "outputs": outputs, "runs": [read_run(output) for output in outputs]}


def probabilities(table) -> dict[str, np.ndarray]:
    """``{file name: [P(cat), P(dog)]}`` of a predictions table."""
    return {os.path.basename(row["path"]): np.array([row["prob_cat"], row["prob_dog"]])
            for row in table.to_pylist()}


def test_tta_flip_equals_the_mean_of_a_night_on_the_files_and_one_on_their_mirrors(nights):
    assert nights["codes"] == [0, 0, 0]
    flip, plain, mirror = (probabilities(run["predictions"]) for run in nights["runs"])
    assert set(flip) == set(plain) == set(mirror) and len(flip) == 6
    assert max(np.abs(plain[name] - mirror[name]).max() for name in plain) > 1e-3, "mirroring changes nothing"
    for name in flip:
        np.testing.assert_allclose(flip[name], (plain[name] + mirror[name]) / 2, atol=FLOAT32_MEAN, rtol=0)
    flipped, plainly = nights["runs"][0], nights["runs"][1]
    assert set(flipped["predictions"]["tta"].to_pylist()) == {"flip"}
    assert set(plainly["predictions"]["tta"].to_pylist()) == {"none"}
    assert (flipped["summary"]["tta"], plainly["summary"]["tta"]) == ("flip", "none")
    # the out-of-scope score is the image's as it is, not a mean of views
    np.testing.assert_allclose(flipped["predictions"]["scope_score"].to_numpy(),
                               plainly["predictions"]["scope_score"].to_numpy(), atol=1e-6)


def test_the_challenger_is_scored_the_same_way_and_shares_the_face_counts(nights):
    output, run = nights["outputs"][0], nights["runs"][0]
    theirs = read_parquet_shards(os.path.join(output, "challenger", "predictions"))
    assert set(theirs["tta"].to_pylist()) == {"flip"}
    ours = {row["path"]: row for row in run["predictions"].to_pylist()}
    for row in theirs.to_pylist():  # the model is its own challenger: the very same mirrored scores
        assert row["prob_dog"] == pytest.approx(ours[row["path"]]["prob_dog"], abs=1e-6)
        assert row["human_faces"] == ours[row["path"]]["human_faces"]
    assert run["summary"]["challenger"]["agreement"] == 1.0


def test_made_images_have_no_face_and_the_counts_are_null_when_faces_are_off(nights):
    detected, plain = nights["runs"][0], nights["runs"][1]
    assert detected["predictions"]["human_faces"].to_pylist() == [0] * 6
    assert HUMAN not in detected["predictions"]["decision"].to_pylist()
    summary = detected["summary"]
    assert (summary["faces"], summary["human"], summary["with_human_faces"]) == ("detect", 0, 0)
    assert plain["predictions"]["human_faces"].null_count == 6
    assert (plain["summary"]["faces"], plain["summary"]["human"], plain["summary"]["with_human_faces"]) == (
        "off", None, None)
    with open(os.path.join(nights["outputs"][0], "report.html")) as handle:
        report = ReportParser(handle.read())
    assert report.tables["human-faces"][0] == ["images with a human face", "0 (0.0%)"]


def test_drift_compares_only_the_nights_scored_the_same_way_and_names_the_others(nights):
    drift = nights["runs"][2]["summary"]["drift"]
    assert [run["run_date"] for run in drift["compared_to"]] == ["2026-11-22"]
    assert [(run["run_date"], run["tta"], run["faces"]) for run in drift["not_comparable"]] == [
        ("2026-11-21", "flip", "detect")]
    assert drift["note"].startswith("not comparable: 1 earlier night(s)")
    assert "2026-11-21 (--tta flip, --faces detect)" in drift["note"]
    with open(os.path.join(nights["outputs"][2], "report.html")) as handle:
        assert "2026-11-21 (--tta flip, --faces detect)" in handle.read()


@pytest.fixture(scope="module")
def model_128(labelled_images, tmp_path_factory) -> str:
    """A tiny model of 128 px inputs with an out-of-scope detector: faces are counted in the
    pixels the model scores, and at the session model's 32 px there are none to see."""
    from model.train import train

    output = os.path.join(str(tmp_path_factory.mktemp("model128")), "tiny128")
    train(tiny_training_args(labelled_images, output, input_size=128, epochs=1,
                             model_version="tiny-128"))
    return output


@pytest.mark.skipif(not all(map(os.path.isfile, PEOPLE)),
                    reason=f"no shared photos of people under {SHARED_DATA}")
def test_the_shared_photos_of_people_are_human(model_128, tmp_path):
    """Both photos show a face; with a detector that finds them out of scope they are ``human``,
    and made images without a face stay ``out_of_scope`` (``--faces unsure``: the images looked
    at are those out of scope, here all four). A tiny model on a random base has no
    real notion of scope, so its threshold is moved below every score (as test_out_of_scope
    does); the real alpha 0.25 model's own detector gives the same decisions
    (docs/scoring.md#dog-human-or-neither)."""
    model_dir = model_with_threshold({"model_dir": model_128}, str(tmp_path), 0.0)
    folder = tmp_path / "images"
    write_pngs(folder, 2)
    for path in PEOPLE:
        shutil.copy(path, folder / os.path.basename(path))
    output = str(tmp_path / "people")
    assert run_cli("--input", str(folder / "*.png"), "--model-dir", model_dir, "--output", output,
                   "--faces", "unsure") == 0
    run = read_run(output)
    rows = {os.path.basename(row["path"]): row for row in run["predictions"].to_pylist()}
    for name in ("astronaut.png", "camera.png"):
        assert (rows[name]["human_faces"], rows[name]["decision"]) == (1, HUMAN), rows[name]
        assert rows[name]["predicted_class"] in ("cat", "dog")  # the most resembling class, still named
    for name in ("1.png", "2.png"):
        assert (rows[name]["human_faces"], rows[name]["decision"]) == (0, "out_of_scope")
    assert (run["summary"]["human"], run["summary"]["with_human_faces"], run["summary"]["out_of_scope"]) == (
        2, 2, 2)
