"""Scoring with a model's out-of-scope detector: the scope_score column, the out_of_scope decision,
the review queue's order, the report's section, the drift check, and models without a detector."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest

from pipeline import score
from pipeline.drift import compute_drift
from serving.metadata import read_metadata
from serving.preprocessing import decode_and_resize
from serving.runtimes import ServingModel
from tests.corpus import GOOD
from tests.pipeline.outputs import ReportParser, read_run
from tests.pipeline.test_drift import night


def model_with_threshold(trained: dict, folder: str, threshold: float) -> str:
    """A copy of the session's model (it has a detector: model.train fits one) whose metadata
    flags above ``threshold``: the model and its hashes are unchanged, only where to flag moves."""
    model_dir = os.path.join(folder, f"model-{threshold:.6f}")
    shutil.copytree(trained["model_dir"], model_dir)
    path = os.path.join(model_dir, "metadata.json")
    with open(path) as handle:
        fields = json.load(handle)
    fields["out_of_scope"]["threshold"] = threshold
    with open(path, "w") as handle:
        json.dump(fields, handle)
    return model_dir


@pytest.fixture(scope="module")
def scored_scope(corpus, trained, tmp_path_factory) -> dict:
    """The corpus scored with the threshold at the median of its images' scope scores, so that
    about half of them are flagged, with the scores the model gives the same pixels directly."""
    root, expected = corpus
    good = sorted(os.path.join(root, name) for name, outcome in expected.items() if outcome == GOOD)
    metadata = read_metadata(trained["model_dir"])
    assert metadata.has_scope_detector
    pixels = np.stack([decode_and_resize(open(path, "rb").read(), tuple(metadata.input_size),
                                         preprocessing=metadata.preprocessing) for path in good])
    direct = ServingModel(trained["model_dir"], metadata, "tflite").predict_outputs(pixels)
    threshold = float(np.median(direct.scope_score))
    folder = str(tmp_path_factory.mktemp("scope"))
    model_dir = model_with_threshold(trained, folder, threshold)
    output = os.path.join(folder, "run")
    score.run(["--input", os.path.join(root, "*"), "--model-dir", model_dir, "--output", output,
               "--min-confidence", "0.9", "--review-size", "12", "--max-error-rate", "1",
               "--runtime", "tflite"])
    outputs = zip(direct.scope_score, direct.probabilities, strict=True)
    return {"run": read_run(output), "output": output, "threshold": threshold, "model_dir": model_dir,
            "direct": dict(zip(good, outputs, strict=True))}


def test_each_row_has_its_scope_score_and_the_flagged_ones_are_out_of_scope(scored_scope):
    rows = scored_scope["run"]["predictions"].to_pylist()
    threshold, direct = scored_scope["threshold"], scored_scope["direct"]
    assert sorted(row["path"] for row in rows) == sorted(direct)
    flagged = 0
    for row in rows:
        want_score, want_probabilities = direct[row["path"]]
        assert row["scope_score"] == pytest.approx(float(want_score), abs=1e-5)
        if row["scope_score"] > threshold:
            flagged += 1
            assert row["decision"] == "out_of_scope"  # whatever its confidence
        else:
            assert row["decision"] == (row["predicted_class"] if row["confidence"] >= 0.9 else "uncertain")
        assert row["predicted_class"] == ["cat", "dog"][int(np.argmax(want_probabilities))]
    assert 0 < flagged < len(rows)
    summary = scored_scope["run"]["summary"]
    assert summary["out_of_scope"] == flagged and summary["out_of_scope_threshold"] == threshold
    assert summary["uncertain"] == sum(row["decision"] == "uncertain" for row in rows)
    assert summary["accounted"]


def test_the_kaggle_csv_still_holds_every_id(scored_scope):
    rows = scored_scope["run"]["predictions"].to_pylist()
    ids = [row["image_id"] for row in rows if row["image_id"] is not None]
    csv_rows = scored_scope["run"]["csv"][1:]
    assert [int(row[0]) for row in csv_rows] == sorted(ids)
    assert any(row["decision"] == "out_of_scope" and row["image_id"] is not None for row in rows)


def test_the_review_queue_puts_out_of_scope_images_first_the_highest_score_first(scored_scope):
    with open(os.path.join(scored_scope["output"], "review", "review-queue.csv"), newline="") as handle:
        queue = list(csv.DictReader(handle))
    rows = scored_scope["run"]["predictions"].to_pylist()
    out = sorted((row for row in rows if row["decision"] == "out_of_scope"), key=lambda r: -r["scope_score"])
    rest = sorted((row for row in rows if row["decision"] != "out_of_scope"),
                  key=lambda r: (r["confidence"], r["path"]))
    want = (out + rest)[:12]
    assert [row["path"] for row in queue] == [row["path"] for row in want]
    assert [float(row["scope_score"]) for row in queue] == pytest.approx([row["scope_score"] for row in want])


def test_the_report_shows_the_out_of_scope_images_and_their_rate(scored_scope):
    summary = scored_scope["run"]["summary"]
    with open(os.path.join(scored_scope["output"], "report.html")) as handle:
        text = handle.read()
    report = ReportParser(text)
    share = summary["out_of_scope"] / summary["predictions"]
    heading = f"Out of scope: {summary['out_of_scope']} images ({share:.1%} of predictions)"
    assert heading in report.text
    assert dict(report.tables["headline"])["out_of_scope"].startswith(str(summary["out_of_scope"]))
    section = text[text.index(heading):text.index("Review queue")]
    shown = min(summary["out_of_scope"], 12)
    assert section.count("<figure>") == shown and section.count("decision: out_of_scope") == shown


def test_off_scores_as_if_the_model_had_no_detector(corpus, scored_scope, tmp_path):
    root, _ = corpus
    output = str(tmp_path / "off")
    score.run(["--input", os.path.join(root, "*"), "--model-dir", scored_scope["model_dir"],
               "--output", output, "--min-confidence", "0.9", "--max-error-rate", "1",
               "--runtime", "tflite", "--out-of-scope", "off"])
    run = read_run(output)
    assert run["predictions"]["scope_score"].null_count == run["predictions"].num_rows  # none scored
    assert "out_of_scope" not in run["predictions"]["decision"].to_pylist()
    assert run["summary"]["out_of_scope"] is None
    flagged = {row["path"]: row for row in scored_scope["run"]["predictions"].to_pylist()}
    for row in run["predictions"].to_pylist():  # the same probabilities, the detector aside
        assert row["prob_dog"] == pytest.approx(flagged[row["path"]]["prob_dog"], abs=1e-6)


def test_a_model_exported_before_detectors_scores_as_it_always_has(corpus, scored_scope, tmp_path):
    root, _ = corpus
    model_dir = str(tmp_path / "older")
    shutil.copytree(scored_scope["model_dir"], model_dir)
    path = os.path.join(model_dir, "metadata.json")
    with open(path) as handle:
        fields = json.load(handle)
    del fields["out_of_scope"]  # as every metadata.json written before the detector
    for ref in fields["reference_predictions"]:
        del ref["scope_score"]
    with open(path, "w") as handle:
        json.dump(fields, handle)
    output = str(tmp_path / "o")
    score.run(["--input", os.path.join(root, "*"), "--model-dir", model_dir, "--output", output,
               "--min-confidence", "0.9", "--max-error-rate", "1", "--runtime", "tflite"])
    run = read_run(output)
    assert run["predictions"]["scope_score"].null_count == run["predictions"].num_rows  # none scored
    assert set(run["predictions"]["decision"].to_pylist()) <= {"cat", "dog", "uncertain"}
    assert run["summary"]["out_of_scope"] is None and "out_of_scope_rate" not in run["summary"]["drift"]


def test_a_night_whose_out_of_scope_rate_jumps_alerts(corpus, trained, tmp_path):
    """A camera that starts filming a wall: the same images, nights apart, but tonight nearly
    every one is out of scope (the threshold moved below every score)."""
    root, _ = corpus
    calm = model_with_threshold(trained, str(tmp_path), 1e9)  # nothing flagged
    walled = model_with_threshold(trained, str(tmp_path), -1e9)  # everything flagged
    scores = str(tmp_path / "scores")
    for day in ("18", "19"):
        score.run(["--input", os.path.join(root, "*"), "--model-dir", calm, "--output",
                   os.path.join(scores, f"dt=2026-11-{day}"), "--run-date", f"2026-11-{day}",
                   "--max-error-rate", "1"])
    tonight = os.path.join(scores, "dt=2026-11-20")
    summary = score.run(["--input", os.path.join(root, "*"), "--model-dir", walled, "--output", tonight,
                         "--run-date", "2026-11-20", "--compare-to", os.path.join(scores, "dt=*"),
                         "--max-error-rate", "1"])
    check = summary["drift"]["out_of_scope_rate"]
    assert (check["before"], check["tonight"]) == (0.0, 1.0)
    assert check["alert"] and "out_of_scope_rate" in summary["drift"]["alerts"]
    report = ReportParser(open(os.path.join(tonight, "report.html")).read())
    row = next(row for row in report.tables["drift"] if row[0] == "out of scope rate")
    assert row[-1] == "ALERT"


def test_the_out_of_scope_rate_is_compared_only_with_nights_that_had_a_detector():
    scoped = [dict(night(date=f"2026-11-{day}"), out_of_scope=10) for day in (17, 18)]
    older = night(date="2026-11-16")  # no out_of_scope field: a night before detectors
    drift = compute_drift(dict(night(date="2026-11-19"), out_of_scope=100), [older, *scoped])
    check = drift["out_of_scope_rate"]
    assert check["before"] == pytest.approx(20 / 1000) and check["tonight"] == pytest.approx(100 / 500)
    assert check["alert"] and "out_of_scope_rate" in drift["alerts"]
    assert "out_of_scope_rate" not in compute_drift(night(date="2026-11-19"), scoped)
    calm = compute_drift(dict(night(date="2026-11-19"), out_of_scope=6), scoped)
    assert not calm["out_of_scope_rate"]["alert"]  # 1.2% against 1.0%: under the 2-point change
