"""Stage-level tests on TestPipeline with assert_that."""

import dataclasses
import hashlib
import json
import os
import re

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.decode import ERRORS, SKIPPED, DecodeImages
from pipeline.incremental import SkipScored, earlier_scored_files
from pipeline.inference import ExportedModelHandler, ScoreImages, ToPredictionRowFn
from pipeline.read import (
    DUPLICATES,
    EmptyInputError,
    ManifestEncodingError,
    ReadImagePaths,
    check_input_exists,
    count_inputs,
    read_manifest,
)
from pipeline.rows import ImageSource, ListedImage, image_id, top_classes
from pipeline.write import BINARY, MULTICLASS, WriteKaggleCsv, csv_header, csv_lines, csv_part_of
from serving.metadata import ModelContractError, read_metadata
from tests.corpus import GOOD


def test_glob_lists_every_file_once(corpus):
    root, expected = corpus
    with TestPipeline() as p:
        out = p | ReadImagePaths(os.path.join(root, "*"), None, "run")
        assert_that(out["paths"], equal_to([
            ListedImage(os.path.join(root, n), os.path.getsize(os.path.join(root, n)),
                        os.path.getmtime(os.path.join(root, n))) for n in expected]))
        assert_that(out[DUPLICATES], equal_to([]), label="NoDuplicates")


def test_manifest_paths_are_scored_once_and_extra_listings_become_error_rows(tmp_path):
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("# nightly list\n/a/1.jpg\n\n/a/2.jpg\n/a/1.jpg\n  /a/1.jpg  \n")
    with TestPipeline() as p:
        out = p | ReadImagePaths(None, str(manifest), "run-7")
        assert_that(out["paths"], equal_to([ListedImage("/a/1.jpg"), ListedImage("/a/2.jpg")]))
        assert_that(out[DUPLICATES] | beam.Map(lambda r: (r["path"], r["error_type"], r["run_id"],
                                                          r["message"])),
                    equal_to([("/a/1.jpg", "DuplicatePath", "run-7",
                               "listed 3 times in the manifest; scored once")] * 2),
                    label="Duplicates")


# What editors and spreadsheets write for the same three lines: a UTF-8 byte-order mark (Notepad,
# Excel's "CSV UTF-8"), CRLF line ends, spaces and tabs around a path, a trailing blank line.
EDITOR_MANIFESTS = {
    "bom": "\ufeff/a/é 1.jpg\n/a/2.jpg\n/a/1.jpg\n",
    "bom-crlf": "\ufeff/a/é 1.jpg\r\n/a/2.jpg\r\n/a/1.jpg\r\n\r\n",
    "spaces-tabs-crlf": "  /a/é 1.jpg\t\r\n# comment\r\n\t/a/2.jpg \r\n/a/1.jpg",
}


@pytest.mark.parametrize("kind", sorted(EDITOR_MANIFESTS))
def test_a_manifest_saved_by_an_editor_lists_its_paths_and_nothing_else(tmp_path, kind):
    manifest = tmp_path / "manifest.txt"
    manifest.write_bytes(EDITOR_MANIFESTS[kind].encode("utf-8"))
    listed = ["/a/é 1.jpg", "/a/2.jpg", "/a/1.jpg"]
    assert read_manifest(str(manifest)) == listed
    assert count_inputs(None, str(manifest)) == 3
    check_input_exists(None, str(manifest))
    with TestPipeline() as p:  # the pipeline's own reading agrees with the count
        out = p | ReadImagePaths(None, str(manifest), "run")
        assert_that(out["paths"], equal_to([ListedImage(path) for path in listed]))
        assert_that(out[DUPLICATES], equal_to([]), label="NoDuplicates")


@pytest.mark.parametrize("encoding, message", [
    ("utf-16", "is UTF-16 text (Notepad's \"Unicode\"): save it as UTF-8"),  # BOM FF FE
    ("utf-16-be", "is UTF-16 text"),  # a BOM written by hand: FE FF
    ("cp1252", "line 2 is not UTF-8 (byte 0xe9, a legacy code page such as Windows-1252?): "
               "save it as UTF-8"),
])
def test_a_manifest_that_is_not_utf8_is_refused_with_how_to_save_it(tmp_path, encoding, message):
    manifest = tmp_path / "manifest.txt"
    text = "/a/1.jpg\r\n/a/caf\u00e9.jpg\r\n"
    manifest.write_bytes(("\ufeff" if encoding == "utf-16-be" else "").encode(encoding)
                         + text.encode(encoding))
    with pytest.raises(ManifestEncodingError, match=re.escape(f"manifest {manifest} {message}")):
        check_input_exists(None, str(manifest))


def test_empty_inputs_are_refused_before_any_work(tmp_path):
    with pytest.raises(EmptyInputError, match="matches no file"):
        check_input_exists(str(tmp_path / "*.jpg"), None)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(EmptyInputError, match="lists no path"):
        check_input_exists(None, str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="exactly one of --input"):
        check_input_exists(str(tmp_path / "*"), str(tmp_path / "empty.txt"))


def test_decode_sends_good_files_on_and_bad_files_to_error_rows(corpus):
    root, expected = corpus
    paths = [os.path.join(root, name) for name in expected] + [os.path.join(root, "missing.jpg")]
    with TestPipeline() as p:
        out = (p | beam.Create([ListedImage(path, None, 1.5) for path in paths])
               | DecodeImages((16, 24), "bilinear", 1_000_000, 1 << 20, "run"))
        assert_that(out["images"] | beam.Map(lambda kv: (*kv[0], kv[1].shape, str(kv[1].dtype))),
                    equal_to([(os.path.join(root, n), sha256_of(os.path.join(root, n)),
                               os.path.getsize(os.path.join(root, n)), 1.5, (16, 24, 3), "uint8")
                              for n, outcome in expected.items() if outcome == GOOD]))
        assert_that(out[ERRORS] | beam.Map(lambda r: (r["path"], r["stage"], r["error_type"])),
                    equal_to([(os.path.join(root, n), *outcome)
                              for n, outcome in expected.items() if outcome != GOOD]
                             + [(os.path.join(root, "missing.jpg"), "read", "FileNotFoundError")]),
                    label="Errors")


def sha256_of(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def test_files_already_scored_with_the_same_bytes_are_skipped_not_decoded(corpus, tmp_path):
    root, _ = corpus
    same, changed, new = (os.path.join(root, f"{i}.jpg") for i in (1, 2, 3))
    images = [ListedImage(same, scored_sha256=("0" * 64, sha256_of(same))),
              ListedImage(changed, scored_sha256=("0" * 64,)), ListedImage(new)]
    with TestPipeline() as p:
        out = p | beam.Create(images) | DecodeImages((8, 8), "bilinear", 10**6, 10**6, "run")
        assert_that(out[SKIPPED], equal_to([same]), label="Skipped")
        assert_that(out["images"] | beam.Map(lambda kv: kv[0].path), equal_to([changed, new]))


def write_scored(path: str, rows: list[tuple[str, str, int | None, float | None]], legacy=False):
    """A predictions-like Parquet file (``legacy``: without the listing columns, as written
    before they existed)."""
    columns = {"path": [r[0] for r in rows], "content_sha256": [r[1] for r in rows],
               "file_bytes": [r[2] for r in rows], "file_updated_seconds": [r[3] for r in rows]}
    if legacy:
        del columns["file_bytes"], columns["file_updated_seconds"]
    pq.write_table(pa.table(columns), path)


@pytest.mark.parametrize("known_paths_limit", [100, 2], ids=["few-paths-known", "many-paths"])
def test_skip_scored_trusts_an_unchanged_listing_and_otherwise_reads_the_bytes(tmp_path,
                                                                              known_paths_limit):
    history = str(tmp_path / "scored.parquet")
    write_scored(history, [
        ("/night/listed-same.jpg", "a" * 64, 100, 1700000000.25),  # same size and update time
        ("/night/touched.jpg", "b" * 64, 100, 1600000000.0),  # same size, updated since
        ("/night/touched.jpg", "c" * 64, 120, 1500000000.0),  # an older version of it
        ("/elsewhere/listed-same.jpg", "d" * 64, 100, 1700000000.25),  # not under tonight's prefix
        ("/night/gone.jpg", "e" * 64, 1, 1.0),  # scored before, not listed tonight
    ])
    legacy = str(tmp_path / "legacy.parquet")
    write_scored(legacy, [("/night/manifest-entry.jpg", "f" * 64, None, None)], legacy=True)
    listed = [ListedImage("/night/listed-same.jpg", 100, 1700000000.25),
              ListedImage("/night/touched.jpg", 100, 1700000000.0),
              ListedImage("/night/manifest-entry.jpg"),
              ListedImage("/night/new.jpg", 5, 1.0)]
    with TestPipeline() as p:
        out = p | beam.Create(listed) | SkipScored([history, legacy], "/night/", known_paths_limit)
        # skipped on the listing alone: the file does not even exist, so it was never read
        assert_that(out[SKIPPED], equal_to(["/night/listed-same.jpg"]), label="Skipped")
        assert_that(out["images"], equal_to([
            ListedImage("/night/touched.jpg", 100, 1700000000.0, ("b" * 64, "c" * 64)),
            ListedImage("/night/manifest-entry.jpg", None, None, ("f" * 64,)),
            ListedImage("/night/new.jpg", 5, 1.0)]))


def test_skip_scored_reads_only_committed_runs_of_this_model_that_can_hold_tonights_paths(tmp_path):
    def run(name, model_version, paths_prefix, files=("predictions/p-0.parquet",)):
        folder = tmp_path / "scores" / name
        (folder / "predictions").mkdir(parents=True)
        record = {"model_version": model_version, "paths_prefix": paths_prefix,
                  "files": [{"path": f, "bytes": 1} for f in files] + [
                      {"path": "submission.csv", "bytes": 1}]}
        if paths_prefix is None:  # a record from before records listed files and prefixes
            record = {"model_version": model_version}
            (folder / "predictions" / "predictions-00000-of-00001.parquet").write_bytes(b"")
        (folder / "summary.json").write_text(json.dumps(record))
        return str(folder)

    same_folder = run("dt=1", "v1", "/in/all/")
    run("dt=2", "v1", "/in/dt=2/")  # another night's folder: cannot hold tonight's paths
    run("dt=3", "v0", "/in/all/")  # another model version
    old = run("dt=4", "v1", None)
    tonight = run("dt=5", "v1", "/in/all/")  # tonight's own prefix, about to be overwritten
    (tmp_path / "scores" / "dt=6" / "predictions").mkdir(parents=True)  # killed: no record
    files = earlier_scored_files(str(tmp_path / "scores" / "dt=*"), "v1", "/in/all/", tonight)
    assert sorted(files) == [os.path.join(same_folder, "predictions", "p-0.parquet"),
                             os.path.join(old, "predictions", "predictions-00000-of-00001.parquet")]
    assert earlier_scored_files(str(tmp_path / "scores" / "dt=*"), "v1", "/in/dt=9/", tonight) == [
        os.path.join(old, "predictions", "predictions-00000-of-00001.parquet")]
    with pytest.raises(ValueError, match="drop the '/predictions/\\*.parquet'"):
        earlier_scored_files("gs://b/scores/dt=*/predictions/*.parquet", "v1", "", tonight)


def test_files_over_the_byte_cap_are_error_rows(corpus):
    root, _ = corpus
    path = os.path.join(root, "1.jpg")
    with TestPipeline() as p:
        out = p | beam.Create([ListedImage(path)]) | DecodeImages((8, 8), "bilinear", 1_000_000, 100, "run")
        assert_that(out[ERRORS] | beam.Map(lambda r: (r["error_type"], r["message"])),
                    equal_to([("FileTooLargeError", "file is larger than the 100-byte cap")]))


def test_transient_storage_errors_fail_the_bundle_instead_of_becoming_error_rows(corpus, monkeypatch):
    root, _ = corpus

    def unavailable(*args, **kwargs):
        raise ConnectionResetError("storage briefly unavailable")

    monkeypatch.setattr(FileSystems, "open", unavailable)
    with pytest.raises(Exception, match="storage briefly unavailable"):
        with TestPipeline() as p:
            (p | beam.Create([ListedImage(os.path.join(root, "1.jpg"))])
             | DecodeImages((8, 8), "bilinear", 10**6, 10**6, "run"))


def test_prediction_rows_carry_probabilities_and_the_uncertain_decision(trained):
    metadata = read_metadata(trained["model_dir"])
    fn = ToPredictionRowFn(metadata, min_confidence=0.7, run_id="run-1")
    sure, = fn.process((ImageSource("/x/12.jpg", "ab" * 32, 2048, 1.5),
                        PredictionResult(None, np.array([0.2, 0.8]))))
    unsure, = fn.process((ImageSource("/x/cat.jpg", "cd" * 32, 10, None),
                          PredictionResult(None, np.array([0.65, 0.35]))))
    assert (sure["image_id"], sure["predicted_class"], sure["decision"]) == (12, "dog", "dog")
    assert (sure["prob_cat"], sure["prob_dog"], sure["confidence"]) == (0.2, 0.8, 0.8)
    assert (unsure["image_id"], unsure["predicted_class"], unsure["decision"]) == (None, "cat", "uncertain")
    assert sure["model_version"] == "tiny-test-1" and sure["model_sha256"] == metadata.sha256
    assert (sure["content_sha256"], sure["file_bytes"], sure["file_updated_seconds"]) == (
        "ab" * 32, 2048, 1.5)


def test_score_images_batches_through_run_inference_and_matches_direct_prediction(trained):
    from serving.reference import reference_batch
    from serving.runtimes import ServingModel

    metadata = read_metadata(trained["model_dir"])
    images = reference_batch(metadata.height, metadata.width, seeds=range(10))
    want = ServingModel(trained["model_dir"], metadata).predict(images)[:, 1]
    with TestPipeline() as p:
        rows = (p | beam.Create([(ImageSource(f"/img/{i}.jpg", str(i), 1, None), images[i])
                                 for i in range(10)])
                | ScoreImages(trained["model_dir"], metadata, min_batch_size=3, max_batch_size=4,
                              min_confidence=0.0, run_id="r"))
        assert_that(rows | beam.Map(lambda r: (r["image_id"], round(r["prob_dog"], 5))),
                    equal_to([(i, round(float(want[i]), 5)) for i in range(10)]))


@pytest.mark.parametrize("runtime", ["saved_model", "tflite"])
def test_a_worker_refuses_a_model_its_libraries_do_not_reproduce(trained, runtime):
    """The driver checks the runtime it would pick; each worker checks the one it picks."""
    metadata = read_metadata(trained["model_dir"])
    refs = [dict(ref, probabilities=[0.99, 0.01]) for ref in metadata.reference_predictions]
    handler = ExportedModelHandler(trained["model_dir"], dataclasses.replace(
        metadata, reference_predictions=refs), min_batch_size=1, max_batch_size=2, runtime=runtime)
    with pytest.raises(ModelContractError, match=f"{runtime}: reference predictions differ"):
        handler.load_model()
    good = ExportedModelHandler(trained["model_dir"], metadata, min_batch_size=1, max_batch_size=2,
                                runtime=runtime)
    assert good.load_model().runtime == runtime


def test_litert_runs_each_batch_in_invokes_of_a_fixed_size_planned_once(trained, monkeypatch):
    from ai_edge_litert import interpreter as litert

    from serving.reference import reference_batch

    seen = {"threads": [], "batches": [], "invokes": 0}
    original_init = litert.Interpreter.__init__
    original_resize, original_invoke = litert.Interpreter.resize_tensor_input, litert.Interpreter.invoke

    def init(self, *args, **kwargs):
        seen["threads"].append(kwargs.get("num_threads"))
        original_init(self, *args, **kwargs)

    def resize(self, index, shape, *args, **kwargs):
        seen["batches"].append(int(shape[0]))
        return original_resize(self, index, shape, *args, **kwargs)

    def invoke(self):
        seen["invokes"] += 1
        return original_invoke(self)

    monkeypatch.setattr(litert.Interpreter, "__init__", init)
    monkeypatch.setattr(litert.Interpreter, "resize_tensor_input", resize)
    monkeypatch.setattr(litert.Interpreter, "invoke", invoke)
    metadata = read_metadata(trained["model_dir"])
    model = ExportedModelHandler(trained["model_dir"], metadata, min_batch_size=1, max_batch_size=16,
                                 runtime="tflite", tflite_threads=1, tflite_invoke_batch=2).load_model()
    assert seen["threads"] == [1]
    images = reference_batch(metadata.height, metadata.width, seeds=range(5))
    one_by_one = np.concatenate([model.predict(images[i:i + 1]) for i in range(5)])
    seen["invokes"] = 0
    together = model.predict(images)
    assert seen["invokes"] == 3  # 2 + 2 + 1 (padded)
    np.testing.assert_allclose(together, one_by_one, atol=1e-6)
    assert seen["batches"] == [2]  # planned once, at load: batches of 5 and 1 reuse that memory


def test_kaggle_csv_is_sorted_by_id_and_optionally_clipped():
    rows = [(10, [0.5]), (2, [0.9999]), (1, [0.00001])]
    assert csv_header(BINARY, ["cat", "dog"]) == b"id,label\n"
    assert csv_lines(rows, BINARY, 0.0).decode() == "1,0.000010\n2,0.999900\n10,0.500000\n"
    assert csv_lines(rows, BINARY, 0.005).decode() == "1,0.005000\n2,0.995000\n10,0.500000\n"


def test_image_id_is_the_integer_stem():
    assert image_id("gs://b/test/123.jpg") == 123
    assert image_id("/data/cat.1.jpg") is None
    assert image_id("/data/12a.png") is None


def test_multiclass_csv_has_every_class_ids_as_they_are_sorted_and_clipped():
    rows = [("ff01", [0.5, 0.25, 0.25]), ("0a9c", [1.0, 0.0, 0.0])]
    text = (csv_header(MULTICLASS, ["affenpinscher", "beagle", "collie, rough"])
            + csv_lines(rows, MULTICLASS, 0.0)).decode()
    assert text == ('id,affenpinscher,beagle,"collie, rough"\n0a9c,1,0,0\nff01,0.5,0.25,0.25\n')
    assert csv_lines(rows[1:], MULTICLASS, 0.01).decode() == "0a9c,0.99,0.01,0.01\n"


def test_top_classes_are_the_most_probable_first():
    assert top_classes([0.1, 0.6, 0.3], ["a", "b", "c"], 2) == {
        "top_classes": ["b", "c"], "top_probabilities": [0.6, 0.3]}


@pytest.mark.parametrize("csv_format", [BINARY, MULTICLASS])
def test_the_csv_is_sorted_in_parts_no_worker_holding_the_run(tmp_path, csv_format):
    rng = np.random.default_rng(3)
    ids = rng.permutation(5000)[:1200]
    rows = [{"path": f"/n/{i}.jpg", "image_id": int(i), "prob_cat": 1 - p, "prob_dog": p}
            for i, p in zip(ids, rng.random(len(ids)), strict=True)]
    path, parts = str(tmp_path / "submission.csv"), str(tmp_path / "csv-parts")
    pipeline = TestPipeline()
    out = pipeline | beam.Create(rows) | WriteKaggleCsv(path, parts, ["cat", "dog"], csv_format,
                                                         "dog", 0.0, rows_per_part=100)
    assert_that(out["rows"], equal_to([1200]), label="Rows")
    result = pipeline.run()
    result.wait_until_finish()
    keyed = ([(int(i), [r["prob_dog"]]) for i, r in zip(ids, rows, strict=True)]
             if csv_format == BINARY else
             [(str(i), [r["prob_cat"], r["prob_dog"]]) for i, r in zip(ids, rows, strict=True)])
    with open(path, "rb") as handle:
        assert handle.read() == csv_header(csv_format, ["cat", "dog"]) + csv_lines(keyed, csv_format, 0.0)
    assert not os.path.exists(parts)
    part_rows = result.metrics().query(MetricsFilter().with_name("csv_part_rows"))["distributions"]
    sizes = part_rows[0].committed
    assert sizes.count == 12 and sizes.sum == 1200 and sizes.max <= 200  # ~100 rows a part


def test_a_kaggle_sized_csv_is_one_part():
    assert csv_part_of(7, list(range(0, 12500, 48)), 12_500, 1_000_000) == 0
    quantiles = list(range(0, 257))
    assert [csv_part_of(k, quantiles, 2_000_000, 1_000_000) for k in (0, 127, 128, 256)] == [0, 0, 1, 1]
