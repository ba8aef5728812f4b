"""Any name a filesystem holds, end to end (issue 30): the real CLI over one folder of odd and
hostile names, three nights (a glob, the next night with --skip-scored, a manifest of recorded
paths), every output read back as its users read it."""

from __future__ import annotations

import csv
import io
import json
import os
import urllib.parse
from html.parser import HTMLParser

import pytest
from PIL import Image

from pipeline import score
from tests.pipeline.outputs import read_parquet_shards

ORDINARY = [b"1.jpg", b"2.jpg", b"3.png"]
ODD = [b"caf\xe9.jpg", b"new\nline.jpg", b"carriage\rreturn.jpg", b"back\\slash.jpg", b"[1].jpg",
       b"a*b.jpg", b"what?.jpg"]
# Formulas to a spreadsheet, markup to a browser. The last is three folders deep: < and
# script><script>alert(1)< are folders, so the path reads </script><script>alert(1)</script>.jpg
HOSTILE = [b"=1+2.jpg", b"+SUM(1).jpg", b"-2+3.jpg", b"@SUM(1).jpg", b"\tTAB.jpg", b"\rCR.jpg",
           b'"><img src=x onerror=alert(1)>.jpg', b"'onmouseover='alert(1)'.jpg", b"<!--<script>.jpg",
           b"javascript:alert(1).jpg", "line\u2028sep\u2029.jpg".encode(),
           b"</script><script>alert(1)</script>.jpg"]
AS_ROOT = os.geteuid() == 0  # chmod 000 hides nothing from root: those entries score there
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def image_bytes(index: int, name: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (index * 37 % 256, 90, 160)).save(
        buffer, format="PNG" if name.endswith(b".png") else "JPEG")
    return buffer.getvalue()


def recorded(night: str, name: bytes) -> str:
    """The documented text form (docs/inputs.md) of a name listed relative to ``night``."""
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        return "file://" + urllib.parse.quote(os.path.join(os.fsencode(night), name), safe="/")


@pytest.fixture(scope="module")
def nights(trained, tmp_path_factory):
    base = tmp_path_factory.mktemp("names")
    night = str(base / "night")
    os.makedirs(os.fsencode(night))
    images = [*ORDINARY, *ODD, *HOSTILE, b"locked/hidden.jpg", b"secret.jpg"]
    for index, name in enumerate(images):
        path = os.path.join(os.fsencode(night), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(image_bytes(index, name))
    link = os.path.join(os.fsencode(night), b"%s")
    os.symlink(b"missing.jpg", link % b"dangling.jpg")
    os.symlink(b"loop.jpg", link % b"loop.jpg")
    os.symlink(b".", link % b"up")
    os.mkfifo(link % b"pipe.jpg")
    os.chmod(os.path.join(night, "secret.jpg"), 0)
    os.chmod(os.path.join(night, "locked"), 0)
    outputs = [str(base / f"out{index}") for index in (1, 2, 3)]
    model = ["--model-dir", trained["model_dir"], "--max-error-rate", "1"]
    cwd = os.getcwd()
    os.chdir(night)  # relative paths: a name starting with = is a path starting with =
    try:
        codes = [score.main(["--input", "**", "--output", outputs[0], "--csv-format", "multiclass",
                             "--run-id", "night-1", *model])]
        with open("4.jpg", "wb") as handle:
            handle.write(image_bytes(99, b"4.jpg"))
        codes.append(score.main(["--input", "**", "--output", outputs[1], "--run-id", "night-2",
                                 "--skip-scored", outputs[0], *model]))
        first = read_parquet_shards(os.path.join(outputs[0], "predictions")).column("path").to_pylist()
        manifest = [next(path for path in first if path.startswith("file://")),  # pasted from a row
                    "file://" + urllib.parse.quote(os.path.join(os.fsencode(night), b"new\nline.jpg")),
                    "1.jpg", "dangling.jpg", "</script><!--<script>alert(1)</script>.jpg",
                    '=HYPERLINK("http://evil.example/","click").jpg']
        (base / "manifest.txt").write_text("\n".join(manifest) + "\n")
        codes.append(score.main(["--manifest", str(base / "manifest.txt"), "--output", outputs[2],
                                 "--run-id", "night-3", "--skip-scored", outputs[0], *model]))
    finally:
        os.chdir(cwd)
        os.chmod(os.path.join(night, "locked"), 0o755)
    scored = [name for name in images if AS_ROOT or name not in (b"locked/hidden.jpg", b"secret.jpg")]
    listing_errors = {"dangling.jpg": "DanglingSymlink", "loop.jpg": "SymlinkLoop", "up": "SymlinkLoop",
                      "pipe.jpg": "NotAFile", **({} if AS_ROOT else {"locked": "UnreadableDirectory",
                                                                      "secret.jpg": "PermissionError"})}
    return {"codes": codes, "outputs": outputs, "night": night, "manifest": manifest,
            "scored": {recorded(night, name) for name in scored}, "listing_errors": listing_errors}


def summary_of(output: str) -> dict:
    with open(os.path.join(output, "summary.json")) as handle:
        return json.load(handle)


def test_every_name_is_one_row_and_every_output_is_written(nights):
    assert nights["codes"] == [0, 0, 0]
    first = nights["outputs"][0]
    predictions = read_parquet_shards(os.path.join(first, "predictions"))
    errors = read_parquet_shards(os.path.join(first, "errors"))
    assert sorted(predictions.column("path").to_pylist()) == sorted(nights["scored"])
    assert {row["path"]: row["error_type"] for row in errors.to_pylist()} == nights["listing_errors"]
    assert set(errors.column("stage").to_pylist()) == {"read"}
    summary = summary_of(first)
    assert (summary["inputs"], summary["predictions"], summary["errors"], summary["accounted"]) == (
        len(nights["scored"]) + len(nights["listing_errors"]), len(nights["scored"]),
        len(nights["listing_errors"]), True)
    assert summary["skipped_by_reason"] == {"already_scored": 0, "folder_placeholder": 0}
    examples = {path for kind in summary["profile"]["error_examples"].values() for path, _ in kind}
    assert examples == set(nights["listing_errors"])


def test_the_csv_files_keep_one_record_per_row_whatever_a_name_holds(nights):
    first = nights["outputs"][0]
    with open(os.path.join(first, "submission.csv"), newline="", encoding="utf-8") as handle:
        submission = list(csv.reader(handle))
    assert submission[0] == ["id", "cat", "dog"]
    stems = [os.path.splitext(os.path.basename(path))[0] for path in nights["scored"]]
    assert [row[0] for row in submission[1:]] == sorted(stems)  # multiclass ids: the stems, exact
    assert {len(row) for row in submission[1:]} == {3}
    assert all(0 <= float(value) <= 1 for row in submission[1:] for value in row[1:])

    with open(os.path.join(first, "review", "review-queue.csv"), newline="", encoding="utf-8") as handle:
        raw = handle.read()
    review = list(csv.DictReader(io.StringIO(raw, newline="")))
    shown = {"'" + path if path.startswith(FORMULA_TRIGGERS) else path for path in nights["scored"]}
    assert {row["path"] for row in review} == shown  # formulas neutralised, nothing else changed
    assert all('"' + path.replace('"', '""') + '",' in raw for path in shown)  # each text quoted
    assert not [cell for row in review for cell in row.values() if cell.startswith(FORMULA_TRIGGERS)]
    assert all(0 <= float(row["confidence"]) <= 1 and row["label"] == "" for row in review)
    review_parquet = read_parquet_shards(os.path.join(first, "review"))
    assert set(review_parquet.column("path").to_pylist()) == nights["scored"]  # exact for programs


def test_the_next_night_finds_every_file_again_and_skips_it(nights):
    second = nights["outputs"][1]
    summary = summary_of(second)
    assert (summary["skipped_already_scored"], summary["predictions"], summary["accounted"]) == (
        len(nights["scored"]), 1, True)
    assert summary["skipped_by_reason"] == {"already_scored": len(nights["scored"]), "folder_placeholder": 0}
    assert read_parquet_shards(os.path.join(second, "predictions")).column("path").to_pylist() == ["4.jpg"]
    with open(os.path.join(second, "submission.csv"), newline="") as handle:
        assert [row[0] for row in csv.reader(handle)] == ["id", "4"]


def test_a_manifest_names_files_by_their_recorded_form(nights):
    third = nights["outputs"][2]
    summary = summary_of(third)
    # The file that is not UTF-8 (its row's path pasted) and 1.jpg are night 1's paths: skipped.
    # A file:// URI names an absolute path: the name with a line end scores under that path
    # (night 1 listed it relative to its working directory), a line of its own.
    assert (summary["inputs"], summary["skipped_already_scored"], summary["predictions"],
            summary["errors"], summary["accounted"]) == (6, 2, 1, 3, True)
    predictions = read_parquet_shards(os.path.join(third, "predictions"))
    assert predictions.column("path").to_pylist() == [os.path.join(nights["night"], "new\nline.jpg")]
    errors = read_parquet_shards(os.path.join(third, "errors"))
    assert sorted(errors.column("path").to_pylist()) == sorted(nights["manifest"][3:])
    assert set(errors.column("error_type").to_pylist()) == {"FileNotFoundError"}


ALLOWED_MARKUP = {  # every element and attribute the report itself writes
    "html": set(), "head": set(), "meta": {"charset"}, "title": set(), "style": set(), "body": set(),
    "h1": set(), "h2": set(), "section": set(), "table": {"id"}, "tr": set(), "th": set(),
    "td": {"class"}, "p": {"class"}, "div": {"class"}, "figure": set(), "figcaption": set(),
    "img": {"src", "alt"}, "br": set(), "code": set(), "script": {"type", "id"},
}


class Markup(HTMLParser):
    """Every element, attribute, comment and script of a page, as a browser's parser sees them;
    each caption as its lines (``<br>``)."""

    def __init__(self, text: str):
        super().__init__()
        self.elements, self.comments, self.scripts, self.captions = [], [], [], []
        self._script = self._caption = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag == "script":
            self._script = ""
        elif tag == "figcaption":
            self._caption = [""]
        elif tag == "br" and self._caption is not None:
            self._caption.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self.scripts.append(self._script)
            self._script = None
        elif tag == "figcaption":
            self.captions.append(self._caption)
            self._caption = None

    def handle_data(self, data):
        if self._script is not None:
            self._script += data
        if self._caption is not None:
            self._caption[-1] += data

    def handle_comment(self, data):
        self.comments.append(data)


@pytest.mark.parametrize("night", [0, 2], ids=["review-queue", "error-examples"])
def test_the_report_stays_inert_whatever_a_name_holds(nights, night):
    with open(os.path.join(nights["outputs"][night], "report.html"), encoding="utf-8") as handle:
        page = Markup(handle.read())
    for tag, attrs in page.elements:
        assert set(attrs) <= ALLOWED_MARKUP.get(tag, set()), (tag, attrs)
        assert tag in ALLOWED_MARKUP, tag
        assert not attrs.get("src") or attrs["src"].startswith(("data:image/png;base64,",
                                                                "data:image/jpeg;base64,"))
    assert page.comments == []
    assert [attrs for tag, attrs in page.elements if tag == "script"] == [
        {"type": "application/json", "id": "report-data"}]
    data = json.loads(page.scripts[0])
    for character in "<>&\u2028\u2029":
        assert character not in page.scripts[0]
    if night == 0:
        assert {row["path"] for row in data["review"]} == nights["scored"]
        assert all(row["thumbnail"] for row in data["review"])  # read again through the recorded form
        # each name is shown as text (a browser reads a CR in text as a line end, as \n)
        names = {lines[0] for lines in page.captions}
        assert names == {path.rsplit("/", 1)[-1].replace("\r", "\n") for path in nights["scored"]}
    else:
        shown = {path for kind in data["summary"]["profile"]["error_examples"].values() for path, _ in kind}
        assert shown == set(nights["manifest"][3:])
