"""Golden comparison: the batch pipeline gives what the per-image pipeline gave, row for row.

The per-image pipeline is the code of ``PER_IMAGE_PIPELINE`` (the last commit before batches
became the unit of work), taken from this repository's history with ``git archive`` and run
through its own CLI in a subprocess, beside today's CLI, on the same files and model:
- the contract corpus (every format and every kind of bad file),
- a night with ``--skip-scored`` over a first night (some files unchanged, one rewritten, one new),
- a 133-class model with ``--top-k 5`` and the multi-class CSV.
Both must give the same Parquet rows (probabilities within 1e-6), the same error rows, a
byte-identical ``submission.csv``, the same review queue and the same record counts and profile.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import keras
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from keras import layers

from model import package
from pipeline.rows import OPTIONAL_PREDICTION_FIELDS
from tests.corpus import write_corpus
from tests.pipeline.outputs import read_parquet_shards

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PER_IMAGE_PIPELINE = "fa1d5d77c2b17d89e65215d6424f0e35be717593"
BREEDS = [f"breed_{i:03d}" for i in range(133)]
RECORD_FIELDS = ("inputs", "predictions", "errors", "errors_by_type", "skipped_already_scored",
                 "uncertain", "csv_rows", "accounted", "profile")


@pytest.fixture(scope="module")
def per_image_checkout(tmp_path_factory) -> str:
    """The per-image pipeline's code, from git history; skipped where the history is absent (a
    source archive without ``.git``, or a shallow clone)."""
    try:
        archive = subprocess.run(["git", "archive", PER_IMAGE_PIPELINE, "pipeline", "serving",
                                  "reports", "model"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"the per-image pipeline's commit is not in this checkout's history: {error}")
    target = str(tmp_path_factory.mktemp("per-image"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def score_with(checkout: str, *argv: str) -> None:
    """``python -m pipeline.score ARGV`` with the code of ``checkout``, in a fresh process. Today's
    pipeline scores with ``--out-of-scope off``: the session's model carries a detector (issue 27,
    after the per-image pipeline), which the per-image pipeline does not know."""
    if checkout == REPO:
        argv = (*argv, "--out-of-scope", "off")
    process = subprocess.run([sys.executable, "-m", "pipeline.score", *argv], cwd=checkout,
                             env={**os.environ, "PYTHONPATH": checkout, "TF_CPP_MIN_LOG_LEVEL": "2"},
                             capture_output=True, text=True, timeout=600)
    assert process.returncode in (0, 3), process.stderr[-3000:]


def same_message(old: str, new: str) -> bool:
    """Equal, but for the one message that changed on purpose since the per-image pipeline
    (issue 25): Pillow's "cannot identify image file <_io.BytesIO object at 0x7f...>" now says
    what the bytes are ("not an image: text (first line ...)")."""
    if old.startswith("cannot identify image file"):
        return new.startswith("not an image: ")
    return new == old


def same_columns(old: pa.Table, new: pa.Table) -> pa.Table:
    """``new`` less the columns every run writes since issue 31 whether it computed them or not
    (``OPTIONAL_PREDICTION_FIELDS``, null where the old run had none; nullable since; ``tta``
    says ``none``, how the old run scored too), and the review queue's ``reason``: it must
    otherwise have ``old``'s columns and types."""
    added = [name for name in new.column_names if name not in old.column_names]
    assert set(added) <= {field.name for field in OPTIONAL_PREDICTION_FIELDS} | {"reason"}, added
    assert all(new[name].null_count == new.num_rows for name in added if name not in ("reason", "tta"))
    assert "tta" not in added or set(new["tta"].to_pylist()) == {"none"}
    new = new.select(old.column_names)
    def types(table):
        return [(field.name, field.type) for field in table.schema]

    assert types(new) == types(old)
    return new


def assert_same_run(before: str, after: str) -> None:
    for kind in ("predictions", "errors"):
        old = read_parquet_shards(os.path.join(before, kind)).sort_by("path")
        new = same_columns(old, read_parquet_shards(os.path.join(after, kind)).sort_by("path"))
        assert new.num_rows == old.num_rows
        for name in old.column_names:
            if name in ("scored_at", "failed_at"):  # when the row was made
                continue
            want, got = old[name].to_pylist(), new[name].to_pylist()
            if name.startswith("prob_") or name in ("confidence", "top_probabilities"):
                want, got = (np.array(want, dtype=float), np.array(got, dtype=float))
                assert want.shape == got.shape and np.max(np.abs(want - got), initial=0) <= 1e-6, name
            elif name == "message":
                assert all(map(same_message, want, got)) and len(want) == len(got)
            else:
                assert got == want, name
    with open(os.path.join(before, "submission.csv"), "rb") as old, \
            open(os.path.join(after, "submission.csv"), "rb") as new:
        assert new.read() == old.read()
    old_queue = pacsv.read_csv(os.path.join(before, "review", "review-queue.csv"))
    new_queue = pacsv.read_csv(os.path.join(after, "review", "review-queue.csv"))
    assert same_columns(old_queue, new_queue).equals(old_queue)
    assert set(new_queue["reason"].to_pylist()) <= {"least_confident"}
    with open(os.path.join(before, "summary.json")) as old, open(os.path.join(after, "summary.json")) as new:
        old_record, new_record = json.load(old), json.load(new)
    old_examples = old_record["profile"].pop("error_examples")
    new_examples = new_record["profile"].pop("error_examples")
    assert sorted(new_examples) == sorted(old_examples)
    for kind, examples in old_examples.items():  # which examples come first is arrival order
        old_sorted, new_sorted = sorted(examples), sorted(new_examples[kind])
        assert [path for path, _ in new_sorted] == [path for path, _ in old_sorted]
        assert all(same_message(old, new) for (_, old), (_, new) in zip(old_sorted, new_sorted, strict=True))
    for field in RECORD_FIELDS:
        assert new_record[field] == old_record[field], field


def test_the_contract_corpus_scores_alike(per_image_checkout, corpus, trained, tmp_path):
    root, _ = corpus
    outputs = {}
    for name, checkout in (("before", per_image_checkout), ("after", REPO)):
        outputs[name] = str(tmp_path / name)
        score_with(checkout, "--input", os.path.join(root, "*"), "--model-dir", trained["model_dir"],
                   "--output", outputs[name], "--run-id", "golden", "--min-confidence", "0.6",
                   *(["--batch-size", "5"] if name == "after" else
                     ["--min-batch-size", "5", "--max-batch-size", "5"]))
    assert read_parquet_shards(os.path.join(outputs["after"], "errors")).num_rows == 4
    assert_same_run(outputs["before"], outputs["after"])


def test_a_night_with_skip_scored_scores_alike(per_image_checkout, corpus, trained, tmp_path):
    night = str(tmp_path / "incoming")
    shutil.copytree(corpus[0], night)
    model = trained["model_dir"]
    for name, checkout in (("before", per_image_checkout), ("after", REPO)):
        score_with(checkout, "--input", os.path.join(night, "*"), "--model-dir", model,
                   "--output", str(tmp_path / name / "dt=1"), "--run-id", "night-1")
    with open(os.path.join(night, "3.jpg"), "ab") as handle:  # rewritten: other bytes, same path
        handle.write(b"\0")
    os.utime(os.path.join(night, "5.jpg"))  # touched, the same bytes: read, hashed and skipped
    shutil.copy(os.path.join(night, "7.jpg"), os.path.join(night, "100.jpg"))  # new
    for name, checkout in (("before", per_image_checkout), ("after", REPO)):
        score_with(checkout, "--input", os.path.join(night, "*"), "--model-dir", model,
                   "--output", str(tmp_path / name / "dt=2"), "--run-id", "night-2",
                   "--skip-scored", str(tmp_path / name / "dt=*"))
    after = str(tmp_path / "after" / "dt=2")
    paths = sorted(read_parquet_shards(os.path.join(after, "predictions"))["path"].to_pylist())
    assert paths == [os.path.join(night, "100.jpg"), os.path.join(night, "3.jpg")]
    assert_same_run(str(tmp_path / "before" / "dt=2"), after)


@pytest.fixture(scope="module")
def breeds_model(tmp_path_factory) -> str:
    """A 133-class Keras model (random weights, distinct probabilities) packaged as a notebook's."""
    root = tmp_path_factory.mktemp("breeds")
    keras.utils.set_random_seed(11)
    model = keras.Sequential([keras.Input((32, 32, 3)), layers.Conv2D(8, 3, activation="relu"),
                              layers.GlobalAveragePooling2D(),
                              layers.Dense(len(BREEDS), activation="softmax")])
    model.save(str(root / "breeds.keras"))
    model_dir = str(root / "model")
    assert package.main(["--keras", str(root / "breeds.keras"), "--scaling", "1/255", "--classes",
                         ",".join(BREEDS), "--output", model_dir]) == 0
    return model_dir


def test_a_133_class_model_with_top_k_scores_alike(per_image_checkout, breeds_model, tmp_path):
    images = str(tmp_path / "images")
    write_corpus(images)
    for stem in ("0a9c", "ff01", "beagle-7"):  # multi-class ids are file stems, as they are
        shutil.copy(os.path.join(images, "1.jpg"), os.path.join(images, f"{stem}.jpg"))
    for name, checkout in (("before", per_image_checkout), ("after", REPO)):
        score_with(checkout, "--input", os.path.join(images, "*"), "--model-dir", breeds_model,
                   "--output", str(tmp_path / name), "--run-id", "breeds", "--top-k", "5")
    rows = read_parquet_shards(os.path.join(str(tmp_path / "after"), "predictions"))
    assert rows.schema.field("top_classes").type == pa.list_(pa.string())
    assert len(glob.glob(os.path.join(str(tmp_path / "after"), "predictions", "*.parquet"))) >= 1
    assert_same_run(str(tmp_path / "before"), str(tmp_path / "after"))
