"""The real entry point on generated images, every output read back."""

import fnmatch
import gc
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from model.synthetic import write_kaggle_test_folder
from pipeline import progress, score
from pipeline.options import UnknownFlagError, refuse_unknown_flags
from pipeline.read import EmptyInputError
from pipeline.rows import ERROR_SCHEMA, prediction_schema
from serving.metadata import ModelContractError, read_metadata
from serving.runtimes import ServingModel, gpu_possible
from tests.corpus import GOOD
from tests.pipeline.outputs import read_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def score_args(corpus_root, model_dir, output, *extra):
    return ["--input", os.path.join(corpus_root, "*"), "--model-dir", model_dir,
            "--output", output, "--run-id", "test-run", *extra]


@pytest.fixture(scope="module")
def scored(corpus, trained, tmp_path_factory):
    """One run through the real CLI (a subprocess), as a user would start it."""
    root, expected = corpus
    output = str(tmp_path_factory.mktemp("run") / "out")
    process = subprocess.run(
        [sys.executable, "-m", "pipeline.score", *score_args(root, trained["model_dir"], output)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    return {"process": process, "output": output, "run": read_run(output), "root": root,
            "expected": expected}


def test_cli_exits_3_when_errors_exceed_the_default_rate_but_writes_everything(scored):
    process = scored["process"]
    bad = sum(outcome != GOOD for outcome in scored["expected"].values())
    assert process.returncode == score.EXIT_TOO_MANY_ERRORS, process.stderr[-3000:]
    assert f"{len(scored['expected'])} inputs: {len(scored['expected']) - bad} predictions, " \
           f"{bad} errors" in process.stdout
    assert "exceeds --max-error-rate 0.050" in process.stderr


def test_summary_accounts_for_every_input(scored):
    summary = scored["run"]["summary"]
    expected = scored["expected"]
    good = sum(outcome == GOOD for outcome in expected.values())
    assert summary["inputs"] == len(expected)
    assert summary["predictions"] == good
    assert summary["errors"] == len(expected) - good
    assert summary["accounted"] is True
    assert summary["errors_by_type"] == {"EmptyImageError": 1, "ImageTooLargeError": 1,
                                         "OSError": 1, "UnidentifiedImageError": 1}
    assert summary["model_version"] == "tiny-test-1" and summary["run_id"] == "test-run"
    assert summary["images_per_second"] > 0 and summary["elapsed_seconds"] > 0


def test_parquet_predictions_have_the_schema_and_one_row_per_good_image(scored, trained):
    table = scored["run"]["predictions"]
    metadata = read_metadata(trained["model_dir"])
    # One schema for every run of these classes; the tiny model's detector fills scope_score.
    assert table.schema.equals(prediction_schema(["cat", "dog"]), check_metadata=False)
    assert table["scope_score"].null_count == 0 and table["top_classes"].null_count == table.num_rows
    root, expected = scored["root"], scored["expected"]
    assert sorted(table.column("path").to_pylist()) == sorted(
        os.path.join(root, name) for name, outcome in expected.items() if outcome == GOOD)
    rows = table.to_pylist()
    for row in rows:
        assert row["prob_cat"] + row["prob_dog"] == pytest.approx(1.0, abs=1e-5)
        assert row["confidence"] == max(row["prob_cat"], row["prob_dog"])
        # --min-confidence defaults to 0, so only the detector can overrule the class
        assert row["decision"] == ("out_of_scope" if row["scope_score"] > metadata.out_of_scope["threshold"]
                                   else row["predicted_class"])
        assert row["model_sha256"] == metadata.sha256 and row["run_id"] == "test-run"
    assert len({round(r["prob_dog"], 6) for r in rows}) > 1, "every image scored the same"


def test_error_rows_name_the_file_the_stage_and_the_reason(scored):
    errors = scored["run"]["errors"]
    assert errors.schema.equals(ERROR_SCHEMA, check_metadata=False)
    got = {os.path.basename(r["path"]): (r["stage"], r["error_type"], r["message"])
           for r in errors.to_pylist()}
    assert {name: value[:2] for name, value in got.items()} == {
        name: outcome for name, outcome in scored["expected"].items() if outcome != GOOD}
    assert got["0.jpg"][2] == "empty file (0 bytes)"
    assert "truncated" in got["truncated.jpg"][2]
    assert got["not_an_image.jpg"][2] == "not an image: text (first line 'this is a text file, not a JPEG')"
    assert "10000000000 pixels exceeds the cap" in got["bomb.png"][2]


def test_kaggle_csv_has_integer_ids_in_order_with_p_dog(scored):
    csv_rows = scored["run"]["csv"]
    assert csv_rows[0] == ["id", "label"]
    ids = [int(r[0]) for r in csv_rows[1:]]
    assert ids == sorted(ids) == list(range(1, 15))  # 0.jpg is empty: an error row, not a CSV row
    by_id = {r["image_id"]: r["prob_dog"] for r in scored["run"]["predictions"].to_pylist()}
    for image_id, label in csv_rows[1:]:
        assert float(label) == pytest.approx(by_id[int(image_id)], abs=5e-7)
    assert scored["run"]["summary"]["csv_rows"] == 14


@pytest.mark.parametrize("runner, local", [(None, True), ("DirectRunner", True), ("direct", True),
                                           ("PrismRunner", False), ("DataflowRunner", False)])
def test_the_direct_runner_means_the_fn_api_runner_and_other_runners_are_beams(runner, local):
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner

    chosen = score.local_runner(PipelineOptions([f"--runner={runner}"] if runner else []))
    assert isinstance(chosen, FnApiRunner) if local else chosen is None


def test_multi_processing_gives_the_same_predictions(scored, trained, tmp_path, monkeypatch):
    from apache_beam.runners.portability.prism_runner import PrismRunner

    prism_attempts = []
    monkeypatch.setattr(PrismRunner, "run_pipeline", lambda *args: prism_attempts.append(args))
    output = str(tmp_path / "mp")
    score.run(score_args(scored["root"], trained["model_dir"], output,
                         "--direct_running_mode=multi_processing", "--direct_num_workers=2"))
    assert not prism_attempts  # no download-and-try-Prism detour before the local runner
    multi = {r["path"]: (r["prob_cat"], r["prob_dog"]) for r in read_run(output)["predictions"].to_pylist()}
    single = {r["path"]: (r["prob_cat"], r["prob_dog"])
              for r in scored["run"]["predictions"].to_pylist()}
    assert multi.keys() == single.keys()
    # Batches form differently across processes, and oneDNN's float sums depend on batch shape:
    # equal within 1e-5, not to the bit.
    for path, probabilities in single.items():
        np.testing.assert_allclose(multi[path], probabilities, atol=1e-5, err_msg=path)
    multi_csv, single_csv = read_run(output)["csv"], scored["run"]["csv"]
    assert [r[0] for r in multi_csv] == [r[0] for r in single_csv]
    np.testing.assert_allclose([float(r[1]) for r in multi_csv[1:]],
                               [float(r[1]) for r in single_csv[1:]], atol=1e-5)


def test_saved_model_and_tflite_runtimes_give_the_same_predictions(scored, trained, tmp_path):
    output = str(tmp_path / "tf")
    score.run(score_args(scored["root"], trained["model_dir"], output, "--runtime", "saved_model"))
    tf_rows = {r["path"]: r["prob_dog"] for r in read_run(output)["predictions"].to_pylist()}
    default_rows = {r["path"]: r["prob_dog"] for r in scored["run"]["predictions"].to_pylist()}
    assert tf_rows.keys() == default_rows.keys()
    np.testing.assert_allclose([tf_rows[p] for p in sorted(tf_rows)],
                               [default_rows[p] for p in sorted(tf_rows)], atol=1e-4)


# Each case runs in a fresh interpreter: (extra flags, code run before scoring).
NO_TENSORFLOW_CASES = {
    "cpu machine, default runtime": ([], ""),
    # A GPU machine asked for LiteRT explicitly has no reason to probe its GPUs through TF.
    "gpu machine, --runtime tflite": (["--runtime", "tflite", "--tflite-threads", "1"],
                                      "serving.gpu_possible = lambda: True; "),
    # A slim worker image with LiteRT and no TensorFlow scores on its CPU instead of failing.
    "gpu machine, tensorflow not installed": (
        [], "serving.gpu_possible = lambda: True; sys.modules['tensorflow'] = None; "),
}


@pytest.mark.parametrize("case", list(NO_TENSORFLOW_CASES))
def test_the_tflite_runtime_never_imports_tensorflow(scored, trained, tmp_path, case):
    """TensorFlow's import costs each CPU worker seconds and ~500 MiB; LiteRT needs none of it."""
    flags, prelude = NO_TENSORFLOW_CASES[case]
    if not prelude and gpu_possible():
        pytest.skip("a GPU machine scores with TensorFlow")
    args = score_args(scored["root"], trained["model_dir"], str(tmp_path / "o"), *flags)
    code = ("import json, sys; from serving import runtimes as serving; from pipeline import score; "
            f"{prelude}summary = score.run({args!r}); "
            "print(json.dumps([summary['predictions'], sys.modules.get('tensorflow') is not None]))")
    process = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                             timeout=300, check=True)
    predictions, imported = json.loads(process.stdout.strip().splitlines()[-1])
    assert predictions == scored["run"]["summary"]["predictions"] and not imported


def test_rerun_refuses_an_occupied_output_and_overwrite_replaces_it_without_duplicates(
        scored, trained, tmp_path):
    output = str(tmp_path / "rerun")
    shutil.copytree(scored["output"], output)
    # A stale shard from an earlier layout must not survive an overwrite.
    shutil.copy(os.path.join(output, "predictions", os.listdir(os.path.join(output, "predictions"))[0]),
                os.path.join(output, "predictions", "predictions-00007-of-00009.parquet"))
    with pytest.raises(score.OutputExistsError, match="pass --overwrite"):
        score.run(score_args(scored["root"], trained["model_dir"], output))
    summary = score.run(score_args(scored["root"], trained["model_dir"], output, "--overwrite"))
    run = read_run(output)
    assert run["predictions"].num_rows == summary["predictions"] == scored["run"]["predictions"].num_rows
    assert not [name for name in os.listdir(output) if ".tmp-" in name]


def test_manifest_with_missing_and_duplicate_paths_and_uncertain_rows(corpus, trained, tmp_path):
    root, _ = corpus
    manifest = tmp_path / "tonight.txt"
    good = [os.path.join(root, f"{i}.jpg") for i in (1, 2, 3)]
    manifest.write_text("\n".join([*good, good[0], str(tmp_path / "gone.jpg")]) + "\n")
    output = str(tmp_path / "out")
    summary = score.run(["--manifest", str(manifest), "--model-dir", trained["model_dir"],
                         "--output", output, "--min-confidence", "1.01"])
    run = read_run(output)
    assert (summary["inputs"], summary["predictions"], summary["errors"]) == (5, 3, 2)
    assert summary["uncertain"] == 3
    assert set(run["predictions"].column("decision").to_pylist()) == {"uncertain"}
    assert sorted((os.path.basename(r["path"]), r["stage"], r["error_type"])
                  for r in run["errors"].to_pylist()) == [
        ("1.jpg", "read", "DuplicatePath"), ("gone.jpg", "read", "FileNotFoundError")]


def test_a_manifest_saved_by_excel_scores_every_path(corpus, trained, tmp_path):
    """Excel's "CSV UTF-8" (and Notepad's UTF-8): a byte-order mark and CRLF line ends. Its
    first path was reported missing and the run exited 3."""
    root, expected = corpus
    good = sorted(name for name, outcome in expected.items() if outcome == GOOD)[:3]
    manifest = tmp_path / "excel.csv"
    manifest.write_bytes(b"\xef\xbb\xbf" + "".join(f"{os.path.join(root, name)}\r\n"
                                                     for name in good).encode())
    output = str(tmp_path / "out")
    assert score.main(["--manifest", str(manifest), "--model-dir", trained["model_dir"],
                       "--output", output]) == 0
    run = read_run(output)
    assert (run["summary"]["inputs"], run["summary"]["predictions"], run["summary"]["errors"]) == (3, 3, 0)
    assert sorted(run["predictions"].column("path").to_pylist()) == [os.path.join(root, n) for n in good]


def test_incremental_run_scores_only_new_and_changed_images_and_all_after_a_model_change(
        corpus, trained, tmp_path):
    root, _ = corpus
    night = tmp_path / "incoming"
    shutil.copytree(root, night)
    first = str(tmp_path / "scores" / "dt=2026-11-20")
    score.run(["--input", str(night / "*"), "--model-dir", trained["model_dir"], "--output", first,
               "--max-error-rate", "1"])
    shutil.copy(night / "1.jpg", night / "15.jpg")  # new path (same bytes as 1.jpg)
    shutil.copy(night / "3.jpg", night / "2.jpg")  # changed bytes under an old path
    os.utime(night / "4.jpg", (1.7e9, 1.7e9))  # touched, same bytes: read, then skipped by SHA-256
    previous = str(tmp_path / "scores" / "dt=*")
    second = str(tmp_path / "scores" / "dt=2026-11-21")
    summary = score.run(["--input", str(night / "*"), "--model-dir", trained["model_dir"],
                         "--output", second, "--skip-scored", previous, "--max-error-rate", "1"])
    good = read_run(first)["predictions"].num_rows
    scored = sorted(os.path.basename(p) for p in read_run(second)["predictions"].column("path").to_pylist())
    assert scored == ["15.jpg", "2.jpg"]
    assert summary["skipped_already_scored"] == good - 1 and summary["accounted"] is True
    assert summary["errors"] == read_run(first)["summary"]["errors"]  # bad files are retried

    retrained = str(tmp_path / "model-v2")
    shutil.copytree(trained["model_dir"], retrained)
    with open(os.path.join(retrained, "metadata.json")) as handle:
        fields = json.load(handle)
    with open(os.path.join(retrained, "metadata.json"), "w") as handle:
        json.dump({**fields, "model_version": "tiny-test-2"}, handle)
    summary = score.run(["--input", str(night / "*"), "--model-dir", retrained, "--max-error-rate", "1",
                         "--output", str(tmp_path / "scores" / "v2"), "--skip-scored", previous])
    assert summary["skipped_already_scored"] == 0 and summary["predictions"] == good + 1


def test_a_run_without_errors_writes_an_empty_error_table(corpus, trained, tmp_path):
    root, expected = corpus
    output = str(tmp_path / "clean")
    summary = score.run(["--input", os.path.join(root, "1?.jpg"), "--model-dir", trained["model_dir"],
                         "--output", output, "--clip", "0.2"])
    run = read_run(output)
    assert summary["errors"] == 0 and run["errors"].num_rows == 0
    labels = [float(r[1]) for r in run["csv"][1:]]
    matching = [name for name in expected if fnmatch.fnmatch(name, "1?.jpg")]
    assert len(labels) == summary["predictions"] == len(matching) == 4
    assert all(0.2 <= v <= 0.8 for v in labels)


def test_a_night_of_nothing_but_bad_files_is_still_a_complete_run(corpus, trained, tmp_path):
    root, expected = corpus
    bad = sorted(name for name, outcome in expected.items() if outcome != GOOD)
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in bad:
        shutil.copy(os.path.join(root, name), folder / name)
    output = str(tmp_path / "o")
    summary = score.run(["--input", str(folder / "*"), "--model-dir", trained["model_dir"],
                         "--output", output, "--max-error-rate", "1"])
    run = read_run(output)
    assert (summary["inputs"], summary["predictions"], summary["errors"]) == (len(bad), 0, len(bad))
    assert summary["accounted"] and summary["skipped_already_scored"] == 0
    assert summary["profile"]["class_counts"] == {} and sum(summary["profile"]["histogram_counts"]) == 0
    assert run["csv"] == [["id", "label"]] and run["predictions"].num_rows == 0
    assert run["errors"].num_rows == len(bad)
    assert os.path.exists(os.path.join(output, "report.html"))


def test_a_many_scan_jpeg_and_a_stuck_decode_are_error_rows_naming_their_bound(corpus, trained, tmp_path,
                                                                              monkeypatch):
    """Through the CLI: a progressive JPEG of 300 scans is refused before decoding, and a decode
    that blocks (until the test ends) is given up after --max-decode-seconds; the run ends, the
    other images scored, while that decode is still stuck."""
    import threading

    from pipeline import decode
    from tests.corpus import many_scan_jpeg

    root, _ = corpus
    night = tmp_path / "night"
    night.mkdir()
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        shutil.copy(os.path.join(root, name), night / name)
    (night / "many_scans.jpg").write_bytes(many_scan_jpeg(300))
    shutil.copy(os.path.join(root, "13.png"), night / "stuck.png")
    stuck = (night / "stuck.png").read_bytes()
    release, returned = threading.Event(), threading.Event()
    real_decode = decode.decode_and_resize

    def decode_and_resize(data, *args, **kwargs):
        if data == stuck:
            release.wait(120)
            returned.set()
        return real_decode(data, *args, **kwargs)

    monkeypatch.setattr(decode, "decode_and_resize", decode_and_resize)
    output = str(tmp_path / "o")
    try:
        summary = score.run(score_args(str(night), trained["model_dir"], output, "--max-error-rate", "1",
                                       "--max-decode-seconds", "1"))
        assert not returned.is_set()  # the run ended while the decode was stuck
    finally:
        release.set()
    assert (summary["inputs"], summary["predictions"], summary["accounted"]) == (5, 3, True)
    assert summary["errors_by_type"] == {"DecodeTimeoutError": 1, "TooManyScansError": 1}
    messages = {os.path.basename(r["path"]): r["message"] for r in read_run(output)["errors"].to_pylist()}
    assert messages["stuck.png"] == ("decoding ran past the limit of 1 s per image and was given up "
                                     "(--max-decode-seconds raises the limit)")
    assert messages["many_scans.jpg"].startswith("a JPEG of 300 scans exceeds the limit of 100 scans")
    assert "--max-jpeg-scans" in messages["many_scans.jpg"]


def test_bad_model_directories_are_refused_before_any_work(corpus, trained, tmp_path):
    root, _ = corpus
    broken = str(tmp_path / "model")
    shutil.copytree(trained["model_dir"], broken)
    args = ["--input", os.path.join(root, "*.jpg"), "--model-dir", broken, "--output", str(tmp_path / "o")]
    with open(os.path.join(broken, "saved_model", "saved_model.pb"), "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelContractError, match="the model was changed after export"):
        score.run(args)
    shutil.copy(os.path.join(trained["model_dir"], "saved_model", "saved_model.pb"),
                os.path.join(broken, "saved_model", "saved_model.pb"))
    with open(os.path.join(broken, "model.tflite"), "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelContractError, match="model.tflite hashes to"):
        score.run(args)
    os.remove(os.path.join(broken, "metadata.json"))
    with pytest.raises(ModelContractError, match="metadata.json not found"):
        score.run(args)
    assert not os.path.exists(tmp_path / "o")


def test_wrong_positive_class_and_empty_input_are_clear_errors(corpus, trained, tmp_path):
    root, _ = corpus
    earlier = tmp_path / "a" / "summary.json"
    earlier.parent.mkdir()
    earlier.write_text("{}")
    with pytest.raises(ModelContractError, match="--positive-class 'horse'"):
        score.run(score_args(root, trained["model_dir"], str(tmp_path / "a"), "--positive-class", "horse",
                             "--overwrite"))
    assert earlier.exists()  # refused before --overwrite cleared anything
    with pytest.raises(EmptyInputError):
        score.run(["--input", str(tmp_path / "nothing-*.jpg"), "--model-dir", trained["model_dir"],
                   "--output", str(tmp_path / "b")])


def test_the_heap_is_frozen_while_a_run_lasts_and_collectable_again_after():
    with score.frozen_heap():
        assert gc.get_freeze_count() > 0  # out of the full collections' sight during the run
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("flags, message", [
    (["--tflite-invoke-batch", "0"], "--tflite-invoke-batch 0 must be 1 or more"),
    (["--batch-size", "0"], "--batch-size 0 must be 1 or more"),
    (["--max-batch-size", "0"], "--batch-size 0 must be 1 or more"),  # its earlier name
    (["--decode-threads", "-1"], "--decode-threads -1 must be 0"),
    (["--tflite-threads", "-2"], "--tflite-threads -2 must be 0"),
])
def test_impossible_batch_sizes_and_thread_counts_are_refused_before_any_work(
        corpus, trained, tmp_path, flags, message):
    root, _ = corpus
    with pytest.raises(ValueError, match=message):
        score.run(score_args(root, trained["model_dir"], str(tmp_path / "o"), *flags))
    assert not os.path.exists(tmp_path / "o")


def test_the_cli_refuses_in_one_line_without_a_traceback(trained, tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "pipeline.score", "--input", str(tmp_path / "nothing-*.jpg"),
         "--model-dir", trained["model_dir"], "--output", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert process.returncode == 1
    assert "petscore: refused before any work: --input" in process.stderr
    assert "matches no file" in process.stderr and "Traceback" not in process.stderr


def test_an_output_that_is_a_file_is_refused_before_the_model_loads(corpus, trained, tmp_path,
                                                                     monkeypatch):
    root, _ = corpus
    (tmp_path / "notes.py").write_text("print('mine')\n")
    monkeypatch.setattr(score, "load_checked_model", lambda *args: pytest.fail("model loaded"))
    with pytest.raises(FileExistsError, match="notes.py is a file: give a directory"):
        score.run(score_args(root, trained["model_dir"], str(tmp_path / "notes.py")))
    assert (tmp_path / "notes.py").read_text() == "print('mine')\n"


@pytest.mark.parametrize("inside", [True, False])
def test_an_output_under_a_recursive_input_is_warned_about(corpus, trained, tmp_path, caplog, inside):
    root, _ = corpus
    output = os.path.join(root, "scores") if inside else str(tmp_path / "scores")
    score.check_run(["--input", root, "--model-dir", trained["model_dir"], "--output", output])
    assert ("a later run over the same input will list this run's outputs" in caplog.text) == inside


def test_a_mistyped_flag_is_refused_before_any_work_with_the_nearest_flag(trained, corpus, tmp_path):
    root, _ = corpus
    process = subprocess.run(
        [sys.executable, "-m", "pipeline.score", *score_args(root, trained["model_dir"],
                                                             str(tmp_path / "o")),
         "--min-confidance", "0.8"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert process.returncode == 1
    refusal = [line for line in process.stderr.splitlines() if line.startswith("petscore:")]
    assert refusal == ["petscore: refused before any work: unknown flag --min-confidance; did you "
                       "mean --min-confidence? (python -m pipeline.score --help lists petscore's "
                       "flags; every Apache Beam pipeline option is accepted too)"]
    assert "WARNING" not in process.stderr and not os.path.exists(tmp_path / "o")


def test_every_beam_option_still_passes_and_stray_arguments_are_refused():
    refuse_unknown_flags(["--input", "x", "--runner=DataflowRunner", "--project", "p",
                          "--temp_location", "gs://b/tmp", "--experiments", "use_runner_v2",
                          "--sdk_container_image", "img", "--num_workers=3", "--min_confidence=0.5",
                          "--direct_running_mode", "multi_processing", "--overwrite"])
    with pytest.raises(UnknownFlagError, match="did you mean --machine_type"):
        refuse_unknown_flags(["--machine-type", "n2-standard-4"])
    with pytest.raises(UnknownFlagError, match="unexpected argument 'images/1.jpg'"):
        refuse_unknown_flags(["--input", "images/*.jpg", "images/1.jpg"])


def test_a_directory_input_scores_every_file_under_it(corpus, trained, tmp_path, caplog):
    root, expected = corpus
    caplog.set_level("INFO", logger="petscore")
    summary = score.run(["--input", root, "--model-dir", trained["model_dir"],
                         "--output", str(tmp_path / "o"), "--max-error-rate", "1"])
    assert summary["inputs"] == len(expected) and summary["accounted"] is True
    assert summary["input"] == os.path.join(root, "**")
    assert f"--input {root} is a directory: scoring every file under it" in caplog.text


def test_a_clean_local_run_reports_progress_and_no_unrelated_warnings(scored):
    stderr = scored["process"].stderr
    total = len(scored["expected"])
    assert f"progress: {total}/{total} images (100%)" in stderr
    assert [line for line in stderr.splitlines() if "warning" in line.lower()] == []


def test_the_next_batches_decode_while_the_model_runs_the_current_one(corpus, trained, tmp_path,
                                                                    monkeypatch):
    """A GPU worker's device never waits for the CPUs to start on the next batch: by the end of
    the first inference call the decoder pool has gone on to the batches after it (before the
    call or during it, as the threads happen to run; decoding a batch at a time, as the model
    asks for it, would have decoded the first batch's two images alone)."""
    import threading
    import time

    from pipeline import decode
    from pipeline.inference import ExportedModelHandler

    root, _ = corpus
    decoded, seen = [], []
    real_decode, run_inference = decode.decode_and_resize, ExportedModelHandler.run_inference

    def counting_decode(*args, **kwargs):
        pixels = real_decode(*args, **kwargs)
        decoded.append(threading.get_ident())
        return pixels

    def slow_first_batch(self, batch, model, inference_args=None):
        if not seen:
            before = len(decoded)
            time.sleep(1.0)  # a device busy on this batch
            seen.append((before, len(decoded), threading.get_ident()))
        return run_inference(self, batch, model, inference_args)

    monkeypatch.setattr(decode, "decode_and_resize", counting_decode)
    monkeypatch.setattr(ExportedModelHandler, "run_inference", slow_first_batch)
    score.run(score_args(root, trained["model_dir"], str(tmp_path / "o"), "--batch-size", "2",
                         "--max-error-rate", "1"))
    (_, after, bundle_thread), = seen
    assert after > 2  # images of later batches decoded by the time the first one is scored
    assert bundle_thread not in decoded  # on the pool, not on the thread that runs the model


def test_progress_moves_while_the_images_are_scored_not_once_they_all_are(corpus, trained, tmp_path,
                                                                         monkeypatch):
    root, expected = corpus
    events = []
    predict, advance = ServingModel.predict_outputs, progress.ProgressLog.advance
    monkeypatch.setattr(ServingModel, "predict_outputs",
                        lambda self, images, **tta: events.append("batch") or predict(self, images, **tta))
    monkeypatch.setattr(progress.ProgressLog, "advance",
                        lambda self, count=1: events.append(count) or advance(self, count))
    score.run(score_args(root, trained["model_dir"], str(tmp_path / "o"), "--batch-size", "2",
                         "--max-error-rate", "1"))
    advanced = [event for event in events if event != "batch"]
    assert sum(advanced) == len(expected) and max(advanced) <= 2  # a batch at a time
    last_batch = len(events) - 1 - events[::-1].index("batch")
    assert events.index(advanced[0]) < last_batch


def test_a_retried_listing_counts_its_files_once_and_a_finished_run_counts_nothing_more():
    log = progress.start()
    try:
        progress.expect(5)
        progress.expect(5)  # the listing's bundle retried
        assert log.total == 5
    finally:
        progress.stop()
    progress.expect(7)  # after the run: no log to count against
    assert log.total == 5


def test_help_documents_every_flag():
    process = subprocess.run([sys.executable, "-m", "pipeline.score", "--help"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0
    for flag in ("--input", "--manifest", "--model-dir", "--output", "--min-confidence", "--clip",
                 "--batch-size", "--decode-threads", "--max-error-rate", "--overwrite",
                 "--share-model-across-processes", "--runner"):
        assert flag in process.stdout, flag


def test_prediction_schema_lists_one_probability_column_per_class():
    schema = prediction_schema(["cat", "dog", "hot dog"])
    assert [n for n in schema.names if n.startswith("prob_")] == ["prob_cat", "prob_dog", "prob_hot_dog"]
    assert schema.field("scored_at").type == pa.timestamp("ms", tz="UTC")


PETSCORE_VERSIONS = ("pillow-rgb-draft-v1", "pillow-draft-cv2-v2", "cv2-jpeg-v3")


@pytest.mark.parametrize("recorded", PETSCORE_VERSIONS)
def test_a_model_directory_scores_with_the_preprocessing_its_metadata_records(
        corpus, trained, tmp_path, recorded):
    """Directories exported before pillow-draft-cv2-v2 keep pillow-rgb-draft-v1, to the pixel,
    and a v2 or v3 directory gets its own pixels: each the pixels its model was trained on."""
    from serving.preprocessing import PREPROCESSING_VERSIONS, decode_and_resize
    from serving.runtimes import ServingModel

    root, _ = corpus
    model_dir = str(tmp_path / "model")
    shutil.copytree(trained["model_dir"], model_dir)
    with open(os.path.join(model_dir, "metadata.json")) as handle:
        fields = json.load(handle)
    with open(os.path.join(model_dir, "metadata.json"), "w") as handle:
        json.dump({**fields, "preprocessing": recorded}, handle)
    images = [os.path.join(root, f"{i}.jpg") for i in (1, 2, 3, 4)]
    score.run(["--input", os.path.join(root, "[1-4].jpg"), "--model-dir", model_dir,
               "--output", str(tmp_path / "out"), "--runtime", "tflite"])
    metadata = read_metadata(model_dir)
    model = ServingModel(model_dir, metadata, "tflite")
    rows = read_run(str(tmp_path / "out"))["predictions"].to_pylist()
    got = [next(row["prob_dog"] for row in rows if row["path"] == path) for path in images]
    for version in PETSCORE_VERSIONS:
        assert "bilinear" in PREPROCESSING_VERSIONS[version]
        pixels = np.stack([decode_and_resize(open(path, "rb").read(), (metadata.height, metadata.width),
                                             preprocessing=version) for path in images])
        assert np.allclose(got, model.predict(pixels)[:, 1], atol=1e-6) == (version == recorded), version


def test_stems_that_are_no_int64_score_without_a_csv_row(tmp_path, trained, caplog):
    """Odd digit stems (a superscript two, 20 digits) are scored like any non-numeric name: a
    prediction row with a null image_id and no CSV row, not a failed listing or batch."""
    caplog.set_level(logging.INFO, logger="petscore")
    write_kaggle_test_folder(str(tmp_path / "in"), 3, side_range=(40, 48))
    for odd in ("\u00b2", "9" * 20):
        shutil.copy(tmp_path / "in" / "1.jpg", tmp_path / "in" / f"{odd}.jpg")
    output = str(tmp_path / "out")
    summary = score.run(["--input", str(tmp_path / "in" / "*"), "--model-dir", trained["model_dir"],
                         "--output", output, "--out-of-scope", "off"])
    assert (summary["inputs"], summary["predictions"], summary["errors"]) == (5, 5, 0)
    ids = {os.path.basename(row["path"]): row["image_id"]
           for row in read_run(output)["predictions"].to_pylist()}
    assert ids == {"1.jpg": 1, "2.jpg": 2, "3.jpg": 3, "\u00b2.jpg": None, "9" * 20 + ".jpg": None}
    with open(os.path.join(output, "submission.csv")) as handle:
        assert [line.split(",")[0] for line in handle.read().splitlines()] == ["id", "1", "2", "3"]
    assert "2 of 5 predictions are not in submission.csv" in caplog.text  # said, not silent

