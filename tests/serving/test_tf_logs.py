"""Entry points start without TensorFlow's C++ start-up logs, unless the user asks for them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serving.tf_logs import gpu_possible, kept_lines

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What `import tensorflow` printed before any usage (TF 2.21, a machine without a GPU).
IMPORT_NOISE = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1796006880.887575   15837 port.cc:153] oneDNN custom operations are on.\n"
    b"W0000 00:00:1796006880.887908   15837 dso_loader.cc:31] Could not load libcuda.so.1\n"
    b"E0000 00:00:1796006880.940647   15837 cuda_platform.cc:52] failed call to cuInit\n"
)


def help_output(env_level: str | None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    if env_level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = env_level
    return subprocess.run([sys.executable, "-m", "model.package", "--help"], cwd=REPO, env=env,
                          capture_output=True, timeout=300)


def test_package_help_starts_with_its_usage_when_the_level_is_unset():
    process = help_output(None)
    assert process.returncode == 0
    assert process.stdout.startswith(b"usage: python -m model.package")
    assert process.stderr == b"", process.stderr.decode(errors="replace")[:2000]


def test_a_level_the_user_set_is_theirs():
    """TF_CPP_MIN_LOG_LEVEL=0 asks for everything: TensorFlow's load-time lines come through (the
    lines this guards against are really printed, and only the default holds them back)."""
    stderr = help_output("0").stderr
    # an INFO line of TensorFlow's load (port.cc's oneDNN line on CPUs where oneDNN is on, else
    # cudart_stub.cc's or cpu_feature_guard.cc's)
    assert any(line.startswith(b"I0000 ") for line in stderr.splitlines()), stderr[:2000]
    if not gpu_possible():  # the device search the import makes where there is no GPU
        assert b"] failed call to cuInit: " in stderr


@pytest.mark.parametrize("level, kept", [
    (0, [0, 1, 2, 3]), (1, [2, 3]), (2, [3]), (3, []),
])
def test_absl_lines_below_the_level_are_held_back_and_nothing_else(level, kept):
    lines = IMPORT_NOISE.splitlines(keepends=True)
    python = b"/x.py:3: UserWarning: a warning Python printed meanwhile\n"
    assert kept_lines(IMPORT_NOISE + python, level) == b"".join(lines[i] for i in kept) + python


CUINIT = (b"E0000 00:00:1796563713.721817   11673 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
          b"CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n")
REAL_ERROR = b"E0000 00:00:1796563713.9   11673 op_kernel.cc:1857] OP_REQUIRES failed: out of memory\n"


@pytest.mark.parametrize("without_gpu, kept", [(True, REAL_ERROR), (False, CUINIT + REAL_ERROR)],
                         ids=["without a GPU", "with a GPU"])
@pytest.mark.parametrize("level", [1, 2])
def test_a_failing_cuinit_is_held_back_only_without_a_gpu_and_other_errors_show(level, without_gpu, kept):
    assert kept_lines(CUINIT + REAL_ERROR, level, without_gpu) == kept


def test_a_real_error_of_model_train_shows_and_no_known_noise_does():
    """A new user's first mistake, on the default log level: the error says what is wrong, and
    no TensorFlow line says something else is (model.train imports TensorFlow, which looks for
    devices, before it reads --data)."""
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    process = subprocess.run([sys.executable, "-m", "model.train", "--data", "no-such-folder", "--output",
                              "unused"], cwd=REPO, env=env, capture_output=True, timeout=300)
    assert process.returncode != 0
    assert b"FileNotFoundError: [Errno 2] No such file or directory: 'no-such-folder'" in process.stderr
    assert b"E0000" not in process.stderr and b"cuInit" not in process.stderr, process.stderr[-2000:]
    assert b"Warning" not in process.stderr


def held_back_then(level: int, then: str) -> subprocess.CompletedProcess:
    """A process that writes an absl INFO line to fd 2 inside a held-back block, then runs
    ``then`` there (the block never returns when ``then`` ends the process)."""
    code = ("import os\nfrom serving.tf_logs import _absl_lines_held_back\n"
            f"with _absl_lines_held_back({level}):\n"
            "    os.write(2, b'I0000 00:00:1.000000   1 port.cc:153] oneDNN custom operations are on\\n')\n"
            f"    {then}\n")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)


def test_a_process_that_dies_while_lines_are_held_back_says_where():
    """A fatal signal inside the import (a CPU without AVX, a broken CUDA library) cannot write
    back what was captured: faulthandler reports it on the real stderr with the Python stack."""
    process = held_back_then(3, "os.abort()")
    assert process.returncode != 0
    assert b"Fatal Python error: Aborted" in process.stderr and b"<string>" in process.stderr
    assert b"oneDNN" not in process.stderr


def test_level_0_captures_nothing_so_every_line_shows_as_it_comes():
    process = held_back_then(0, "os._exit(0)")  # exits inside the block: nothing is written back
    assert b"] oneDNN custom operations are on" in process.stderr
