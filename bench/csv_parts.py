"""How much of a huge night the Kaggle CSV step puts in one worker.

    .venv/bin/python bench/csv_parts.py [--rows 3000000] [--rows-per-part 1000000] [--work DIR]

Feeds N synthetic prediction rows (integer ids in random order) to ``WriteKaggleCsv`` on the
local runner, checks the CSV is complete and sorted, and prints the number of parts and the
largest number of rows any one worker sorted (Beam's ``csv_part_rows`` distribution): before
this design, one worker gathered all N.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import MetricsFilter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.write import BINARY, WriteKaggleCsv  # noqa: E402


def rows(seed: int, count: int):
    ids = np.random.default_rng(seed).permutation(count)
    for image_id in ids:
        yield {"path": f"/night/{image_id}.jpg", "image_id": int(image_id), "prob_cat": 0.25,
               "prob_dog": 0.75}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--rows-per-part", type=int, default=1_000_000)
    parser.add_argument("--work", default="bench_output/csv_parts")
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    csv_path = os.path.join(args.work, "submission.csv")
    started = time.monotonic()
    pipeline = beam.Pipeline()
    (pipeline
     | beam.Create(range(8))
     | "Rows" >> beam.FlatMap(lambda shard: rows(0, args.rows) if shard == 0 else ())
     | WriteKaggleCsv(csv_path, os.path.join(args.work, "csv-parts"), ["cat", "dog"], BINARY, "dog",
                      0.0, rows_per_part=args.rows_per_part))
    result = pipeline.run()
    result.wait_until_finish()
    parts = result.metrics().query(MetricsFilter().with_name("csv_part_rows"))["distributions"][0]
    with open(csv_path) as handle:
        next(handle)
        ids = [int(line.split(",", 1)[0]) for line in handle]
    assert ids == list(range(args.rows)), "the CSV is not every id in order"
    print(json.dumps({"rows": args.rows, "parts": parts.committed.count,
                      "largest_part_rows": parts.committed.max,
                      "largest_part_share": round(parts.committed.max / args.rows, 3),
                      "seconds": round(time.monotonic() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
