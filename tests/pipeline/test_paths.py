"""The one text form petscore records a path in, and the path it names again."""

import os

import pyarrow as pa
import pytest

from pipeline.paths import normalised_entry, recorded_path, recorded_prefixes, storage_path
from pipeline.report import spreadsheet_safe

NAMES = [b"1.jpg", "café.jpg".encode(), b"caf\xe9.jpg", b"\xff\xfe.jpg", b"new\nline.jpg",
         b"carriage\rreturn.jpg", b"back\\slash.jpg", b"100%25 \xe9 #?.jpg", b"[1] a*b.jpg",
         "line\u2028sep.jpg".encode()]


@pytest.mark.parametrize("name", NAMES, ids=repr)
def test_every_name_has_a_text_form_that_finds_the_file_again(tmp_path, name):
    path = os.path.join(os.fsencode(tmp_path), name)
    with open(path, "wb") as handle:
        handle.write(name)
    recorded = recorded_path(os.fsdecode(path))
    recorded.encode("utf-8")  # what Parquet, CSV, JSON and HTML hold
    with open(storage_path(recorded), "rb") as handle:
        assert handle.read() == name
    assert normalised_entry(recorded) == recorded  # a manifest listing it names the same row
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        assert recorded.startswith("file:///") and recorded.isascii()
    else:
        assert recorded == os.fsdecode(path)  # UTF-8 names as they are, line ends and all


def test_the_uri_form_percent_encodes_each_byte_outside_the_unreserved_set(monkeypatch):
    assert recorded_path("/in/caf\udce9 100%.jpg") == "file:///in/caf%E9%20100%25.jpg"
    monkeypatch.chdir("/tmp")
    assert recorded_path("in/caf\udce9.jpg") == "file:///tmp/in/caf%E9.jpg"  # absolute, as RFC 8089
    # the one plain path that could be read as a URI is recorded as one
    assert recorded_path("file://x.jpg") == "file:///tmp/file%3A//x.jpg"
    assert recorded_prefixes("in/") == ["in/", "file:///tmp/in/"]
    assert recorded_prefixes("gs://b/in/") == ["gs://b/in/"]


def test_a_manifest_may_name_a_file_by_either_form():
    assert normalised_entry("file:///in/caf%C3%A9.jpg") == "/in/café.jpg"  # UTF-8: the plain path
    assert normalised_entry("file://localhost/in/a%0Ab.jpg") == "/in/a\nb.jpg"
    assert normalised_entry("file:///in/caf%e9.jpg") == "file:///in/caf%E9.jpg"
    assert storage_path("file:///in/caf%E9.jpg") == "/in/caf\udce9.jpg"
    assert normalised_entry("gs://b/a.jpg") == "gs://b/a.jpg"
    with pytest.raises(ValueError, match="is a file:// URI of host 'nas'"):
        storage_path("file://nas/in/a.jpg")


def test_text_cells_a_spreadsheet_would_run_are_neutralised_and_nothing_else_changes():
    cells = ["=HYPERLINK(\"http://x\",\"y\")", "+1", "-2", "@SUM(1)", "\tx", "\rx", "a=b", "'q", "",
             None]
    table = spreadsheet_safe(pa.table({"path": cells, "confidence": [-0.5] * len(cells)}))
    assert table["path"].to_pylist() == ["'=HYPERLINK(\"http://x\",\"y\")", "'+1", "'-2", "'@SUM(1)",
                                         "'\tx", "'\rx", "a=b", "'q", "", None]
    assert table["confidence"].to_pylist() == [-0.5] * len(cells)
