"""The job on a real Beam portable runner (Prism, built from Beam's Go SDK), compared with the
DirectRunner. Marked slow; run with scripts/test_portable.sh, which builds Prism first.

The SDK harness runs in a separate worker-pool process (EXTERNAL environment), as on a cluster:
nothing is shared with the submitting process but the files. Prism starts one SDK worker per
environment, which runs bundles on parallel threads.
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


@pytest.fixture
def worker_pool():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    pool = subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                             f"--service_port={port}"], env=env)
    time.sleep(3)
    yield f"localhost:{port}"
    pool.terminate()
    pool.wait(timeout=30)


def test_prism_in_a_separate_worker_process_matches_the_direct_runner(corpus, trained, worker_pool,
                                                                       tmp_path):
    root, _ = corpus
    common = ["--input", os.path.join(root, "*"), "--model-dir", trained["model_dir"], "--run-id", "same",
              "--max-error-rate", "1"]
    direct = score.run([*common, "--output", str(tmp_path / "direct")])
    prism = score.run([*common, "--output", str(tmp_path / "prism"), "--runner", "PrismRunner",
                       f"--prism_location={PRISM}", "--environment_type=EXTERNAL",
                       f"--environment_config={worker_pool}"])
    for key in ("inputs", "predictions", "errors", "errors_by_type", "csv_rows", "accounted"):
        assert prism[key] == direct[key], key
    want, got = by_path(str(tmp_path / "direct")), by_path(str(tmp_path / "prism"))
    assert got.keys() == want.keys()
    for path, (cat, dog, decision) in want.items():
        np.testing.assert_allclose(got[path][:2], (cat, dog), atol=1e-5)
        assert got[path][2] == decision
    assert read_run(str(tmp_path / "prism"))["csv"][0] == ["id", "label"]
    assert sorted(read_run(str(tmp_path / "prism"))["errors"].column("path").to_pylist()) == sorted(
        read_run(str(tmp_path / "direct"))["errors"].column("path").to_pylist())
