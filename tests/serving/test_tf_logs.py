"""Entry points start without TensorFlow's C++ start-up logs, unless the user asks for them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serving.tf_logs import kept_lines

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
    assert b"port.cc" in stderr and b"] oneDNN custom operations are on" in stderr


@pytest.mark.parametrize("level, kept", [
    (0, [0, 1, 2, 3]), (1, [2, 3]), (2, [3]), (3, []),
])
def test_absl_lines_below_the_level_are_held_back_and_nothing_else(level, kept):
    lines = IMPORT_NOISE.splitlines(keepends=True)
    python = b"/x.py:3: UserWarning: a warning Python printed meanwhile\n"
    assert kept_lines(IMPORT_NOISE + python, level) == b"".join(lines[i] for i in kept) + python


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
