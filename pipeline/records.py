"""Completion records (``summary.json``) of earlier runs, found by a glob of run prefixes.

Only committed runs have one, so whatever reads earlier nights (``--skip-scored``,
``--compare-to``) reads them through here and never trusts a killed attempt's files.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from apache_beam.io.filesystems import FileSystems

from pipeline.write import SUMMARY_NAME


def read_record(run_prefix: str) -> dict | None:
    """The run's completion record, or None when the run is not committed."""
    path = FileSystems.join(run_prefix.rstrip("/"), SUMMARY_NAME)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        return json.loads(handle.read())


def committed_runs(pattern: str, exclude_run: str | None = None) -> list[tuple[str, dict]]:
    """``(run prefix with a trailing '/', record)`` of every committed run under ``pattern``
    (a glob of run prefixes, e.g. ``gs://bkt/scores/dt=*``), oldest first, never
    ``exclude_run`` (tonight's own prefix). Records are read 16 at a time."""
    matched = FileSystems.match([FileSystems.join(pattern.rstrip("/"), SUMMARY_NAME)])[0].metadata_list
    prefixes = [metadata.path[:-len(SUMMARY_NAME)] for metadata in matched]
    if exclude_run:
        prefixes = [p for p in prefixes if p.rstrip("/") != exclude_run.rstrip("/")]

    def read(prefix: str) -> dict:
        with FileSystems.open(prefix + SUMMARY_NAME) as handle:
            return json.loads(handle.read())

    with ThreadPoolExecutor(max_workers=16) as pool:
        runs = list(zip(prefixes, pool.map(read, prefixes), strict=True))
    return sorted(runs, key=lambda run: (str(run[1].get("run_date")), str(run[1].get("run_id")), run[0]))
