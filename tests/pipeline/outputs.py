"""Read a run's outputs back, as a user of them would."""

from __future__ import annotations

import csv
import glob
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq


def read_parquet_shards(directory: str) -> pa.Table:
    shards = sorted(glob.glob(os.path.join(directory, "*.parquet")))
    assert shards, f"no Parquet shard under {directory}"
    return pa.concat_tables([pq.read_table(shard) for shard in shards])


def read_run(output: str) -> dict:
    with open(os.path.join(output, "submission.csv"), newline="") as handle:
        csv_rows = list(csv.reader(handle))
    with open(os.path.join(output, "summary.json")) as handle:
        summary = json.load(handle)
    return {
        "csv": csv_rows,
        "predictions": read_parquet_shards(os.path.join(output, "predictions")),
        "errors": read_parquet_shards(os.path.join(output, "errors")),
        "summary": summary,
    }
