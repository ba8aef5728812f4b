"""Read a run's outputs back, as a user of them would."""

from __future__ import annotations

import csv
import glob
import json
import os
from html.parser import HTMLParser

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


class ReportParser(HTMLParser):
    """Tables by id (rows of cell texts), embedded JSON data, and the images' data URIs."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self.images, self.data, self.text = {}, [], None, ""
        self._table = self._row = self._cell = None
        self._in_data = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"table-{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs["src"].split(",", 1)[0])
        elif tag == "script" and attrs.get("id") == "report-data":
            self._in_data = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "script":
            self._in_data = False

    def handle_data(self, data):
        self.text += data
        if self._cell is not None:
            self._cell += data
        if self._in_data:
            self.data = json.loads(data)
