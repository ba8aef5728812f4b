"""Memory does not grow with the night: the structures that hold per-image state are bounded,
and a night cut into many chunks, row groups and CSV pieces writes what one piece would."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from model.synthetic import write_kaggle_test_folder
from pipeline import read, score, write
from pipeline.read import ListedColumns, colliding_csv_ids
from pipeline.rows import ListedImage
from pipeline.write import BINARY, MULTICLASS, csv_chunks, csv_lines
from tests.pipeline.outputs import read_parquet_shards, read_run


def test_listed_columns_give_the_listing_back_in_order_across_chunks(monkeypatch):
    monkeypatch.setattr(ListedColumns, "CHUNK_ROWS", 5)
    listed = [ListedImage(f"/n/{i}.jpg", None if i % 7 == 0 else i * 1000,
                          None if i % 5 == 0 else 1.7e9 + i / 3) for i in range(23)]
    columns = ListedColumns(BINARY)
    for image in listed:
        columns.append(image.path, image.size_bytes, image.updated_seconds)
    assert len(columns) == 23
    batches = list(columns.batches(4))
    assert [len(batch) for batch in batches] == [4] * 5 + [3]
    assert [image for batch in batches for image in batch.images] == listed  # None kept as None
    kept = [image for batch in columns.batches(4, leave_out={"/n/3.jpg", "/n/20.jpg"})
            for image in batch.images]
    assert kept == [image for image in listed if image.path not in {"/n/3.jpg", "/n/20.jpg"}]


@pytest.mark.parametrize("csv_format", [BINARY, MULTICLASS])
@pytest.mark.parametrize("same_hash", [False, True], ids=["hashes", "every-hash-equal"])
def test_listed_columns_find_exactly_the_colliding_ids_a_dict_of_every_id_finds(
        monkeypatch, csv_format, same_hash):
    monkeypatch.setattr(ListedColumns, "CHUNK_ROWS", 4)
    if same_hash:  # every id a candidate: the exact comparison alone decides
        monkeypatch.setattr(read, "hash", lambda key: 1, raising=False)
    paths = ["/a/7.png", "/a/8.jpg", "/a/cat.7.jpg", "/b/x.jpg", "/a/007.jpg", "/a/9.jpg",
             "/b/9.gif", "/c/x.png", "/c/10.jpg", "/c/0010.jpg", "/c/10.jpeg", "/c/y.jpg"]
    columns = ListedColumns(csv_format)
    for path in paths:
        columns.append(path, 1, 1.0)
    expected = colliding_csv_ids(paths, csv_format)
    assert expected  # the case holds collisions of both formats
    assert columns.colliding_csv_ids() == expected


@pytest.mark.parametrize("csv_format", [BINARY, MULTICLASS])
def test_the_csv_is_formatted_a_chunk_at_a_time_as_it_was_whole(monkeypatch, csv_format):
    rng = np.random.default_rng(5)
    ids = rng.permutation(1000)[:50]
    keys = ids.tolist() if csv_format == BINARY else [f"s{i:04d}" for i in ids]
    values = rng.random((50, 1 if csv_format == BINARY else 3))
    order = sorted(range(50), key=keys.__getitem__)
    if csv_format == BINARY:
        expected = "".join(f"{keys[i]},{values[i, 0]:.6f}\n" for i in order)
    else:
        expected = "".join(",".join([keys[i], *(f"{v:.6g}" for v in values[i])]) + "\n" for i in order)
    monkeypatch.setattr(write, "CSV_CHUNK_ROWS", 7)
    chunks = list(csv_chunks(np.array(keys, dtype=object if csv_format == MULTICLASS else None),
                             values, csv_format, 0.0))
    assert len(chunks) == 8 and b"".join(chunks).decode() == expected
    assert csv_lines(keys, values, csv_format, 0.0).decode() == expected  # a list of ids too


def test_a_night_in_many_chunks_row_groups_and_csv_pieces_writes_what_one_piece_does(
        trained, tmp_path, monkeypatch):
    """1,500 images (hard links to 15 photos): listed in chunks of 256, coalesced into row
    groups of 64 KiB and formatted 100 CSV rows at a time, every output holds what the same
    night written in one piece holds, every image is one prediction row."""
    photos = write_kaggle_test_folder(str(tmp_path / "photos"), 15, side_range=(40, 64))
    night = tmp_path / "night"
    night.mkdir()
    for image_id in range(1, 1501):
        os.link(tmp_path / "photos" / f"{(image_id - 1) % len(photos) + 1}.jpg", night / f"{image_id}.jpg")
    args = ["--input", str(night / "*.jpg"), "--model-dir", trained["model_dir"], "--run-id", "night"]
    whole = score.run([*args, "--output", str(tmp_path / "whole")])
    monkeypatch.setattr(ListedColumns, "CHUNK_ROWS", 256)
    monkeypatch.setattr(write, "CSV_CHUNK_ROWS", 100)
    monkeypatch.setattr(write.CoalesceTables.__init__, "__defaults__", (64 * 1024,))
    pieces = score.run([*args, "--output", str(tmp_path / "pieces")])
    assert pieces["inputs"] == pieces["predictions"] == pieces["csv_rows"] == 1500 and pieces["accounted"]
    one, many = read_run(str(tmp_path / "whole")), read_run(str(tmp_path / "pieces"))
    csv_bytes = [(tmp_path / run / "submission.csv").read_bytes() for run in ("whole", "pieces")]
    assert csv_bytes[0] == csv_bytes[1]
    assert [int(row[0]) for row in many["csv"][1:]] == list(range(1, 1501))
    assert many["predictions"].schema == one["predictions"].schema
    stable = [name for name in one["predictions"].column_names if name != "scored_at"]
    assert many["predictions"].select(stable).equals(one["predictions"].select(stable))
    assert sorted(many["predictions"]["path"].to_pylist()) == sorted(str(night / f"{i}.jpg")
                                                                     for i in range(1, 1501))
    shards = [pq.ParquetFile(os.path.join(tmp_path / "pieces" / "predictions", name))
              for name in os.listdir(tmp_path / "pieces" / "predictions")]
    assert sum(shard.metadata.num_row_groups for shard in shards) > 1
    assert read_parquet_shards(str(tmp_path / "pieces" / "errors")).num_rows == 0
    assert whole["csv_rows"] == 1500
