"""What a glob lists: petscore's own matching of names, and every entry of a local tree, each a
file, a reason it cannot be read, or nothing when the glob cannot reach it."""

import io
import json
import os
import shutil
import tempfile

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipeline.decode import DECODED, ERRORS, DecodeImages
from pipeline.listing import (
    DANGLING_SYMLINK,
    NOT_A_FILE,
    SYMLINK_LOOP,
    SYMLINK_TO_DIRECTORY,
    UNREADABLE_DIRECTORY,
    directory_glob,
    glob_escape,
    glob_regex,
    list_glob,
    literal_prefix,
)
from pipeline.options import ThreadBudget
from pipeline.read import UNSCORED, EmptyInputError, ReadImagePaths, check_input_exists

FILE = "file"


@pytest.mark.parametrize("pattern, matching, other", [
    # * and ? never cross a folder, but a backslash, a newline or a glob character in a name are
    # characters like any other (Beam's * is [^/\\]*: beam#21140)
    ("in/*.jpg", ["in/a\\b.jpg", "in/[1].jpg", "in/a*b.jpg", "in/new\nline.jpg", "in/.jpg"],
     ["in/sub/x.jpg", "in/x.png", "in/x.jpg/"]),
    ("in/?.jpg", ["in/\\.jpg", "in/\n.jpg", "in/*.jpg"], ["in//.jpg", "in/ab.jpg"]),
    # ** keeps Beam's meaning: any run, folders included
    ("in/**/*.jpg", ["in/a/b.jpg", "in/a/b/c.jpg"], ["in/x.jpg"]),
    ("in/**.jpg", ["in/x.jpg", "in/a/b.jpg"], ["in/x.png"]),
    ("in/**", ["in/x", "in/a/b\\c"], ["other/x"]),
    # classes: one of, one not among, never a folder separator
    ("in/[ab]*.jpg", ["in/a.jpg", "in/b2.jpg"], ["in/c.jpg"]),
    ("in/[!a]*.jpg", ["in/b.jpg", "in/\\.jpg"], ["in/a.jpg"]),
    ("in[!a]x", ["inbx"], ["in/x"]),
    ("in/[0-9].jpg", ["in/7.jpg"], ["in/a.jpg"]),
    # escapes: [[], [*], [?] are the characters themselves
    ("in/[[]1].jpg", ["in/[1].jpg"], ["in/1.jpg"]),
    ("in/a[*]b.jpg", ["in/a*b.jpg"], ["in/axb.jpg", "in/ab.jpg"]),
    ("in/a[b", ["in/a[b"], ["in/ab"]),  # an unclosed [ is a character
])
def test_glob_matching(pattern, matching, other):
    regex = glob_regex(pattern)
    assert [path for path in matching if not regex.match(path)] == []
    assert [path for path in other if regex.match(path)] == []


@pytest.mark.parametrize("pattern, expected", [
    ("in/*.jpg", ("in/", False)),
    ("in/a.jpg", ("in/a.jpg", True)),
    ("in[[]1]/**", ("in[1]/", False)),
    ("in[[]1]", ("in[1]", True)),
    ("in/[ab].jpg", ("in/", False)),
    ("in/a[b", ("in/a[b", True)),
    ("gs://b/x?/y", ("gs://b/x", False)),
])
def test_literal_prefix(pattern, expected):
    assert literal_prefix(pattern) == expected


@pytest.mark.parametrize("name", ["photos[2024]", "a*b?c", "[!x]", "back\\slash", "new\nline"])
def test_an_escaped_name_matches_itself_alone(name):
    pattern = glob_escape(f"in/{name}")
    assert literal_prefix(pattern) == (f"in/{name}", True)
    assert glob_regex(pattern).match(f"in/{name}")


def make(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


@pytest.fixture
def tree(tmp_path):
    """A folder with every kind of entry a glob can meet; ``{name relative to it: bytes}``."""
    root = os.fsencode(tmp_path / "in")
    for name in (b"a\\b.jpg", b"[1].jpg", b"a*b.jpg", b"q?.jpg", b"new\nline.jpg", b"caf\xe9.jpg",
                 b"x.png", b"sub/deep.jpg", b"sub/more/deeper.jpg", b"photos[2024]/p.jpg"):
        make(os.path.join(root, name))
    os.symlink(b"nowhere.jpg", os.path.join(root, b"dangling.jpg"))
    os.symlink(b"loop.jpg", os.path.join(root, b"loop.jpg"))
    os.symlink(b"[1].jpg", os.path.join(root, b"link.jpg"))  # a link to a file is that file
    os.mkfifo(os.path.join(root, b"pipe.jpg"))  # reading it would wait for a writer forever
    os.symlink(b".", os.path.join(root, b"up"))  # a link to the folder that holds it
    os.makedirs(tmp_path / "elsewhere")
    os.symlink(os.fsencode(tmp_path / "elsewhere"), os.path.join(root, b"there"))
    return os.fsdecode(root)


def listed(pattern, root):
    """``{path relative to root: 'file' or error_type}`` of what ``pattern`` lists."""
    return {os.path.relpath(entry.path, root): entry.error_type or FILE for entry in list_glob(pattern)}


def test_a_glob_lists_every_entry_it_matches_and_says_why_one_cannot_be_read(tree):
    assert listed(os.path.join(tree, "*.jpg"), tree) == {
        "a\\b.jpg": FILE, "[1].jpg": FILE, "a*b.jpg": FILE, "q?.jpg": FILE, "new\nline.jpg": FILE,
        os.fsdecode(b"caf\xe9.jpg"): FILE, "link.jpg": FILE, "dangling.jpg": DANGLING_SYMLINK,
        "loop.jpg": SYMLINK_LOOP, "pipe.jpg": NOT_A_FILE}
    entries = {os.path.basename(entry.path): entry for entry in list_glob(os.path.join(tree, "*.jpg"))}
    assert entries["dangling.jpg"].message == "a symbolic link to 'nowhere.jpg', which does not exist"
    assert entries["pipe.jpg"].message.startswith("a named pipe (FIFO), not a file")
    assert entries["a\\b.jpg"].size_bytes == 1 and entries["a\\b.jpg"].updated_seconds > 0


def test_a_recursive_glob_reports_the_links_to_folders_it_does_not_follow(tree):
    everything = listed(os.path.join(tree, "**"), tree)
    assert {path: kind for path, kind in everything.items() if "/" in path} == {
        "sub/deep.jpg": FILE, "sub/more/deeper.jpg": FILE, "photos[2024]/p.jpg": FILE}
    assert (everything["up"], everything["there"]) == (SYMLINK_LOOP, SYMLINK_TO_DIRECTORY)
    # a glob that cannot reach into them says nothing of them, and walks no folder it cannot use
    assert listed(os.path.join(tree, "sub", "*.jpg"), tree) == {"sub/deep.jpg": FILE}
    assert listed(os.path.join(tree, "*", "*.jpg"), tree) == {
        "sub/deep.jpg": FILE, "photos[2024]/p.jpg": FILE, "there": SYMLINK_TO_DIRECTORY,
        "up": SYMLINK_LOOP}


def test_a_relative_glob_lists_names_relative_to_the_working_directory(tree, monkeypatch):
    monkeypatch.chdir(tree)
    assert {entry.path for entry in list_glob("*.png")} == {"x.png"}
    assert {entry.path for entry in list_glob("sub/**")} == {"sub/deep.jpg", "sub/more/deeper.jpg"}


def test_a_folder_with_glob_characters_in_its_name(tree):
    folder = os.path.join(tree, "photos[2024]")
    assert directory_glob(glob_escape(folder)) == os.path.join(tree, "photos[[]2024]", "**")
    assert listed(directory_glob(glob_escape(folder)), tree) == {"photos[2024]/p.jpg": FILE}
    assert directory_glob(folder) is None  # a glob: photos2, photos0 or photos4
    with pytest.raises(EmptyInputError, match=r"matches no file; .* is the name of a file or folder: "
                                              r"write its \[, \* and \? as \[\[\], \[\*\] and \[\?\]"):
        check_input_exists(folder, None)  # as a glob, [2024] is one character of 2, 0 or 4
    check_input_exists(os.path.join(tree, "dangling.jpg"), None)  # one error row: not empty


def without_root(work):
    """``work()`` (its result JSON) in a forked child that dropped root's rights (uid 65534),
    where chmod hides what it hides from users; in this process when it is no root's."""
    if os.geteuid() != 0:
        return work()
    work()  # as root first: every module it imports is loaded (the child cannot read root's)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, json.dumps(work()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 1 << 16):
        data += chunk
    os.close(read_end)
    os.waitpid(child, 0)
    return json.loads(data)


@pytest.fixture
def traversable_dir():
    """A temporary folder an unprivileged user can reach (pytest's own are private to root)."""
    folder = tempfile.mkdtemp(prefix="petscore-listing-")
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder)


def test_what_the_job_cannot_read_is_one_error_row_that_says_so(traversable_dir):
    """A folder it cannot list and a file it cannot read, through the listing and reading stages."""
    root = os.path.join(traversable_dir, "in")
    image = io.BytesIO()
    Image.new("RGB", (12, 10), "white").save(image, format="JPEG")
    for name in ("locked/a.jpg", "open/b.jpg", "secret.jpg"):
        make(os.path.join(root, name), image.getvalue())
    os.chmod(os.path.join(root, "locked"), 0)
    os.chmod(os.path.join(root, "secret.jpg"), 0)

    def listed_and_read():
        entries = [(entry.path, entry.error_type) for entry in list_glob(os.path.join(root, "**"))]
        try:
            with TestPipeline() as p:
                listed = p | ReadImagePaths(os.path.join(root, "**"), None, "run")
                read = listed["paths"] | DecodeImages((8, 8), "bilinear", 10**6, 10**6, "run",
                                                      ThreadBudget())
                errors = ((listed[UNSCORED], read[ERRORS]) | beam.Flatten()
                          | beam.FlatMap(lambda table: table.to_pylist())
                          | beam.Map(lambda row: (row["path"], row["stage"], row["error_type"],
                                                  row["message"].split(":")[0])))
                assert_that(errors, equal_to([
                    (os.path.join(root, "locked"), "read", UNREADABLE_DIRECTORY,
                     "cannot list this directory (Permission denied)"),
                    (os.path.join(root, "secret.jpg"), "read", "PermissionError",
                     "[Errno 13] Permission denied")]))
                assert_that(read[DECODED] | beam.FlatMap(lambda batch: batch.paths),
                            equal_to([os.path.join(root, "open", "b.jpg")]), label="Decoded")
        except Exception as error:  # noqa: BLE001 - the child reports it to the test
            return entries, str(error)
        return entries, None

    try:
        entries, failure = without_root(listed_and_read)
    finally:
        os.chmod(os.path.join(root, "locked"), 0o755)
    assert [tuple(entry) for entry in entries] == [
        (os.path.join(root, "secret.jpg"), None),  # a file: stat works, reading it does not
        (os.path.join(root, "locked"), UNREADABLE_DIRECTORY),
        (os.path.join(root, "open", "b.jpg"), None)]
    assert failure is None
