"""Stage-level tests on TestPipeline with assert_that."""

import dataclasses
import hashlib
import json
import os
import re
import threading

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow

from pipeline import decode as decode_module
from pipeline import read
from pipeline.decode import ERRORS, DecodeImages, FileTooLargeError, ImageBatch, read_local_file
from pipeline.incremental import SkipScored, earlier_scored_files
from pipeline.inference import (
    ExportedModelHandler,
    RowSettings,
    ScoredBatch,
    ScoreImages,
    ToPredictionTableFn,
    not_confident,
    prediction_table,
)
from pipeline.options import ThreadBudget
from pipeline.read import (
    INPUT_COUNT,
    SKIPPED,
    UNSCORED,
    EmptyInputError,
    ManifestEncodingError,
    ReadImagePaths,
    check_input_exists,
    read_manifest,
)
from pipeline.rows import (
    ALREADY_SCORED,
    ListedImage,
    PathBatch,
    SkippedInputs,
    image_id,
    prediction_schema,
    top_k_columns,
)
from pipeline.write import (
    BINARY,
    MULTICLASS,
    WriteKaggleCsv,
    WriteParquetTables,
    csv_header,
    csv_lines,
    csv_part_boundaries,
)
from serving.metadata import ModelContractError, read_metadata
from tests.corpus import GOOD, many_scan_jpeg


def rows_of(tables):
    """Error or prediction tables -> their rows, as dicts."""
    return tables | beam.FlatMap(lambda table: table.to_pylist())


def test_glob_lists_every_file_once_in_batches(corpus):
    root, expected = corpus
    with TestPipeline() as p:
        out = p | ReadImagePaths(os.path.join(root, "*"), None, "run", batch_size=3)
        assert_that(out["paths"] | beam.FlatMap(lambda batch: batch.images), equal_to([
            ListedImage(os.path.join(root, n), os.path.getsize(os.path.join(root, n)),
                        os.path.getmtime(os.path.join(root, n))) for n in expected]))
        assert_that(out["paths"] | beam.Map(len), equal_to(
            [3] * (len(expected) // 3) + ([len(expected) % 3] if len(expected) % 3 else [])),
            label="BatchSizes")
        assert_that(out[UNSCORED], equal_to([]), label="NoDuplicates")
        assert_that(out[INPUT_COUNT], equal_to([len(expected)]), label="InputCount")


@pytest.mark.parametrize("csv_format, names, colliding", [
    (BINARY, ["7.png", "007.jpg", "8.jpg", "cat.7.jpg", "sub/9.jpg", "9.gif"],
     ["7.png", "007.jpg", "sub/9.jpg", "9.gif"]),
    (MULTICLASS, ["a.jpg", "a.png", "b.jpg", "sub/b.jpg", "007.jpg", "7.jpg"],
     ["a.jpg", "a.png", "b.jpg", "sub/b.jpg"]),
], ids=["kaggle-ids", "file-stems"])
def test_files_that_would_share_a_csv_id_become_error_rows_naming_each_other(
        tmp_path, csv_format, names, colliding):
    """Kaggle rejects a submission that holds an id twice, and no one can say which file it meant."""
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    with TestPipeline() as p:
        out = p | ReadImagePaths(str(tmp_path / "**"), None, "run", csv_format=csv_format)
        assert_that(out["paths"] | beam.FlatMap(lambda batch: [image.path for image in batch.images]),
                    equal_to([str(tmp_path / n) for n in names if n not in colliding]))
        errors = rows_of(out[UNSCORED]) | beam.Map(lambda r: (r["path"], r["error_type"],
                                                                r["message"].split(" is also")[0]))
        assert_that(errors, equal_to([(str(tmp_path / n), "DuplicateCsvId",
                                       f"submission.csv id {read.csv_key(n, csv_format)!r}")
                                      for n in colliding]), label="Errors")
        assert_that(out[INPUT_COUNT], equal_to([len(names)]), label="InputCount")
    messages = read.colliding_csv_ids([str(tmp_path / n) for n in names], csv_format)
    message = messages[str(tmp_path / colliding[0])]
    assert f"is also the id of {tmp_path / colliding[1]}" in message and "rename or remove" in message


def test_manifest_paths_are_scored_once_and_extra_listings_become_error_rows(tmp_path):
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("# nightly list\n/a/1.jpg\n\n/a/2.jpg\n/a/1.jpg\n  /a/1.jpg  \n")
    with TestPipeline() as p:
        out = p | ReadImagePaths(None, str(manifest), "run-7")
        assert_that(out["paths"], equal_to([PathBatch([ListedImage("/a/1.jpg"), ListedImage("/a/2.jpg")])]))
        assert_that(rows_of(out[UNSCORED]) | beam.Map(lambda r: (r["path"], r["error_type"],
                                                                   r["run_id"], r["message"])),
                    equal_to([("/a/1.jpg", "DuplicatePath", "run-7",
                               "listed 3 times in the manifest; scored once")] * 2),
                    label="Duplicates")
        assert_that(out[INPUT_COUNT], equal_to([4]), label="InputCount")


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
    check_input_exists(None, str(manifest))
    with TestPipeline() as p:
        out = p | ReadImagePaths(None, str(manifest), "run")
        assert_that(out["paths"], equal_to([PathBatch([ListedImage(path) for path in listed])]))
        assert_that(out[UNSCORED], equal_to([]), label="NoDuplicates")
        assert_that(out[INPUT_COUNT], equal_to([3]), label="InputCount")


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


def test_paths_no_filesystem_reads_are_refused_before_any_work_saying_what_to_write(tmp_path):
    (tmp_path / "1.jpg").write_bytes(b"")
    manifest = tmp_path / "manifest.txt"
    manifest.write_text(f"{tmp_path}/1.jpg\nfile://{tmp_path}/1.jpg\nhttp://example.com/2.jpg\n")
    with pytest.raises(ValueError, match="'http://example.com/2.jpg': no Beam filesystem reads http://"):
        check_input_exists(None, str(manifest))
    manifest.write_text(f"{tmp_path}/1.jpg\nfile://nas{tmp_path}/1.jpg\n")  # a URI names its host
    with pytest.raises(ValueError, match=re.escape(
            f"'file://nas{tmp_path}/1.jpg' is a file:// URI of host 'nas': petscore reads the files "
            "of the machine it runs on; write file:///path (no host)")):
        check_input_exists(None, str(manifest))
    with pytest.raises(ValueError, match=re.escape(
            f"--input 'file://{tmp_path}/*.jpg': no Beam filesystem reads file:// paths; write the "
            f"local path itself ({tmp_path}/*.jpg)")):
        check_input_exists(f"file://{tmp_path}/*.jpg", None)


def image_rows(batch):
    """An ``ImageBatch`` -> one tuple per image: what its row records, its pixels' shape and dtype."""
    return [(path, sha, int(size), updated, pixels.shape, str(pixels.dtype))
            for path, sha, size, updated, pixels in zip(
                batch.paths, batch.content_sha256, batch.file_bytes, batch.file_updated_seconds,
                batch.pixels, strict=True)]


def decode(size=(8, 8), max_pixels=10**6, max_bytes=10**6, threads=None, **limits):
    return DecodeImages(size, "bilinear", max_pixels, max_bytes, "run", threads or ThreadBudget(), **limits)


def test_a_batch_with_bad_files_among_good_ones_keeps_every_good_image_and_one_error_row_each(corpus):
    root, expected = corpus
    paths = [os.path.join(root, name) for name in expected] + [os.path.join(root, "missing.jpg")]
    good = [os.path.join(root, n) for n, outcome in expected.items() if outcome == GOOD]
    with TestPipeline() as p:
        out = (p | beam.Create([PathBatch([ListedImage(path, None, 1.5) for path in paths])])
               | decode((16, 24), 1_000_000, 1 << 20))
        assert_that(out["images"] | beam.FlatMap(image_rows),
                    equal_to([(path, sha256_of(path), os.path.getsize(path), 1.5, (16, 24, 3), "uint8")
                              for path in good]))
        assert_that(out["images"] | beam.Map(lambda batch: batch.pixels.shape[0]), equal_to([len(good)]),
                    label="OneBatch")
        assert_that(rows_of(out[ERRORS]) | beam.Map(lambda r: (r["path"], r["stage"], r["error_type"])),
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
        out = p | beam.Create([PathBatch(images)]) | decode()
        assert_that(out[SKIPPED], equal_to([SkippedInputs(ALREADY_SCORED, 1)]), label="Skipped")
        assert_that(out["images"] | beam.Map(lambda batch: batch.paths), equal_to([[changed, new]]))


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
        out = (p | beam.Create([PathBatch(listed)])
               | SkipScored([history, legacy], "/night/", 2, known_paths_limit))
        # skipped on the listing alone: the file does not even exist, so it was never read
        assert_that(out[SKIPPED], equal_to([SkippedInputs(ALREADY_SCORED, 1)]), label="Skipped")
        assert_that(out["images"] | beam.Map(len), equal_to([2, 1]), label="BatchedAgain")
        assert_that(out["images"] | beam.FlatMap(lambda batch: batch.images), equal_to([
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
        out = p | beam.Create([PathBatch([ListedImage(path)])]) | decode(max_bytes=100)
        assert_that(rows_of(out[ERRORS]) | beam.Map(lambda r: (r["error_type"], r["message"])),
                    equal_to([("FileTooLargeError", "file is larger than the 100-byte cap")]))


def test_a_local_file_is_read_whole_in_one_read_or_left_to_the_stream_reader(tmp_path):
    """Its bytes exactly; a file over the cap refused from its size; a file that holds more than
    its size says (as /proc's do) left to the chunked reader (None)."""
    path = tmp_path / "a.jpg"
    path.write_bytes(b"\xff\xd8" + bytes(range(256)) * 40)
    assert read_local_file(str(path), 10_242) == path.read_bytes()
    with pytest.raises(FileTooLargeError, match="larger than the 10241-byte cap"):
        read_local_file(str(path), 10_241)
    assert os.stat("/proc/self/status").st_size == 0 and read_local_file("/proc/self/status", 1 << 20) is None


@pytest.mark.parametrize("where", ["local", "object store"])
def test_transient_storage_errors_fail_the_bundle_instead_of_becoming_error_rows(corpus, monkeypatch, where):
    """Local files are read with ``open`` (``read_local_file``), others through Beam's filesystems:
    a transient error from either fails the bundle."""
    root, _ = corpus

    def unavailable(*args, **kwargs):
        raise ConnectionResetError("storage briefly unavailable")

    if where == "local":
        path = os.path.join(root, "1.jpg")
        monkeypatch.setattr(decode_module, "open", unavailable, raising=False)
    else:
        path = "gs://bucket/1.jpg"
        monkeypatch.setattr(FileSystems, "open", unavailable)
    with pytest.raises(Exception, match="storage briefly unavailable"):
        with TestPipeline() as p:
            (p | beam.Create([PathBatch([ListedImage(path)])]) | decode())


def test_a_jpeg_of_too_many_scans_is_an_error_row_and_its_batch_goes_on(corpus, tmp_path):
    root, _ = corpus
    many = str(tmp_path / "many_scans.jpg")
    with open(many, "wb") as handle:
        handle.write(many_scan_jpeg(300))
    good = [os.path.join(root, f"{i}.jpg") for i in (1, 2)]
    with TestPipeline() as p:
        out = (p | beam.Create([PathBatch([ListedImage(good[0]), ListedImage(many), ListedImage(good[1])])])
               | decode())
        assert_that(out["images"] | beam.Map(lambda batch: batch.paths), equal_to([good]))
        assert_that(rows_of(out[ERRORS]) | beam.Map(error_fields), equal_to([(
            many, "decode", "TooManyScansError", "a JPEG of 300 scans exceeds the limit of 100 scans per "
            "image: decoding it would take a pass over the whole image per scan (--max-jpeg-scans raises "
            "the limit)")]), label="Errors")


STUCK_SECONDS = 120


def error_fields(row: dict) -> tuple:
    return row["path"], row["stage"], row["error_type"], row["message"]


def test_a_decode_past_the_time_limit_is_an_error_row_and_the_batches_after_it_get_threads(
        corpus, monkeypatch):
    """One decoder thread, and one image whose decode blocks until the test ends: its row is a
    DecodeTimeoutError, the rest of its batch and the batches after it are decoded (on a fresh
    pool: the stuck thread was the only one), and the pipeline ends while that decode is stuck."""
    from pipeline import decode as decode_module

    root, _ = corpus
    paths = [os.path.join(root, f"{i}.jpg") for i in range(1, 10)]
    with open(paths[1], "rb") as handle:
        stuck = handle.read()
    entered, release, returned = threading.Event(), threading.Event(), threading.Event()
    real_decode = decode_module.decode_and_resize

    def decode_and_resize(data, *args, **kwargs):
        if data == stuck:
            entered.set()
            release.wait(STUCK_SECONDS)
            returned.set()
        return real_decode(data, *args, **kwargs)

    monkeypatch.setattr(decode_module, "decode_and_resize", decode_and_resize)
    try:
        with TestPipeline() as p:
            out = (p | beam.Create([PathBatch([ListedImage(path) for path in paths[i:i + 3]])
                                    for i in (0, 3, 6)])
                   | decode(threads=ThreadBudget(decode_threads=1), max_decode_seconds=0.5))
            assert_that(out["images"] | beam.Map(lambda batch: batch.paths),
                        equal_to([[paths[0], paths[2]], paths[3:6], paths[6:9]]))
            assert_that(rows_of(out[ERRORS]) | beam.Map(error_fields),
                        equal_to([(paths[1], "decode", "DecodeTimeoutError", "decoding ran past the limit "
                                   "of 0.5 s per image and was given up (--max-decode-seconds raises the "
                                   "limit)")]), label="Errors")
        assert entered.is_set() and not returned.is_set()  # the run ended while the decode was stuck
    finally:
        release.set()


def image_batch(paths, sha256=None, sizes=None, updated=None):
    """An ``ImageBatch`` of ``paths`` without pixels (the table step never reads them)."""
    return ImageBatch(list(paths), sha256 or ["0" * 64] * len(paths),
                      np.array(sizes or [1] * len(paths), np.int64), updated or [None] * len(paths), None)


def test_prediction_tables_carry_probabilities_and_the_uncertain_decision(trained):
    metadata = read_metadata(trained["model_dir"])
    fn = ToPredictionTableFn(metadata, min_confidence=0.7, run_id="run-1")
    fn.setup()
    table, = fn.process(ScoredBatch(
        image_batch(["/x/12.jpg", "/x/cat.jpg"], ["ab" * 32, "cd" * 32], [2048, 10], [1.5, None]),
        np.array([[0.2, 0.8], [0.65, 0.35]], np.float32)))
    assert table.schema == prediction_schema(["cat", "dog"])
    sure, unsure = table.to_pylist()
    assert (sure["image_id"], sure["predicted_class"], sure["decision"]) == (12, "dog", "dog")
    assert (sure["prob_cat"], sure["prob_dog"], sure["confidence"]) == (
        float(np.float32(0.2)), float(np.float32(0.8)), float(np.float32(0.8)))
    assert (unsure["image_id"], unsure["predicted_class"], unsure["decision"]) == (None, "cat", "uncertain")
    assert sure["model_version"] == "tiny-test-1" and sure["model_sha256"] == metadata.sha256
    assert (sure["content_sha256"], sure["file_bytes"], sure["file_updated_seconds"]) == (
        "ab" * 32, 2048, 1.5)


def test_a_face_makes_human_only_what_the_model_does_not_confidently_call_a_class(trained):
    """Seed 000's order: the model's classes first, then a human, then neither. A confident
    class keeps its decision whatever its faces (a pet with its owner); an uncertain or
    out-of-scope image with a face is ``human``; the class columns still name the nearest class."""
    metadata = read_metadata(trained["model_dir"])
    settings = RowSettings(metadata, min_confidence=0.7, run_id="r", scope_threshold=0.5, tta="flip",
                           faces="detect")
    paths = ["/x/dog-and-owner.jpg", "/x/unsure-face.jpg", "/x/far-face.jpg", "/x/far.jpg", "/x/unsure.jpg",
             "/x/unchecked.jpg"]
    scored = ScoredBatch(image_batch(paths), np.array(
        [[0.1, 0.9], [0.4, 0.6], [0.05, 0.95], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]], np.float32),
        scope_score=np.array([0.1, 0.2, 0.9, 0.9, 0.1, 0.1], np.float32))
    table, counts = prediction_table(scored, settings, human_faces=np.array([2, 1, 3, 0, 0, -1]))
    rows = table.to_pylist()
    assert [row["decision"] for row in rows] == ["dog", "human", "human", "out_of_scope", "uncertain",
                                                 "uncertain"]
    assert [row["predicted_class"] for row in rows] == ["dog", "dog", "dog", "dog", "cat", "cat"]
    assert [row["human_faces"] for row in rows] == [2, 1, 3, 0, 0, None]  # -1: not looked for
    assert {row["tta"] for row in rows} == {"flip"}
    assert counts == {"scored": 6, "uncertain": 2, "out_of_scope": 1, "human": 2}
    assert not_confident(scored, settings).tolist() == [False, True, True, True, True, True]
    off, = ToPredictionTableFn(metadata, min_confidence=0.7, run_id="r").process(
        ScoredBatch(image_batch(paths[:1]), np.array([[0.4, 0.6]], np.float32)))
    assert off.to_pylist()[0]["human_faces"] is None and off.to_pylist()[0]["tta"] == "none"
    assert off.to_pylist()[0]["decision"] == "uncertain"


@pytest.mark.parametrize("faces", ["detect", "unsure"])
def test_faces_are_looked_for_in_every_image_or_only_where_they_change_the_decision(trained, faces):
    metadata = read_metadata(trained["model_dir"])
    fn = ToPredictionTableFn(metadata, min_confidence=0.7, run_id="r", faces=faces,
                             threads=ThreadBudget(tflite_threads=1))
    fn.setup()
    pixels = np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)  # no face
    scored = ScoredBatch(dataclasses.replace(image_batch(["/a.png", "/b.png", "/c.png"]), pixels=pixels),
                         np.array([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8]], np.float32))
    ours, theirs = fn.human_faces(scored)
    assert theirs is None
    assert ours.tolist() == ([0, 0, 0] if faces == "detect" else [-1, 0, -1])
    table, = fn.process(scored)
    assert table["human_faces"].to_pylist() == ([0, 0, 0] if faces == "detect" else [None, 0, None])


def test_score_images_batches_through_run_inference_and_matches_direct_prediction(trained):
    from serving.reference import reference_batch
    from serving.runtimes import ServingModel

    metadata = read_metadata(trained["model_dir"])
    images = reference_batch(metadata.height, metadata.width, seeds=range(10))
    want = ServingModel(trained["model_dir"], metadata).predict(images)[:, 1]
    batches = [dataclasses.replace(image_batch([f"/img/{i}.jpg" for i in range(start, start + 4)]),
                                   pixels=images[start:start + 4]) for start in (0, 4)]
    with TestPipeline() as p:
        scored = (p | beam.Create(batches)
                  | ScoreImages(trained["model_dir"], metadata, min_confidence=0.0, run_id="r"))
        tables = scored["predictions"]
        assert_that(rows_of(tables) | beam.Map(lambda r: (r["image_id"], round(r["prob_dog"], 5))),
                    equal_to([(i, round(float(want[i]), 5)) for i in range(8)]))
        assert_that(tables | beam.Map(len), equal_to([4, 4]), label="OneTablePerBatch")


@pytest.mark.parametrize("runtime", ["saved_model", "tflite"])
def test_a_worker_refuses_a_model_its_libraries_do_not_reproduce(trained, runtime):
    """The driver checks the runtime it would pick; each worker checks the one it picks."""
    metadata = read_metadata(trained["model_dir"])
    refs = [dict(ref, probabilities=[0.99, 0.01]) for ref in metadata.reference_predictions]
    handler = ExportedModelHandler(trained["model_dir"], dataclasses.replace(
        metadata, reference_predictions=refs), runtime=runtime)
    with pytest.raises(ModelContractError, match=f"{runtime}: reference predictions differ"):
        handler.load_model()
    good = ExportedModelHandler(trained["model_dir"], metadata, runtime=runtime)
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
    model = ExportedModelHandler(trained["model_dir"], metadata, runtime="tflite",
                                 threads=ThreadBudget(tflite_threads=1), tflite_invoke_batch=2).load_model()
    assert seen["threads"] == [1]
    images = reference_batch(metadata.height, metadata.width, seeds=range(5))
    one_by_one = np.concatenate([model.predict(images[i:i + 1]) for i in range(5)])
    seen["invokes"] = 0
    together = model.predict(images)
    assert seen["invokes"] == 3  # 2 + 2 + 1 (padded)
    np.testing.assert_allclose(together, one_by_one, atol=1e-6)
    assert seen["batches"] == [2]  # planned once, at load: batches of 5 and 1 reuse that memory


def test_kaggle_csv_is_sorted_by_id_and_optionally_clipped():
    keys, values = [10, 2, 1], np.array([[0.5], [0.9999], [0.00001]])
    assert csv_header(BINARY, ["cat", "dog"]) == b"id,label\n"
    assert csv_lines(keys, values, BINARY, 0.0).decode() == "1,0.000010\n2,0.999900\n10,0.500000\n"
    assert csv_lines(keys, values, BINARY, 0.005).decode() == "1,0.005000\n2,0.995000\n10,0.500000\n"


def test_image_id_is_the_integer_stem():
    assert image_id("gs://b/test/123.jpg") == 123
    assert image_id("/data/cat.1.jpg") is None
    assert image_id("/data/12a.png") is None
    assert image_id("/data/\u00b2.jpg") is None  # a digit to str.isdigit, no integer to int()
    assert image_id(f"/data/{2**63 - 1}.jpg") == 2**63 - 1
    assert image_id(f"/data/{2**63}.jpg") is None  # beyond the int64 column


def test_multiclass_csv_has_every_class_ids_as_they_are_sorted_and_clipped():
    keys, values = ["ff01", "0a9c"], np.array([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    text = (csv_header(MULTICLASS, ["affenpinscher", "beagle", "collie, rough"])
            + csv_lines(keys, values, MULTICLASS, 0.0)).decode()
    assert text == ('id,affenpinscher,beagle,"collie, rough"\n0a9c,1,0,0\nff01,0.5,0.25,0.25\n')
    assert csv_lines(keys[1:], values[1:], MULTICLASS, 0.01).decode() == "0a9c,0.99,0.01,0.01\n"


def test_top_classes_are_the_most_probable_first_ties_in_class_order():
    names, probabilities = top_k_columns(np.array([[0.1, 0.6, 0.3], [0.4, 0.2, 0.4]]), ["a", "b", "c"], 2)
    assert names.to_pylist() == [["b", "c"], ["a", "c"]]
    assert probabilities.to_pylist() == [[0.6, 0.3], [0.4, 0.4]]


@pytest.mark.parametrize("csv_format", [BINARY, MULTICLASS])
def test_the_csv_is_sorted_in_parts_no_worker_holding_the_run(tmp_path, csv_format):
    rng = np.random.default_rng(3)
    ids = rng.permutation(5000)[:1200]
    rows = [{"path": f"/n/{i}.jpg", "image_id": int(i), "prob_cat": 1 - p, "prob_dog": p}
            for i, p in zip(ids, rng.random(len(ids)), strict=True)]
    tables = [pa.Table.from_pylist(rows[start:start + 64]) for start in range(0, len(rows), 64)]
    path, parts = str(tmp_path / "submission.csv"), str(tmp_path / "csv-parts")
    pipeline = TestPipeline()
    out = pipeline | beam.Create(tables) | WriteKaggleCsv(path, parts, ["cat", "dog"], csv_format,
                                                           "dog", 0.0, rows_per_part=100)
    assert_that(out["rows"], equal_to([1200]), label="Rows")
    result = pipeline.run()
    result.wait_until_finish()
    keys = [int(i) for i in ids] if csv_format == BINARY else [str(i) for i in ids]
    values = np.array([[r["prob_dog"]] if csv_format == BINARY else [r["prob_cat"], r["prob_dog"]]
                       for r in rows])
    with open(path, "rb") as handle:
        assert handle.read() == (csv_header(csv_format, ["cat", "dog"])
                                 + csv_lines(keys, values, csv_format, 0.0))
    assert not os.path.exists(parts)
    part_rows = result.metrics().query(MetricsFilter().with_name("csv_part_rows"))["distributions"]
    sizes = part_rows[0].committed
    assert sizes.count == 12 and sizes.sum == 1200 and sizes.max <= 200  # ~100 rows a part


def test_the_sinks_hand_their_final_paths_on_inside_the_global_window(tmp_path):
    """The paths the record lists leave their sinks at a time inside the global window, not at
    Beam's end of time (its file sinks' own), on which Prism runs the next step without them
    (docs/testing.md, the portable-runner suite)."""
    table = pa.Table.from_pylist([{"path": "/n/1.jpg", "image_id": 1, "prob_cat": 0.3, "prob_dog": 0.7}])
    pipeline = TestPipeline()
    tables = pipeline | beam.Create([table])
    shards = tables | WriteParquetTables(str(tmp_path / "predictions"), "predictions", table.schema)
    csv = tables | WriteKaggleCsv(str(tmp_path / "submission.csv"), str(tmp_path / "csv-parts"),
                                  ["cat", "dog"], BINARY, "dog", 0.0)
    inside = ((shards, csv["csv"]) | beam.Flatten()
              | beam.Map(lambda path, at=beam.DoFn.TimestampParam:
                         (path, at <= GlobalWindow().max_timestamp())))
    shard = str(tmp_path / "predictions" / "part-00000-of-00001.predictions.parquet")
    assert_that(inside, equal_to([(shard, True), (str(tmp_path / "submission.csv"), True)]))
    pipeline.run().wait_until_finish()
    assert pq.read_table(shard).equals(table)


def test_a_kaggle_sized_csv_is_one_part():
    assert csv_part_boundaries(list(range(0, 12500, 48)), 12_500, 1_000_000) == []
    assert csv_part_boundaries(list(range(0, 257)), 2_000_000, 1_000_000) == [128]
