"""Output rows and their explicit pyarrow schemas."""

from __future__ import annotations

import datetime
import os
import re
from typing import Any

import pyarrow as pa

UNCERTAIN = "uncertain"

ERROR_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),  # read | decode
    pa.field("error_type", pa.string(), nullable=False),
    pa.field("message", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("failed_at", pa.timestamp("ms", tz="UTC"), nullable=False),
])


def probability_column(class_name: str) -> str:
    """Column holding P(class_name): ``prob_dog``; odd characters become ``_``."""
    return "prob_" + re.sub(r"[^0-9a-zA-Z_]", "_", class_name)


def prediction_schema(class_names: list[str]) -> pa.Schema:
    return pa.schema([
        pa.field("path", pa.string(), nullable=False),
        pa.field("image_id", pa.int64()),  # integer file stem, null when the stem is not a number
        pa.field("content_sha256", pa.string(), nullable=False),  # of the file's bytes
        pa.field("predicted_class", pa.string(), nullable=False),
        *[pa.field(probability_column(name), pa.float64(), nullable=False) for name in class_names],
        pa.field("confidence", pa.float64(), nullable=False),
        pa.field("decision", pa.string(), nullable=False),  # a class name, or 'uncertain'
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("model_sha256", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scored_at", pa.timestamp("ms", tz="UTC"), nullable=False),
    ])


def image_id(path: str) -> int | None:
    """Kaggle id of a path: ``.../123.jpg`` -> 123; None when the stem is not an integer."""
    stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    return int(stem) if stem.isdigit() else None


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def error_row(path: str, stage: str, error: BaseException | str, run_id: str,
              error_type: str | None = None) -> dict[str, Any]:
    return {
        "path": path,
        "stage": stage,
        "error_type": error_type or type(error).__name__,
        "message": str(error) or type(error).__name__,
        "run_id": run_id,
        "failed_at": utc_now(),
    }
