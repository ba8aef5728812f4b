"""gs:// for real: the job reads images and the model from, and writes outputs to, a local GCS
emulator (gcp-storage-emulator) through Beam's GCS filesystem and google-cloud-storage."""

import csv
import io
import json
import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import report, score
from tests.corpus import GOOD
from tests.pipeline.outputs import ReportParser

BUCKET = "petscore-nightly"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A GCS emulator on loopback, and an anonymous client pointed at it."""
    port = free_port()
    emulator = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    process = subprocess.Popen([emulator, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("GCS emulator did not start") from None
            time.sleep(0.2)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    from google.cloud import storage

    client = storage.Client.create_anonymous_client()
    client.project = "petscore-test"
    client.create_bucket(BUCKET)
    yield client
    process.terminate()
    process.wait(timeout=10)
    if previous is None:
        os.environ.pop("STORAGE_EMULATOR_HOST")
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture
def anonymous_beam_credentials(monkeypatch):
    """Beam looks for Application Default Credentials with ~30 s of retries before it connects
    anonymously; the emulator needs none, so start from 'looked, found none'."""
    from apache_beam.internal.gcp import auth

    monkeypatch.setattr(auth._Credentials, "_credentials_init", True)
    monkeypatch.setattr(auth._Credentials, "_credentials", None)


def upload_tree(client, local_root: str, prefix: str) -> None:
    bucket = client.bucket(BUCKET)
    for folder, _, files in os.walk(local_root):
        for name in files:
            path = os.path.join(folder, name)
            bucket.blob(f"{prefix}/{os.path.relpath(path, local_root)}").upload_from_filename(path)


def test_scoring_from_and_to_gcs(gcs, anonymous_beam_credentials, corpus, trained):
    root, expected = corpus
    upload_tree(gcs, root, "incoming/dt=2026-11-21")
    # An object name may hold a backslash (Beam's own * never matched it: beam#21140), and the
    # console's "create folder" leaves a 0-byte placeholder object named like a folder.
    with open(os.path.join(root, "1.jpg"), "rb") as handle:
        gcs.bucket(BUCKET).blob("incoming/dt=2026-11-21/back\\slash.jpg").upload_from_string(handle.read())
    gcs.bucket(BUCKET).blob("incoming/dt=2026-11-21/sub/").upload_from_string(b"")
    upload_tree(gcs, trained["model_dir"], "models/tiny")
    night = ["--input", f"gs://{BUCKET}/incoming/dt={{run_date}}/*", "--model-dir",
             f"gs://{BUCKET}/models/tiny", "--run-date", "2026-11-21", "--no_auth"]
    summary = score.run([*night, "--output", f"gs://{BUCKET}/scores/dt={{run_date}}"])
    good = sum(outcome == GOOD for outcome in expected.values()) + 1  # and the backslash name
    assert (summary["inputs"], summary["predictions"], summary["accounted"]) == (
        len(expected) + 1, good, True)

    bucket = gcs.bucket(BUCKET)
    names = sorted(blob.name for blob in gcs.list_blobs(BUCKET, prefix="scores/"))
    assert "scores/dt=2026-11-21/submission.csv" in names and "scores/dt=2026-11-21/summary.json" in names
    assert not [name for name in names if ".tmp-" in name or "beam-temp" in name]
    submission = bucket.blob("scores/dt=2026-11-21/submission.csv").download_as_text()
    rows = list(csv.reader(io.StringIO(submission)))
    assert rows[0] == ["id", "label"] and [int(r[0]) for r in rows[1:]] == list(range(1, 15))
    shards = [n for n in names if n.startswith("scores/dt=2026-11-21/predictions/")]
    table = pq.read_table(io.BytesIO(bucket.blob(shards[0]).download_as_bytes()))
    assert sum(pq.read_metadata(io.BytesIO(bucket.blob(s).download_as_bytes())).num_rows
               for s in shards) == good
    assert table.column("path").to_pylist()[0].startswith(f"gs://{BUCKET}/incoming/dt=2026-11-21/")
    assert f"gs://{BUCKET}/incoming/dt=2026-11-21/back\\slash.jpg" in pa.concat_tables(
        [pq.read_table(io.BytesIO(bucket.blob(s).download_as_bytes())) for s in shards])["path"].to_pylist()
    assert table.column("file_updated_seconds").null_count == 0  # GCS listings carry update times
    error_shards = [n for n in names if n.startswith("scores/dt=2026-11-21/errors/")]
    errors = pq.read_table(io.BytesIO(bucket.blob(error_shards[0]).download_as_bytes()))
    assert errors.num_rows == len(expected) + 1 - good


    # The run report, rendered again from the bucket: thumbnails read from gs:// like the job.
    assert report.main([f"gs://{BUCKET}/scores/dt=2026-11-21"]) == 0
    parsed = ReportParser(bucket.blob("scores/dt=2026-11-21/report.html").download_as_text())
    assert parsed.data["summary"]["predictions"] == good
    assert len(parsed.data["review"]) == good and all(row["thumbnail"] for row in parsed.data["review"])
    assert parsed.images.count("data:image/jpeg;base64") == good
    assert "scores/dt=2026-11-21/review/review-queue.csv" in names

    # The same files again, named as a folder, incremental: all scored by this model version,
    # skipped on their listing (size and update time), not downloaded again; the folder
    # placeholder, which the folder's ** matches, skipped and counted as one.
    again = score.run(["--input", f"gs://{BUCKET}/incoming/dt=2026-11-21", *night[2:],
                       "--output", f"gs://{BUCKET}/scores/again",
                       "--skip-scored", f"gs://{BUCKET}/scores/dt=*"])
    assert again["input"] == f"gs://{BUCKET}/incoming/dt=2026-11-21/**"
    assert (again["skipped_already_scored"], again["predictions"]) == (good, 0)
    assert again["skipped_by_reason"] == {"already_scored": good, "folder_placeholder": 1}
    assert (again["inputs"], again["accounted"]) == (len(expected) + 2, True)

    # A killed attempt's leftovers on GCS: named and refused, then cleared by --overwrite.
    bucket.blob("scores/dt=2026-11-21/summary.json").delete()
    bucket.blob("scores/dt=2026-11-21/predictions/beam-temp-predictions-0f/a1").upload_from_string(b"half")
    with pytest.raises(score.OutputExistsError, match="of an incomplete run"):
        score.run([*night, "--output", f"gs://{BUCKET}/scores/dt={{run_date}}"])
    score.run([*night, "--output", f"gs://{BUCKET}/scores/dt={{run_date}}", "--overwrite"])
    names = sorted(blob.name for blob in gcs.list_blobs(BUCKET, prefix="scores/dt=2026-11-21/"))
    record = json.loads(bucket.blob("scores/dt=2026-11-21/summary.json").download_as_text())
    assert names == sorted([f"scores/dt=2026-11-21/{f['path']}" for f in record["files"]]
                           + ["scores/dt=2026-11-21/summary.json", "scores/dt=2026-11-21/report.html"])


def test_a_saved_model_on_gcs_is_copied_whole_and_reproduces_its_export(
        gcs, anonymous_beam_credentials, trained):
    """TensorFlow cannot read gs:// through Beam: the SavedModel runtime loads a local copy."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from serving.metadata import read_metadata
    from serving.runtimes import ServingModel, local_copy

    FileSystems.set_options(PipelineOptions(["--no_auth"]))
    upload_tree(gcs, trained["model_dir"], "models/copied")
    remote = f"gs://{BUCKET}/models/copied"
    copy = local_copy(f"{remote}/saved_model")
    local = os.path.join(trained["model_dir"], "saved_model")
    for folder, _, files in os.walk(local):
        for name in files:
            original = os.path.join(folder, name)
            with open(original, "rb") as want, open(os.path.join(copy, os.path.relpath(original, local)),
                                                    "rb") as got:
                assert got.read() == want.read(), original
    model = ServingModel(remote, read_metadata(remote), runtime="saved_model")
    assert model.check_reference_predictions() < 1e-5
