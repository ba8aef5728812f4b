"""A challenger scored in the same pass (--challenger-model), and nights that read as one table.

Three nights of the real CLI under one ``scores/dt=<date>/`` prefix: the model alone, the model
with a challenger (another export of the session's model: a shifted head, bicubic resizing, its own
detector), and an incremental night with the challenger, top-k and no detector; plus a
three-class pair. Every output is read back and the challenger's figures recomputed from the rows.
"""

from __future__ import annotations

import glob
import os
import shutil

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from model.synthetic import write_kaggle_test_folder
from pipeline import decode, score
from pipeline.decode import CHALLENGER_ERRORS, DECODED, DecodeImages, DecodeSpec
from pipeline.options import ThreadBudget
from pipeline.rows import ERROR_SCHEMA, ListedImage, PathBatch, prediction_schema
from pipeline.summary import ChallengerComparisonFn
from serving.metadata import read_metadata
from tests.corpus import GOOD
from tests.pipeline.outputs import ReportParser, read_parquet_shards, read_run

NIGHTS = ("2026-11-20", "2026-11-21", "2026-11-22")
RUN_TIME_COLUMNS = ("scored_at", "failed_at")  # what differs between two runs of the same night


def export_variant(model_dir: str, output: str, labelled: str, *, dog_shift: float,
                   resize_method: str, version: str) -> str:
    """The session's model exported again with its head's dog logit moved by ``dog_shift`` (so
    decisions near the boundary flip), ``resize_method`` (another decoding) and a detector of
    its own fitted on ``labelled``: a challenger with the same classes."""
    import keras

    from model.export import export_model
    from model.out_of_scope import ScopeRequest

    metadata = read_metadata(model_dir)
    model = keras.saving.load_model(os.path.join(model_dir, "model.keras"))
    head = model.get_layer("probabilities")
    kernel, bias = head.get_weights()
    head.set_weights([kernel, bias + np.array([-dog_shift / 2, dog_shift / 2], bias.dtype)])
    paths = sorted(glob.glob(os.path.join(labelled, "*", "*.jpg")))
    export_model(model, output, class_names=metadata.class_names, base=metadata.base,
                 base_weights=metadata.base_weights, model_version=version, resize_method=resize_method,
                 scope=ScopeRequest(paths[::2], paths[1::2], "even images", "odd images", k=3))
    return output


def export_three_class_model(output: str, seed: int, version: str) -> str:
    """A small three-class model (mean colour -> softmax) whose seed decides its weights."""
    import keras

    from model.export import export_model

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 64)(inputs))
    outputs = keras.layers.Dense(3, activation="softmax", name="probabilities")(pooled)
    export_model(keras.Model(inputs, outputs), output, class_names=["cat", "dog", "fox"],
                 base="colour", base_weights="none", model_version=version)
    return output


def run_cli(*args: str) -> int:
    """``python -m pipeline.score`` in-process: its exit code."""
    return score.main([*args, "--max-error-rate", "1"])


@pytest.fixture(scope="module")
def nights(corpus, trained, labelled_images, tmp_path_factory) -> dict:
    """Three committed nights under ``scores/``: 1 the model alone, 2 the same images with the
    challenger and --fail-on-disagreement 0, 3 those images and three new ones with the
    challenger, --skip-scored, --out-of-scope off and --top-k 1."""
    root = tmp_path_factory.mktemp("challenger")
    incoming = root / "incoming"
    shutil.copytree(corpus[0], incoming)
    challenger = export_variant(trained["model_dir"], str(root / "challenger"), labelled_images,
                                dog_shift=1.0, resize_method="bicubic", version="challenger-1")
    scores = root / "scores"
    outputs = [str(scores / f"dt={night}") for night in NIGHTS]
    common = ["--input", str(incoming / "*"), "--model-dir", trained["model_dir"], "--run-id", "night",
              "--review-size", "6"]
    codes = [run_cli(*common, "--output", outputs[0]),
             run_cli(*common, "--output", outputs[1], "--challenger-model", challenger,
                     "--fail-on-disagreement", "0")]
    for image_id, _ in write_kaggle_test_folder(str(root / "new"), 3, seed=11, side_range=(40, 60)).items():
        os.rename(root / "new" / f"{image_id}.jpg", incoming / f"{900 + image_id}.jpg")
    codes.append(run_cli(*common, "--output", outputs[2], "--challenger-model", challenger,
                         "--skip-scored", str(scores / "dt=*"), "--out-of-scope", "off", "--top-k", "1"))
    return {"scores": str(scores), "outputs": outputs, "codes": codes, "challenger": challenger,
            "expected": corpus[1], "runs": [read_run(output) for output in outputs]}


def rows_by_path(table: pa.Table) -> dict[str, dict]:
    return {row["path"]: row for row in table.to_pylist()}


def without(table: pa.Table, columns=RUN_TIME_COLUMNS) -> list[dict]:
    kept = [name for name in table.column_names if name not in columns]
    return sorted(table.select(kept).to_pylist(), key=lambda row: row["path"])


def test_the_models_outputs_are_the_same_with_and_without_a_challenger(nights):
    alone, challenged = nights["runs"][:2]
    with open(os.path.join(nights["outputs"][0], "submission.csv"), "rb") as first, \
            open(os.path.join(nights["outputs"][1], "submission.csv"), "rb") as second:
        assert first.read() == second.read()
    assert alone["predictions"].schema == challenged["predictions"].schema
    assert without(alone["predictions"]) == without(challenged["predictions"])
    assert without(alone["errors"]) == without(challenged["errors"])
    same = ("inputs", "predictions", "errors", "errors_by_type", "uncertain", "out_of_scope", "csv_rows",
            "accounted", "profile", "drift", "model_version", "model_sha256")
    assert {key: alone["summary"][key] for key in same} == {key: challenged["summary"][key] for key in same}
    assert "challenger" not in alone["summary"] and alone["summary"]["accounted"]


def test_the_challenger_block_is_what_its_rows_say(nights):
    run, output = nights["runs"][1], nights["outputs"][1]
    ours = rows_by_path(run["predictions"])
    theirs_table = read_parquet_shards(os.path.join(output, "challenger", "predictions"))
    theirs = rows_by_path(theirs_table)
    metadata = read_metadata(nights["challenger"])
    assert theirs_table.schema == run["predictions"].schema == prediction_schema(["cat", "dog"])
    assert {row["model_version"] for row in theirs.values()} == {"challenger-1"}
    errors = read_parquet_shards(os.path.join(output, "challenger", "errors"))
    assert errors.schema == ERROR_SCHEMA and errors.num_rows == 0  # the corpus's bad files fail both
    assert set(theirs) == set(ours) and len(ours) == sum(o == GOOD for o in nights["expected"].values())

    block = run["summary"]["challenger"]
    flips = {}
    for path, row in ours.items():
        pair = (row["decision"], theirs[path]["decision"])
        if pair[0] != pair[1]:
            flips[pair] = flips.get(pair, 0) + 1
    assert 0 < sum(flips.values()) < len(ours), "the shifted head flips some images, not all"
    assert {(f["model"], f["challenger"]): f["images"] for f in block["flips"]} == flips
    assert block["flipped"] == sum(flips.values())
    assert block["agreement"] == pytest.approx(1 - sum(flips.values()) / len(ours), abs=1e-6)
    for name in ("cat", "dog"):
        difference = [abs(ours[p][f"prob_{name}"] - theirs[p][f"prob_{name}"]) for p in ours]
        assert block["probability_difference"][name]["mean"] == pytest.approx(np.mean(difference), abs=1e-6)
        assert block["probability_difference"][name]["max"] == pytest.approx(max(difference), abs=1e-6)
    flagged = [(ours[p]["decision"] == "out_of_scope", theirs[p]["decision"] == "out_of_scope") for p in ours]
    assert block["out_of_scope"] == {
        "both": flagged.count((True, True)), "model_only": flagged.count((True, False)),
        "challenger_only": flagged.count((False, True)),
        "agreement": pytest.approx(sum(a == b for a, b in flagged) / len(flagged), abs=1e-6)}
    assert (block["model_version"], block["model_sha256"]) == ("challenger-1", metadata.sha256)
    assert (block["predictions"], block["errors"], block["accounted"]) == (len(ours), 0, True)
    assert block["disagreement_limit"] == 0 and block["alert"] is True
    assert nights["codes"][:2] == [0, score.EXIT_DISAGREEMENT]  # after every output was written
    listed = {entry["path"] for entry in run["summary"]["files"]}
    written = glob.glob(os.path.join(output, "challenger", "*", "*"))
    assert written and {os.path.relpath(path, output) for path in written} <= listed


def test_the_review_queue_puts_flips_first_and_says_why_and_the_report_shows_them(nights):
    output, block = nights["outputs"][1], nights["runs"][1]["summary"]["challenger"]
    queue = pq.read_table(os.path.join(output, "review", "review-queue.parquet")).to_pylist()
    reasons = [row["reason"] for row in queue]
    flipped = min(block["flipped"], 6)
    assert reasons[:flipped] == ["flip"] * flipped and "flip" not in reasons[flipped:]
    assert all(row["decision"] != row["challenger_decision"] for row in queue[:flipped])
    assert set(reasons) <= {"flip", "out_of_scope", "least_confident"} and len(queue) == 6
    largest = [max(abs(row[f"prob_{n}"] - row[f"challenger_prob_{n}"]) for n in ("cat", "dog"))
               for row in queue[:flipped]]
    assert largest == sorted(largest, reverse=True)
    with open(os.path.join(output, "report.html"), encoding="utf-8") as handle:
        report = ReportParser(handle.read())
    assert f"Challenger: {block['flipped']} of {block['predictions']} images change decision" in report.text
    assert report.tables["flips"][1:] == [[f["model"], f["challenger"], str(f["images"])]
                                          for f in block["flips"]]
    assert report.text.count("challenger: ") >= flipped  # one card per flip in the queue
    assert [row["reason"] for row in report.data["review"]] == reasons


def test_skip_scored_skips_an_image_for_both_models(nights):
    summary = nights["runs"][2]["summary"]
    output = nights["outputs"][2]
    theirs = read_parquet_shards(os.path.join(output, "challenger", "predictions"))
    assert summary["skipped_already_scored"] == sum(o == GOOD for o in nights["expected"].values())
    assert summary["predictions"] == theirs.num_rows == summary["challenger"]["predictions"] == 3
    assert sorted(theirs["path"].to_pylist()) == sorted(nights["runs"][2]["predictions"]["path"].to_pylist())
    assert summary["challenger"]["out_of_scope"] is None  # --out-of-scope off: one side has no detector
    assert nights["codes"][2] == 0


def test_three_nights_read_as_one_table_in_pyarrow_pandas_polars_and_duckdb(nights):
    """Night 1 and 2 with a detector and no top-k, night 3 without a detector and with top-k:
    one schema, so every reader takes ``scores/*/predictions/*.parquet`` with no options."""
    import duckdb
    import pandas
    import polars

    scores = nights["scores"]
    counts = [run["predictions"].num_rows for run in nights["runs"]]
    for output, rows in (("predictions", sum(counts)),
                         ("errors", sum(run["errors"].num_rows for run in nights["runs"]))):
        pattern = os.path.join(scores, "*", output, "*.parquet")
        files = sorted(glob.glob(pattern))
        arrow = ds.dataset(files).to_table()
        frames = {"pandas": pandas.read_parquet(files), "polars": polars.read_parquet(pattern),
                  "duckdb": duckdb.sql(f"SELECT * FROM '{pattern}'").arrow().read_all()}
        assert arrow.num_rows == rows and all(len(frame) == rows for frame in frames.values())
        names = set(arrow.column_names)
        assert names <= set(frames["pandas"].columns) and names <= set(frames["polars"].columns)
        assert names <= set(frames["duckdb"].column_names)
    arrow = ds.dataset(sorted(glob.glob(os.path.join(scores, "*", "predictions", "*.parquet")))).to_table()
    assert arrow.schema == prediction_schema(["cat", "dog"])
    assert arrow["top_classes"].null_count == counts[0] + counts[1]  # top-k on night 3 only
    assert arrow["scope_score"].null_count == counts[2]  # the detector off on night 3 only
    mix = duckdb.sql(f"SELECT run_id, predicted_class, count(*) AS images FROM "
                     f"'{os.path.join(scores, '*', 'predictions', '*.parquet')}' GROUP BY ALL").fetchall()
    assert sum(images for _, _, images in mix) == sum(counts)


def test_images_the_challengers_decoding_refuses_are_its_errors_and_the_model_still_scores_them(
        tmp_path, monkeypatch):
    write_kaggle_test_folder(str(tmp_path), 4, seed=2, side_range=(20, 40))
    real = decode.decode_and_resize

    def refuse_one_for_the_challenger(data, size, *args, **kwargs):
        if tuple(size) == (9, 9) and data == open(tmp_path / "2.jpg", "rb").read():
            raise OSError("the challenger's decoder cannot read this one")
        return real(data, size, *args, **kwargs)

    monkeypatch.setattr(decode, "decode_and_resize", refuse_one_for_the_challenger)
    images = [ListedImage(str(tmp_path / f"{i}.jpg")) for i in range(1, 5)]
    with TestPipeline() as p:
        out = (p | beam.Create([PathBatch(images)])
               | DecodeImages((8, 8), "bilinear", 10**6, 10**6, "r", ThreadBudget(),
                              challenger=DecodeSpec((9, 9), "bilinear", decode.PREPROCESSING_VERSION)))
        assert_that(out[DECODED] | beam.Map(lambda batch: (len(batch), batch.pixels.shape[1:3],
                                                           len(batch.for_challenger()),
                                                           batch.for_challenger().pixels.shape[1:3])),
                    equal_to([(4, (8, 8), 3, (9, 9))]))
        assert_that(out[CHALLENGER_ERRORS] | beam.FlatMap(lambda table: table.select(
            ["path", "stage", "error_type"]).to_pylist()),
            equal_to([{"path": str(tmp_path / "2.jpg"), "stage": "decode", "error_type": "OSError"}]),
            label="ChallengerErrors")


def test_the_comparison_combines_in_any_split():
    fn = ChallengerComparisonFn(["cat", "dog"], review_size=2, scope=True)
    table = pa.table({"path": ["a", "b", "c", "d"], "predicted_class": ["cat", "dog", "dog", "cat"],
                      "decision": ["cat", "dog", "out_of_scope", "cat"], "confidence": [.9, .6, .7, .8],
                      "prob_cat": [.9, .4, .3, .8], "prob_dog": [.1, .6, .7, .2],
                      "scope_score": [0., 0., 1., 0.],
                      "challenger_decision": ["dog", "dog", "dog", None],
                      "challenger_confidence": [.7, .9, .7, None],
                      "challenger_prob_cat": [.3, .1, .3, None], "challenger_prob_dog": [.7, .9, .7, None],
                      "challenger_scope_score": [0., 0., 0., None]})
    whole = fn.extract_output(fn.add_input(fn.create_accumulator(), table))
    parts = [fn.add_input(fn.create_accumulator(), table.slice(i, 1)) for i in range(4)]
    split = fn.extract_output(fn.merge_accumulators(parts))
    assert split == whole
    assert (whole["rows"], whole["compared"], whole["agreeing"]) == (4, 3, 1)
    assert sorted(map(tuple, whole["flips"])) == [("cat", "dog", 1), ("out_of_scope", "dog", 1)]
    assert whole["difference_max"] == pytest.approx([0.6, 0.6]) and whole["difference_sum"] == pytest.approx(
        [0.9, 0.9])
    assert whole["scope"] == {"both": 0, "model_only": 1, "challenger_only": 0}
    assert [row["path"] for row in whole["flipped"]] == ["a", "c"]  # the largest difference first


@pytest.fixture(scope="module")
def three_class_pair(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("three")
    return {"model": export_three_class_model(str(root / "a"), 1, "three-a"),
            "challenger": export_three_class_model(str(root / "b"), 2, "three-b"), "root": root}


def test_a_three_class_pair_with_top_k(three_class_pair):
    root = three_class_pair["root"]
    write_kaggle_test_folder(str(root / "images"), 12, seed=4, side_range=(30, 50))
    output = str(root / "run")
    assert run_cli("--input", str(root / "images" / "*"), "--model-dir", three_class_pair["model"],
                   "--output", output, "--challenger-model", three_class_pair["challenger"],
                   "--top-k", "2") == 0
    run = read_run(output)
    theirs = read_parquet_shards(os.path.join(output, "challenger", "predictions"))
    assert theirs.schema == run["predictions"].schema == prediction_schema(["cat", "dog", "fox"])
    for table in (run["predictions"], theirs):
        assert all(len(row) == 2 for row in table["top_classes"].to_pylist())
    ours, theirs = rows_by_path(run["predictions"]), rows_by_path(theirs)
    block = run["summary"]["challenger"]
    assert set(block["probability_difference"]) == {"cat", "dog", "fox"}
    assert block["flipped"] == sum(ours[p]["decision"] != theirs[p]["decision"] for p in ours)
    assert block["probability_difference"]["fox"]["max"] == pytest.approx(
        max(abs(ours[p]["prob_fox"] - theirs[p]["prob_fox"]) for p in ours), abs=1e-6)
    assert run["csv"][0] == ["id", "cat", "dog", "fox"]


def test_a_challenger_of_other_classes_is_refused_in_one_line(trained, three_class_pair, tmp_path, capsys):
    write_kaggle_test_folder(str(tmp_path), 1)
    output = str(tmp_path / "out")
    code = score.main(["--input", str(tmp_path / "*.jpg"), "--model-dir", trained["model_dir"],
                       "--output", output, "--challenger-model", three_class_pair["model"]])
    stderr = capsys.readouterr().err.strip()
    assert code == 1 and len(stderr.splitlines()) == 1, stderr
    assert "has classes ['cat', 'dog', 'fox'], the model ['cat', 'dog']" in stderr
    assert not os.path.exists(output)


def test_fail_on_disagreement_needs_a_challenger(trained, tmp_path, capsys):
    (tmp_path / "1.jpg").write_bytes(b"")
    assert score.main(["--input", str(tmp_path / "*.jpg"), "--model-dir", trained["model_dir"],
                       "--output", str(tmp_path / "out"), "--fail-on-disagreement", "0.1"]) == 1
    assert "give --challenger-model DIR too" in capsys.readouterr().err
