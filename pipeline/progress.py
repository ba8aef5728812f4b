"""Progress of a local run: done / total, images/s and time left, logged every few seconds.

The total is what the listing found (``expect``, called by the listing step: the files are
listed once), and every batch of inputs that leaves as prediction, error or skipped rows moves
the count on by its length. Local runners execute
DoFns in the launching process, where the one ``ProgressLog`` lives; on Dataflow the job's
metrics (``images_scored`` and friends) show progress instead, and this step is not added.
"""

from __future__ import annotations

import logging
import threading
import time

import apache_beam as beam

_LOG = logging.getLogger("petscore")
_CURRENT: ProgressLog | None = None


class ProgressLog:
    """Counts finished inputs against ``total`` (None until the listing says) and logs a line at
    most every ``every`` seconds, and once more when the last input is done."""

    def __init__(self, total: int | None = None, every: float = 5.0):
        self.total = total
        self.done = 0
        self._every = every
        self._started = self._last_line = time.monotonic()
        self._lock = threading.Lock()

    def advance(self, count: int = 1) -> None:
        with self._lock:
            self.done += count
            now = time.monotonic()
            if (self.total is None or self.done < self.total) and now - self._last_line < self._every:
                return
            self._last_line = now
            _LOG.info("progress: %s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        if self.total is None:
            return f"{self.done:,} images, {rate:.1f} images/s"
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        share = self.done / self.total if self.total else 1.0
        return (f"{self.done:,}/{self.total:,} images ({share:.0%}), {rate:.1f} images/s, "
                f"about {left:.0f} s left")


def start() -> ProgressLog:
    """Make the progress log the DoFns of this process report to."""
    global _CURRENT
    _CURRENT = ProgressLog()
    return _CURRENT


def expect(total: int) -> None:
    """The listing's count of inputs: the total the progress log counts against, if there is one
    in this process (a local run). Set, not added: a retried listing counts its files once."""
    if _CURRENT is not None:
        _CURRENT.total = total


def stop() -> None:
    """The run is over: DoFns of a later run in this process report to that run's log only."""
    global _CURRENT
    _CURRENT = None


class _AdvanceProgress(beam.DoFn):
    """A batch of finished inputs (a table of rows, a list of paths) moves the count by its length."""

    def process(self, batch):
        if _CURRENT is not None:
            _CURRENT.advance(len(batch))
        return ()


class ReportProgress(beam.PTransform):
    """The PCollections of finished inputs in batches (prediction and error tables, lists of
    skipped paths) in; nothing out.

    Each is counted where it is made, not after a Flatten: the FnApiRunner materialises a Flatten
    whose inputs come from different stages, so progress would move only once scoring had ended,
    and the runner would hold every prediction row until then."""

    def expand(self, finished):
        for index, pcoll in enumerate(finished):
            pcoll | f"Advance{index}" >> beam.ParDo(_AdvanceProgress())
        return beam.pvalue.PDone(finished[0].pipeline)
