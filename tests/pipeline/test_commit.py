"""A run is committed by its completion record (summary.json) or visibly not: the real CLI killed
at several points, a rerun that recovers, and the graph property that makes it hold on any runner."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import apache_beam as beam
import pyarrow.parquet as pq
import pytest

from model.synthetic import write_kaggle_test_folder
from pipeline import score

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def final_outputs(output: str) -> list[str]:
    return (glob.glob(os.path.join(output, "predictions", "*.parquet"))
            + glob.glob(os.path.join(output, "errors", "*.parquet"))
            + glob.glob(os.path.join(output, "submission.csv")))


def leftovers(output: str) -> list[str]:
    """Staging files and directories: what a finished run must not leave."""
    return (glob.glob(os.path.join(output, "**", "beam-temp-*"), recursive=True)
            + glob.glob(os.path.join(output, "**", "*.tmp-*"), recursive=True)
            + glob.glob(os.path.join(output, "csv-parts")))


KILL_POINTS = {
    # the sinks have started staging files
    "staging": lambda output: bool(glob.glob(os.path.join(output, "*", "beam-temp-*"))),
    # the very first file under a final name
    "first final output": lambda output: bool(final_outputs(output)),
    # every final output is in place, the record is not yet
    "all outputs final": lambda output: len(final_outputs(output)) == 3,
}


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.score", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def kill_when(process: subprocess.Popen, reached, output: str, timeout: float = 300) -> bool:
    """SIGKILL the whole process group the moment ``reached(output)``; False if the run ended
    first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reached(output):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.001)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError("the run neither reached the kill point nor ended")


def assert_record_is_trustworthy(output: str) -> dict | None:
    """Where summary.json exists, every file it lists exists with its size and the counts agree."""
    record_path = os.path.join(output, "summary.json")
    if not os.path.exists(record_path):
        return None
    with open(record_path) as handle:
        record = json.load(handle)
    listed = {entry["path"]: entry["bytes"] for entry in record["files"]}
    for path, size in listed.items():
        assert os.path.getsize(os.path.join(output, path)) == size, path
    rows = {kind: sum(pq.ParquetFile(os.path.join(output, path)).metadata.num_rows
                      for path in listed if path.startswith(f"{kind}/"))
            for kind in ("predictions", "errors")}
    assert (rows["predictions"], rows["errors"]) == (record["predictions"], record["errors"])
    with open(os.path.join(output, "submission.csv")) as handle:
        assert sum(1 for _ in handle) == record["csv_rows"] + 1
    assert record["accounted"] is True
    return record


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("night"))
    write_kaggle_test_folder(root, 400, side_range=(40, 64))
    with open(os.path.join(root, "401.jpg"), "w") as handle:
        handle.write("not an image")
    return root


def test_a_killed_run_leaves_no_record_and_the_rerun_recovers(night, trained, tmp_path):
    output = str(tmp_path / "dt=2026-11-22")
    args = ["--input", os.path.join(night, "*.jpg"), "--model-dir", trained["model_dir"],
            "--output", output, "--max-error-rate", "1"]
    killed_at = []
    for name, reached in KILL_POINTS.items():
        process = start([*args, "--overwrite"])  # each attempt first deletes what the last left
        if kill_when(process, reached, output):
            killed_at.append(name)
            record = assert_record_is_trustworthy(output)
            assert record is None or name == "all outputs final", f"record after a kill at {name}"
    assert killed_at[:2] == ["staging", "first final output"], killed_at
    assert final_outputs(output) and not os.path.exists(os.path.join(output, "summary.json"))

    refused = subprocess.run([sys.executable, "-m", "pipeline.score", *args], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1
    assert "of an incomplete run" in refused.stderr and "rerun with --overwrite" in refused.stderr

    recovered = subprocess.run([sys.executable, "-m", "pipeline.score", *args, "--overwrite"],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    record = assert_record_is_trustworthy(output)
    assert (record["inputs"], record["predictions"], record["errors"]) == (401, 400, 1)
    assert not leftovers(output)
    on_disk = {os.path.relpath(path, output) for path in glob.glob(os.path.join(output, "**"),
                                                                    recursive=True)
               if os.path.isfile(path)}
    assert on_disk == {entry["path"] for entry in record["files"]} | {"summary.json", "report.html"}


def test_overwrite_deletes_staging_leftovers_but_nothing_else(night, trained, tmp_path):
    output = tmp_path / "out"
    (output / "predictions" / "beam-temp-predictions-0f").mkdir(parents=True)
    (output / "predictions" / "beam-temp-predictions-0f" / "a1b2").write_bytes(b"half a shard")
    (output / "submission.csv.tmp-0f").write_text("id,label\n1,0.5\n")
    (output / "notes.txt").write_text("not petscore's")
    score.delete_run_files(str(output), score.check_output(str(output), overwrite=True))
    assert sorted(os.listdir(output)) == ["notes.txt"]


def leaf_producers(proto) -> dict[str, str]:
    """PCollection id -> the leaf transform that produces it."""
    transforms = proto.components.transforms
    return {pcoll: transform_id for transform_id, transform in transforms.items()
            if not transform.subtransforms for pcoll in transform.outputs.values()}


def main_inputs(transform) -> list[str]:
    """The PCollections a leaf transform reads as its main input (side inputs excluded)."""
    side_inputs = set()
    if transform.spec.urn == "beam:transform:pardo:v1":
        from apache_beam.portability.api import beam_runner_api_pb2
        side_inputs = set(beam_runner_api_pb2.ParDoPayload.FromString(
            transform.spec.payload).side_inputs)
    return [pcoll for tag, pcoll in transform.inputs.items() if tag not in side_inputs]


def test_the_record_is_reached_only_through_the_sinks_outputs(night, trained, tmp_path):
    """Walking up from the step that writes summary.json along main inputs, every path reaches
    a sink's final step (the Parquet sinks' finalize, the CSV's concatenation) before anything
    else of the job: so the record waits for every output to be final on any runner."""
    checked = score.check_run(["--input", os.path.join(night, "*.jpg"), "--model-dir",
                               trained["model_dir"], "--output", str(tmp_path / "out")])
    pipeline = beam.Pipeline()
    score.build_pipeline(pipeline, checked.options, checked.metadata, checked.run_id,
                         checked.started, checked.inference_hints)
    proto = pipeline.to_runner_api()
    transforms = proto.components.transforms
    producers = leaf_producers(proto)
    writer = next(t for t in transforms if transforms[t].unique_name == "WriteRunSummary/WriteSummary")
    final_steps = {"WriteKaggleCsv/ConcatenateParts",
                   "WritePredictions/WriteToParquet/Write/WriteImpl/FinalizeWrite",
                   "WriteErrors/WriteToParquet/Write/WriteImpl/FinalizeWrite"}
    reached, between, frontier = set(), set(), [writer]
    while frontier:
        transform = transforms[frontier.pop()]
        for pcoll in main_inputs(transform):
            producer = producers[pcoll]
            if transforms[producer].unique_name in final_steps:
                reached.add(transforms[producer].unique_name)
            elif producer not in between:
                between.add(producer)
                frontier.append(producer)
    # after a sink's final step, only its re-timestamping of the final paths (AtEndOfWindow)
    assert all(transforms[t].unique_name.startswith(("WrittenFiles", "WriteRunSummary/"))
               or transforms[t].unique_name.endswith("/AtEndOfWindow")
               for t in between), sorted(transforms[t].unique_name for t in between)
    assert any(transforms[t].spec.urn == "beam:transform:group_by_key:v1" for t in between)
    assert reached == final_steps
    # one coder for the three paths: Prism flattens them without a conversion stage per input
    flatten = next(t for t in transforms.values() if t.unique_name == "WrittenFiles")
    pcollections = proto.components.pcollections
    assert len({pcollections[p].coder_id for p in [*flatten.inputs.values(), *flatten.outputs.values()]}) == 1
