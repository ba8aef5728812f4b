"""The job on a real Beam portable runner (Prism, built from Beam's Go SDK), compared with the
DirectRunner. Marked slow; run with scripts/test_portable.sh, which builds Prism first (CI runs
it after the default suite: .ci/run).

The SDK workers run in a separate worker-pool process (EXTERNAL environment), as on a cluster:
nothing is shared with the submitting process but the files. Prism starts one SDK worker per
environment; an inference resource hint (as used for right fitting on Dataflow) gives the
inference steps an environment of their own, so the job runs on two SDK workers, decoding in one
and inference in the other, each with its own control and data connections to the runner, the
decoded images crossing between them through Prism.
"""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline import score
from tests.pipeline.outputs import read_run

PRISM = os.environ.get("PETSCORE_PRISM", "")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(PRISM, os.X_OK),
                       reason="set PETSCORE_PRISM to a Prism binary (scripts/build_prism.sh)"),
]


def by_path(output: str) -> dict:
    return {r["path"]: (r["prob_cat"], r["prob_dog"], r["decision"])
            for r in read_run(output)["predictions"].to_pylist()}


# A Beam worker pool that notes the id of every SDK worker the runner asks it to start. Workers
# run as threads of this one process: Prism 2.77 keeps one metrics short-id table per job, so two
# SDK worker *processes* (each numbering its metrics from 1) corrupt each other's metrics and
# Prism panics; threads share one numbering (apache_beam SHORT_ID_CACHE).
RECORDING_WORKER_POOL = """
import sys
from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer

class RecordingWorkerPool(BeamFnExternalWorkerPoolServicer):
    def StartWorker(self, request, context):
        with open(sys.argv[2], "a") as started:
            started.write(request.worker_id + "\\n")
        return super().StartWorker(request, context)

_, server = RecordingWorkerPool.start(port=int(sys.argv[1]), use_process=False)
server.wait_for_termination()
"""


@pytest.fixture
def worker_pool(tmp_path):
    """``(address, file listing the started worker ids)`` of a worker pool in its own process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = tmp_path / "started_workers.txt"
    pool = subprocess.Popen([sys.executable, "-c", RECORDING_WORKER_POOL, str(port), str(started)])
    deadline = time.monotonic() + 60
    while pool.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        pool.kill()
        raise RuntimeError("the worker pool did not start listening")
    yield f"localhost:{port}", started
    pool.terminate()
    pool.wait(timeout=30)


def test_prism_on_two_sdk_workers_matches_the_direct_runner(corpus, trained, worker_pool, tmp_path):
    root, _ = corpus
    common = ["--input", os.path.join(root, "*"), "--model-dir", trained["model_dir"], "--run-id", "same",
              "--max-error-rate", "1"]
    direct = score.run([*common, "--output", str(tmp_path / "direct")])
    address, started_workers = worker_pool
    prism = score.run([*common, "--output", str(tmp_path / "prism"), "--runner", "PrismRunner",
                       f"--prism_location={PRISM}", "--environment_type=EXTERNAL",
                       f"--environment_config={address}", "--inference-resource-hint=min_ram=1GB"])
    workers = started_workers.read_text().split()
    assert len(set(workers)) == len(workers) == 2, workers  # decoding in one, inference in the other
    for key in ("inputs", "predictions", "errors", "errors_by_type", "csv_rows", "accounted"):
        assert prism[key] == direct[key], key
    # the record lists every output (Prism 2.77 once wrote it before the predictions had arrived)
    assert [f["path"] for f in prism["files"]] == [f["path"] for f in direct["files"]]
    want, got = by_path(str(tmp_path / "direct")), by_path(str(tmp_path / "prism"))
    assert got.keys() == want.keys()
    for path, (cat, dog, decision) in want.items():
        np.testing.assert_allclose(got[path][:2], (cat, dog), atol=1e-5)
        assert got[path][2] == decision
    assert read_run(str(tmp_path / "prism"))["csv"][0] == ["id", "label"]
    assert sorted(read_run(str(tmp_path / "prism"))["errors"].column("path").to_pylist()) == sorted(
        read_run(str(tmp_path / "direct"))["errors"].column("path").to_pylist())
