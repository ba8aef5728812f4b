"""TensorFlow's C++ start-up logs, kept off the terminal unless the user asks for them.

``import tensorflow`` prints lines such as ``I0000 … port.cc:153] oneDNN custom operations are
on`` and ``cudart_stub.cc:31] Could not find cuda drivers``, twice (two of its libraries log),
before any usage or result, and its first look for devices on a machine without a GPU logs
``E0000 … cuda_platform.cc:52] failed call to cuInit: … UNKNOWN ERROR (303)``: an error line on
every run of a laptop or a CPU worker, which a new user reads as a failure.
``quiet_tensorflow_logs`` (called by the ``model`` and ``pipeline`` packages, so by every
``python -m`` entry point, before anything imports TensorFlow):

- sets ``TF_CPP_MIN_LOG_LEVEL`` to ``2`` unless the user set it: TensorFlow's errors show, its
  info and warnings do not; ``TF_CPP_MIN_LOG_LEVEL=0`` brings every C++ line back.
- holds back the lines that TensorFlow's libraries log while they load, before absl's logging is
  initialised, below that level: absl writes those to stderr whatever ``TF_CPP_MIN_LOG_LEVEL``
  says (abseil-cpp prints every message before ``absl::InitializeLog()``). It does so without
  importing TensorFlow itself: a finder on ``sys.meta_path`` sends stderr (file descriptor 2,
  where the C++ code writes) to a temporary file while the ``tensorflow`` package executes, then
  writes back every line it captured except those. Entry points that never import TensorFlow
  (``pipeline.score`` with LiteRT, ``pipeline.report``) pay nothing.
- holds back the cuInit error too, and only where it is known noise: on a machine without a GPU
  (``gpu_possible``: no ``/dev/nvidiaN``), TensorFlow looks for devices while
  its import is held back, so the line is logged there and dropped (``KNOWN_NOISE``). Where a
  GPU is present a failing cuInit is a real error, and it shows.

A process that dies inside ``import tensorflow`` (a CPU without the instructions the wheel was
built for, a broken CUDA library) cannot write back what it captured: while the import runs,
``faulthandler`` reports such a death on the real stderr with the Python stack ending at the
import, and ``TF_CPP_MIN_LOG_LEVEL=0`` turns the capture off, so TensorFlow's own message shows.
"""

from __future__ import annotations

import contextlib
import faulthandler
import glob
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

DEFAULT_LEVEL = "2"
# absl's prefix: severity, MMDD and time (0000 00:00:<seconds since the epoch> before absl is
# initialised), thread, file:line]
ABSL_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ")
ABSL_BANNER = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}  # a line is kept when its severity >= the level
# Error lines that say nothing is wrong on a machine without a GPU: CUDA's driver is not there.
KNOWN_NOISE = re.compile(rb"^E\d{4} [^\]]*\] failed call to cuInit: ")


def quiet_tensorflow_logs() -> None:
    """Set ``TF_CPP_MIN_LOG_LEVEL`` (``DEFAULT_LEVEL`` unless set) and hold back TensorFlow's
    load-time absl lines below it (module docstring). Idempotent; does nothing more once
    TensorFlow is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", DEFAULT_LEVEL)
    if "tensorflow" not in sys.modules and not any(isinstance(finder, _QuietTensorFlowImport)
                                                   for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


def gpu_possible() -> bool:
    """False when TensorFlow cannot see a GPU here: on Linux, no ``/dev/nvidiaN`` device node.

    Answering that without importing TensorFlow spares CPU workers on the LiteRT runtime
    TensorFlow's import: seconds of start-up and about 500 MiB per process.
    """
    return sys.platform != "linux" or bool(glob.glob("/dev/nvidia[0-9]*"))


def min_log_level() -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` as TensorFlow reads it (0 when unset or not a number)."""
    value = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0").strip()
    return int(value) if value.isdigit() else 0


def kept_lines(captured: bytes, level: int, without_gpu: bool = False) -> bytes:
    """``captured`` stderr without absl's lines of a severity below ``level`` (``I`` below 1,
    ``W`` below 2, ``E`` below 3, as ``TF_CPP_MIN_LOG_LEVEL``) and, at 1 or more, without absl's
    banner about logging before initialisation and, ``without_gpu``, without ``KNOWN_NOISE``.
    Every other line (other errors, Python warnings, tracebacks, what other libraries print) is
    kept, in order."""
    kept = []
    for line in captured.splitlines(keepends=True):
        absl = ABSL_LINE.match(line)
        if absl and SEVERITY[absl.group(1)] < level:
            continue
        if level >= 1 and (line.startswith(ABSL_BANNER) or (without_gpu and KNOWN_NOISE.match(line))):
            continue
        kept.append(line)
    return b"".join(kept)


@contextlib.contextmanager
def _absl_lines_held_back(level: int, without_gpu: bool = False):
    """Send file descriptor 2 to a temporary file while the block runs, then write back
    ``kept_lines`` of it (after an exception too), with ``faulthandler`` writing to the real
    stderr meanwhile (a fatal signal cannot write back). A no-op at level 0 (every line asked
    for, as it comes) and where fd 2 cannot be duplicated."""
    sys.stderr.flush()
    try:
        saved = os.dup(2) if level > 0 else None
    except OSError:
        saved = None
    if saved is None:
        yield
        return
    handler_was_on = faulthandler.is_enabled()
    with tempfile.TemporaryFile() as captured, os.fdopen(saved, "w", closefd=False) as real_stderr:
        faulthandler.enable(file=real_stderr)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if handler_was_on:
                faulthandler.enable(file=sys.stderr)
            else:
                faulthandler.disable()
            captured.seek(0)
            os.write(2, kept_lines(captured.read(), level, without_gpu))


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` (once, through the other finders) and runs its package code with
    absl's load-time lines held back; the module keeps its own loader."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _HeldBackLoader(spec.loader)
        return spec


class _HeldBackLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__spec__.loader = module.__loader__ = self._loader
        without_gpu = not gpu_possible()
        with _absl_lines_held_back(min_log_level(), without_gpu):
            self._loader.exec_module(module)
            if without_gpu:  # the device search that logs the cuInit error, now, while held back
                module.config.list_physical_devices("GPU")
