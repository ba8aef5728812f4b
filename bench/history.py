"""History benchmark: what ``--skip-scored`` over a year of earlier nights adds to one night.

    .venv/bin/python bench/history.py --model-dir MODEL [--rows 1000000 10000000]
        [--images 2000] [--work bench_output/history]

Writes synthetic histories with the predictions schema a run writes (365 nights under
``scores/dt=YYYY-MM-DD/``, each with its Parquet predictions and its completion record), then
scores the same 2,000-image night without and with ``--skip-scored`` over each history, each run
in its own process, and prints the peak RSS and wall seconds the history adds. Two layouts:

  dated   each night's images arrive under their own ``incoming/dt=YYYY-MM-DD/`` (the nightly
          default of ``deploy/``): no earlier night can hold tonight's paths
  shared  every night lists the same folder: every earlier night may hold tonight's paths

History rows never match tonight's files (other bytes, other sizes), so every run does the same
scoring work and the difference is the cost of the history alone. ``--skip-scored-form parquet``
passes the glob of Parquet files that versions before the completion record took.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from bench.throughput import generate  # noqa: E402
from pipeline.rows import prediction_schema  # noqa: E402
from serving.metadata import read_metadata  # noqa: E402

NIGHTS = 365
TONIGHT = datetime.date(2026, 11, 23)


def incoming(work: str, layout: str, night: datetime.date) -> str:
    return os.path.join(work, "incoming", f"dt={night}" if layout == "dated" else "all")


def write_history(work: str, layout: str, rows: int, model_dir: str) -> str:
    """``NIGHTS`` committed runs holding ``rows`` predictions in all; returns the scores folder."""
    scores = os.path.join(work, f"history-{layout}-{rows}", "scores")
    if os.path.exists(os.path.join(scores, "complete")):
        return scores
    shutil.rmtree(scores, ignore_errors=True)
    metadata = read_metadata(model_dir)
    schema = prediction_schema(metadata.class_names)
    rng = np.random.default_rng(0)
    per_night = -(-rows // NIGHTS)
    for index in range(NIGHTS):
        night = TONIGHT - datetime.timedelta(days=NIGHTS - index)
        count = min(per_night, rows - index * per_night)
        first = index * per_night if layout == "shared" else 0
        folder = incoming(work, layout, night)
        paths = [f"{folder}/{first + i + 100_000}.jpg" for i in range(count)]
        probability = rng.random(count)
        columns = {
            "path": paths,
            "image_id": [first + i + 100_000 for i in range(count)],
            "content_sha256": [bytes(row).hex() for row in rng.integers(0, 256, (count, 32), np.uint8)],
            "file_bytes": rng.integers(1, 1000, count),  # tonight's files are larger: no match
            "file_updated_seconds": np.full(count, 1.7e9),
            "predicted_class": np.where(probability > 0.5, metadata.class_names[1],
                                        metadata.class_names[0]),
            f"prob_{metadata.class_names[0]}": 1 - probability,
            f"prob_{metadata.class_names[1]}": probability,
            "confidence": np.maximum(probability, 1 - probability),
            "model_version": [metadata.model_version] * count,
            "model_sha256": [metadata.sha256] * count,
            "run_id": [f"{night}"] * count,
            "scored_at": pa.array([datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)] * count,
                                  pa.timestamp("ms", tz="UTC")),
        }
        columns["decision"] = columns["predicted_class"]
        table = pa.Table.from_pydict({name: columns.get(name, [None] * count) for name in schema.names},
                                     schema=schema)
        run = os.path.join(scores, f"dt={night}")
        shard = "predictions/predictions-00000-of-00001.parquet"
        os.makedirs(os.path.join(run, "predictions"))
        pq.write_table(table, os.path.join(run, shard))
        record = {"model_version": metadata.model_version, "predictions": count, "inputs": count,
                  "errors": 0, "input": f"{folder}/*.jpg", "paths_prefix": f"{folder}/",
                  "files": [{"path": shard, "bytes": os.path.getsize(os.path.join(run, shard))}]}
        with open(os.path.join(run, "summary.json"), "w") as handle:
            json.dump(record, handle)
    open(os.path.join(scores, "complete"), "w").close()
    return scores


def measure(args: list[str], repo: str) -> dict:
    """Wall seconds and peak RSS of one ``python -m pipeline.score`` process."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "pipeline.score", *args], cwd=repo,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        return {"failed": stderr[-600:], "seconds": round(seconds, 1),
                "peak_rss_mib": round(usage.ru_maxrss / 1024)}
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--layouts", nargs="+", default=["dated", "shared"])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--work", default="bench_output/history")
    parser.add_argument("--skip-scored-form", choices=["runs", "parquet"], default="runs")
    parser.add_argument("--repo", default=REPO,
                        help="checkout whose pipeline.score runs (e.g. a worktree of an older commit)")
    args = parser.parse_args(argv)
    args.work, args.model_dir = os.path.abspath(args.work), os.path.abspath(args.model_dir)
    results = []
    for layout in args.layouts:
        night = incoming(args.work, layout, TONIGHT)
        generate(night, args.images)
        common = ["--input", f"{night}/*.jpg", "--model-dir", args.model_dir, "--overwrite"]
        baseline = measure([*common, "--output", os.path.join(args.work, "out", "baseline")],
                           args.repo)
        print(json.dumps({"layout": layout, "rows": 0, **baseline}), flush=True)
        for rows in args.rows:
            scores = write_history(args.work, layout, rows, args.model_dir)
            skip = (f"{scores}/dt=*/predictions/*.parquet" if args.skip_scored_form == "parquet"
                    else f"{scores}/dt=*")
            result = measure([*common, "--output", os.path.join(args.work, "out", f"{layout}-{rows}"),
                              "--skip-scored", skip], args.repo)
            added = ({} if "failed" in result else
                     {"added_seconds": round(result["seconds"] - baseline["seconds"], 1),
                      "added_rss_mib": result["peak_rss_mib"] - baseline["peak_rss_mib"]})
            results.append({"layout": layout, "rows": rows, **result, **added})
            print(json.dumps(results[-1]), flush=True)
    print("\n| layout | history rows | seconds | peak RSS MiB | added s | added MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in results:
        print(f"| {row['layout']} | {row['rows']:,} | {row['seconds']} | {row['peak_rss_mib']} | "
              f"{row.get('added_seconds', 'failed')} | {row.get('added_rss_mib', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
