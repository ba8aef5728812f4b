"""The run report and drift alerts on generated nights: every section read back and checked."""

from __future__ import annotations

import collections
import csv
import os
import shutil

import pyarrow.parquet as pq
import pytest

from model.synthetic import write_kaggle_test_folder
from pipeline import report, score
from tests.pipeline.outputs import ReportParser, read_run


@pytest.fixture(scope="module")
def night_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("incoming")
    truth = write_kaggle_test_folder(str(root / "all"), 60, side_range=(40, 64))
    (root / "all" / "61.jpg").write_bytes(b"")
    (root / "all" / "62.jpg").write_text("not an image")
    os.makedirs(root / "broken")  # a night when a camera starts sending empty files
    for image_id in list(truth)[:30]:
        shutil.copy(root / "all" / f"{image_id}.jpg", root / "broken" / f"{image_id}.jpg")
    for image_id in range(100, 120):
        (root / "broken" / f"{image_id}.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def first_night(night_images, trained, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("scores") / "dt=2026-11-20")
    summary = score.run(["--input", str(night_images / "all" / "*"), "--model-dir", trained["model_dir"],
                         "--output", output, "--run-date", "2026-11-20", "--review-size", "10",
                         "--min-confidence", "0.6", "--max-error-rate", "1", "--out-of-scope", "off"])
    return {"output": output, "summary": summary, "run": read_run(output)}


def test_the_report_holds_every_section_with_the_runs_numbers(first_night):
    output, run = first_night["output"], first_night["run"]
    record = run["summary"]
    with open(os.path.join(output, "report.html")) as handle:
        parsed = ReportParser(handle.read())
    assert parsed.data["summary"] == {k: v for k, v in record.items() if k != "files"}

    headline = {row[0]: row[1] for row in parsed.tables["headline"]}
    predictions = run["predictions"]
    assert (int(headline["inputs"]), int(headline["predictions"]), int(headline["errors"])) == (
        62, predictions.num_rows, run["errors"].num_rows)
    assert headline["error_rate"] == f"{2 / 62:.2%}" and headline["model_version"] == "tiny-test-1"
    assert headline["uncertain"].startswith(f"{record['uncertain']} (")

    classes = {row[0]: int(row[1]) for row in parsed.tables["classes"][1:]}
    assert classes == dict(collections.Counter(predictions.column("predicted_class").to_pylist()))

    least_confident = sorted(predictions.select(["confidence", "path"]).to_pylist(),
                             key=lambda row: (row["confidence"], row["path"]))[:10]
    assert [row["path"] for row in parsed.data["review"]] == [row["path"] for row in least_confident]
    assert all(row["thumbnail"] for row in parsed.data["review"])
    assert parsed.images.count("data:image/jpeg;base64") == 10
    assert parsed.images.count("data:image/png;base64") == 2  # class mix, score histogram

    errors = {row[0]: (int(row[1]), row[2]) for row in parsed.tables["errors"][1:]}
    assert set(errors) == {"EmptyImageError", "UnidentifiedImageError"}
    assert errors["EmptyImageError"][0] == 1 and "61.jpg: empty file" in errors["EmptyImageError"][1]
    assert parsed.data["summary"]["drift"]["compared_to"] == []


def test_the_review_queue_is_a_file_a_labelling_tool_can_take(first_night):
    output = first_night["output"]
    record = first_night["run"]["summary"]
    queue = pq.read_table(os.path.join(output, "review", "review-queue.parquet")).to_pylist()
    with open(os.path.join(output, "review", "review-queue.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == [row["path"] for row in queue] and len(rows) == 10
    assert [row["confidence"] for row in queue] == sorted(row["confidence"] for row in queue)
    assert all(row["label"] == "" for row in rows) and all(row["label"] is None for row in queue)
    assert {"path", "predicted_class", "decision", "confidence", "prob_cat", "prob_dog"} <= set(rows[0])
    listed = {entry["path"] for entry in record["files"]}
    assert {"review/review-queue.parquet", "review/review-queue.csv"} <= listed


def test_drift_alerts_on_a_changed_night_and_the_exit_code_says_so(first_night, night_images,
                                                                   trained, tmp_path):
    scores = os.path.dirname(first_night["output"])
    base = ["--model-dir", trained["model_dir"], "--compare-to", os.path.join(scores, "dt=*"),
            "--max-error-rate", "1", "--review-size", "10", "--min-confidence", "0.6",
            "--out-of-scope", "off"]  # the detector's own report and drift checks: test_out_of_scope.py
    same = score.run(["--input", str(night_images / "all" / "*"), "--run-date", "2026-11-21",
                      "--output", os.path.join(scores, "dt=2026-11-21"), *base])
    assert same["drift"]["alert"] is False
    assert same["drift"]["class_mix"]["value"] == 0.0
    assert [run["run_date"] for run in same["drift"]["compared_to"]] == ["2026-11-20"]

    changed = os.path.join(scores, "dt=2026-11-22")
    exit_code = score.main(["--input", str(night_images / "broken" / "*"), "--run-date", "2026-11-22",
                            "--output", changed, "--fail-on-drift", *base])
    assert exit_code == score.EXIT_DRIFT
    drift = read_run(changed)["summary"]["drift"]
    assert drift["alert"] is True and "error_rate" in drift["alerts"]
    assert drift["error_rate"]["tonight"] == 0.4  # 20 of 50, against 4 of 124 on two nights
    assert drift["error_rate"]["before"] == pytest.approx(4 / 124, abs=1e-6)

    # The report command renders it again (here against the first night only) from the outputs.
    assert report.main([changed, "--compare-to", os.path.join(scores, "dt=2026-11-20"),
                        "--html", str(tmp_path / "again.html")]) == 0
    parsed = ReportParser((tmp_path / "again.html").read_text())
    assert [run["run_date"] for run in parsed.data["summary"]["drift"]["compared_to"]] == ["2026-11-20"]
    results = {row[0]: row[-1] for row in parsed.tables["drift"][1:]}
    assert results["error rate"] == "ALERT" and results["input count"] == "ok"
    assert parsed.images.count("data:image/png;base64") == 2 + 4  # and four time series


def test_the_report_command_refuses_an_incomplete_run(tmp_path, capsys):
    (tmp_path / "killed" / "predictions").mkdir(parents=True)
    assert report.main([str(tmp_path / "killed")]) == 1
    assert "no completion record" in capsys.readouterr().err


def test_a_many_class_report_ranks_the_top_predicted_classes():
    breeds = [f"breed_{i:03d}" for i in range(133)]
    counts = {name: (i * 7) % 40 for i, name in enumerate(breeds)}
    summary = {"run_id": "r", "run_date": "2026-11-22", "inputs": sum(counts.values()),
               "predictions": sum(counts.values()), "errors": 0, "uncertain": 0, "error_rate": 0.0,
               "errors_by_type": {}, "class_names": breeds,
               "drift": {"compared_to": [], "alert": False, "note": "nothing to compare with"},
               "profile": {"class_counts": counts, "score": "confidence", "error_examples": {},
                           "histogram_edges": [i / 10 for i in range(11)],
                           "histogram_counts": [0] * 9 + [sum(counts.values())]}}
    parsed = ReportParser(report.render_run_report(summary, [], []))
    ranked = [row[0] for row in parsed.tables["classes"][1:]]
    assert ranked == sorted(breeds, key=lambda name: (-counts[name], name))
    assert [int(row[1]) for row in parsed.tables["classes"][1:16]] == sorted(counts.values())[::-1][:15]
    assert "the 15 most predicted of 133 classes" in parsed.text


def test_the_night_profile_is_exact_when_merged_from_parts():
    import numpy as np
    import pyarrow as pa

    from pipeline.summary import HISTOGRAM_EDGES, ErrorProfileFn, PredictionProfileFn

    rng = np.random.default_rng(5)
    rows = [{"path": f"/n/{i:04d}.jpg", "prob_dog": float(p), "confidence": float(max(p, 1 - p)),
             "predicted_class": "dog" if p >= 0.5 else "cat", "prob_cat": float(1 - p),
             "human_faces": i % 4 if i % 3 else None,  # None: not looked at (--faces unsure)
             "decision": ("uncertain" if i % 3 == 0 or i % 4 == 0 else "human") if max(p, 1 - p) < 0.6
             else ("dog" if p >= 0.5 else "cat")}
            for i, p in enumerate(np.round(rng.random(500), 2))]  # rounded: many ties
    fn = PredictionProfileFn("prob_dog", ["path", "confidence"], review_size=7)
    parts = [fn.create_accumulator() for _ in range(3)]
    for i, start in enumerate(range(0, len(rows), 20)):  # tables of 20 rows, spread over 3 parts
        fn.add_input(parts[i % 3], pa.Table.from_pylist(rows[start:start + 20]))
    profile = fn.extract_output(fn.merge_accumulators(parts))
    assert profile["count"] == 500
    assert profile["uncertain"] == sum(row["decision"] == "uncertain" for row in rows)
    assert profile["human"] == sum(row["decision"] == "human" for row in rows) > 0
    assert profile["with_human_faces"] == sum(bool(row["human_faces"]) for row in rows)
    assert profile["class_counts"] == dict(collections.Counter(row["predicted_class"] for row in rows))
    want_histogram = np.histogram([row["prob_dog"] for row in rows], bins=HISTOGRAM_EDGES)[0]
    assert profile["histogram"] == want_histogram.tolist()
    least = sorted(rows, key=lambda row: (row["confidence"], row["path"]))[:7]
    assert profile["review"] == [{"path": row["path"], "confidence": row["confidence"]} for row in least]

    errors = ErrorProfileFn()
    halves = [errors.create_accumulator(), errors.create_accumulator()]
    for i in range(5):
        errors.add_input(halves[i % 2], pa.Table.from_pylist(
            [{"error_type": "OSError", "path": f"/n/bad{i}", "message": "m"}]))
    merged = errors.extract_output(errors.merge_accumulators(halves))
    assert merged["OSError"][0] == 5 and len(merged["OSError"][1]) == 3


@pytest.mark.parametrize("fmt", ["JPEG", "HEIF"])  # HEIF: a phone's default, rotated as it stores it
def test_a_thumbnail_is_upright_and_small_for_any_photo_size(fmt):
    import base64
    import io

    from PIL import Image

    from reports.html import thumbnail

    photo = Image.new("RGB", (1600, 800), "red")
    photo.paste((0, 0, 255), (800, 0, 1600, 800))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the red half on top
    buffer = io.BytesIO()
    photo.save(buffer, format=fmt, quality=95, exif=exif.tobytes())
    small = Image.open(io.BytesIO(base64.b64decode(thumbnail(buffer.getvalue(), side=128))))
    assert small.size == (64, 128)
    top, bottom = small.getpixel((32, 10)), small.getpixel((32, 117))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]
