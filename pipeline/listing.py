"""What an ``--input`` glob names: every entry of storage it matches, none dropped silently.

Beam's ``FileSystems.match`` loses entries a night must account for:

- its ``*`` is ``[^/\\\\]*`` (``FileSystem.translate_pattern``), so ``in/*.jpg`` never lists
  ``a\\b.jpg`` (beam#21140), on a local disk and on ``gs://`` alike, where object names may hold
  a backslash;
- its local listing (``os.walk`` and ``os.path.getsize``) drops without a trace a dangling
  symbolic link, a loop of links and every directory it cannot read, and lists a named pipe as a
  0-byte file (reading it waits for a writer forever);
- a glob character in a folder's name cannot be escaped ("There is no way to quote
  meta-characters").

``list_glob`` lists under the glob's fixed prefix with Beam's filesystem (object stores: its
``_list``, the one listing every Beam filesystem implements and ``match`` itself calls) or, on a
local disk, with ``os.scandir``, and matches the names with petscore's own translation:

- ``*`` matches any run of characters but ``/`` (a backslash is a character like any other),
  ``?`` one such character, ``[abc]`` / ``[a-z]`` one of them, ``[!abc]`` one not among them;
- ``**`` matches any run of characters, ``/`` included: Beam's meaning, so ``DIR/**/*.jpg`` takes
  files in sub-folders only and ``DIR/**.jpg`` those directly in ``DIR`` too;
- ``[[]``, ``[*]`` and ``[?]`` stand for ``[``, ``*`` and ``?`` themselves (``glob_escape``).

Each match is a ``Matched`` entry: a file to read, an entry that cannot be read with the reason
(an error row), or an object store's folder placeholder (a 0-byte ``dir/`` object: skipped, and
counted). Directories are walked, not matched; symbolic links to directories are not followed
(one can loop back to its parent) but are reported where the glob could reach into them.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterator
from typing import NamedTuple

from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

# error_type of the entries a listing finds but no reader can read
DANGLING_SYMLINK = "DanglingSymlink"
SYMLINK_LOOP = "SymlinkLoop"
SYMLINK_TO_DIRECTORY = "SymlinkToDirectory"
UNREADABLE_DIRECTORY = "UnreadableDirectory"
NOT_A_FILE = "NotAFile"
SPECIAL_FILES = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                 (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class Matched(NamedTuple):
    """One entry a glob matched, by its storage path (``os.fsdecode`` text for a local name).

    A file has ``size_bytes`` and ``updated_seconds`` (seconds since the epoch); an entry no
    reader can read has ``error_type`` and ``message`` instead; ``placeholder`` marks an object
    store's 0-byte folder placeholder (``dir/``), which is skipped."""

    path: str
    size_bytes: int | None = None
    updated_seconds: float | None = None
    error_type: str | None = None
    message: str | None = None
    placeholder: bool = False


def _class_end(pattern: str, start: int) -> int | None:
    """Index of the ``]`` closing the class that opens just before ``start``, None when it
    never closes (then the ``[`` is a character); as ``fnmatch``: a ``]`` first (after ``!``)
    is a member."""
    end = start
    if end < len(pattern) and pattern[end] == "!":
        end += 1
    if end < len(pattern) and pattern[end] == "]":
        end += 1
    end = pattern.find("]", end)
    return None if end < 0 else end


def _class_regex(body: str) -> str:
    negate = body.startswith("!")
    body = body[1:] if negate else body
    members, index = [], 0
    while index < len(body):
        if index + 2 < len(body) and body[index + 1] == "-":
            members.append(f"{re.escape(body[index])}-{re.escape(body[index + 2])}")
            index += 3
        else:
            members.append(re.escape(body[index]))
            index += 1
    return f"[^{''.join(members)}/]" if negate else f"(?!/)[{''.join(members)}]"


def glob_regex(pattern: str) -> re.Pattern:
    """The compiled regular expression a whole path must match to match ``pattern``
    (the syntax in this module's docstring); newlines in names match like any character."""
    parts, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        index += 1
        if char == "*" and pattern.startswith("*", index):
            parts.append(".*")
            index += 1
        elif char == "*":
            parts.append("[^/]*")
        elif char == "?":
            parts.append("[^/]")
        elif char == "[" and (end := _class_end(pattern, index)) is not None:
            parts.append(_class_regex(pattern[index:end]))
            index = end + 1
        else:
            parts.append(re.escape(char))
    return re.compile("(?s:" + "".join(parts) + r")\Z")


def literal_prefix(pattern: str) -> tuple[str, bool]:
    """``(text, whole)``: what every path ``pattern`` matches starts with (its part before the
    first wildcard, escapes such as ``[[]`` read as the character they stand for) and whether
    that is the whole pattern (a plain path, no wildcard)."""
    text, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        if char in "*?":
            return "".join(text), False
        if char == "[" and (end := _class_end(pattern, index + 1)) is not None:
            body = pattern[index + 1:end]
            if len(body) != 1:
                return "".join(text), False
            text.append(body)
            index = end + 1
            continue
        text.append(char)
        index += 1
    return "".join(text), True


def fixed_prefix(pattern: str) -> str:
    """The part of a glob before its first wildcard: every path it matches starts with it."""
    return literal_prefix(pattern)[0]


def glob_escape(path: str) -> str:
    """A glob that matches ``path`` alone: ``[``, ``*`` and ``?`` written ``[[]``, ``[*]``,
    ``[?]`` (what ``glob.escape`` does)."""
    return re.sub(r"([\[*?])", r"[\1]", path)


def directory_glob(pattern: str) -> str | None:
    """``pattern/**`` (the directory's name escaped) when ``pattern`` (no wildcard) names a
    directory or, on an object store, a prefix with objects under it; else None."""
    path, whole = literal_prefix(pattern)
    if not whole:
        return None
    recursive = glob_escape(path.rstrip("/")) + "/**"
    return recursive if next(list_glob(recursive), None) is not None else None


def list_glob(pattern: str) -> Iterator[Matched]:
    """Every entry ``pattern`` matches, as a stream (a local directory's entries in name order).

    Raises what the filesystem raises when an object store cannot be listed (a transient error
    fails the bundle, which the runner retries); a local directory that cannot be read is an
    entry (``UnreadableDirectory``)."""
    regex = glob_regex(pattern)
    filesystem = FileSystems.get_filesystem(pattern)
    if isinstance(filesystem, LocalFileSystem):
        yield from _list_local(pattern, regex)
        return
    prefix = fixed_prefix(pattern)
    if filesystem.has_dirs():
        prefix = FileSystems.split(prefix)[0]
    # _list, not match(): match would read the prefix's own glob characters as wildcards.
    for metadata in filesystem._list(prefix):
        if regex.match(metadata.path):
            yield Matched(metadata.path, metadata.size_in_bytes, metadata.last_updated_in_seconds,
                          placeholder=metadata.path.endswith("/") and metadata.size_in_bytes == 0)


def _join(directory: str, name: str) -> str:
    return name if not directory else (directory + name if directory.endswith("/")
                                       else f"{directory}/{name}")


def _list_local(pattern: str, regex: re.Pattern) -> Iterator[Matched]:
    """Walk from the fixed prefix's directory, into the sub-directories where the pattern can
    still match (every one below a ``**``), yielding each non-directory entry that matches and
    each symbolic link to a directory that the walk would have entered."""
    prefix, whole = literal_prefix(pattern)
    if whole:  # a plain path: that entry alone, unless it is a directory or nothing
        if os.path.lexists(prefix) and (os.path.islink(prefix) or not os.path.isdir(prefix)):
            yield _classify(prefix)
        return
    components = pattern.split("/")
    globstar = next((index for index, part in enumerate(components) if "**" in part), len(components))
    component_regexes = [glob_regex(part) for part in components[:globstar]]

    def may_hold_matches(name: str, depth: int) -> bool:  # a directory at components[depth]
        return depth >= globstar or (depth < len(components) - 1
                                     and component_regexes[depth].match(name) is not None)

    root = os.path.dirname(prefix)
    stack = [(root, len(root.rstrip("/").split("/")) if root else 0)]
    while stack:
        directory, depth = stack.pop()
        # Names only, not os.DirEntry objects (about 250 bytes each with their two strings): a
        # folder of a million images is listed in one go, and sorted.
        below, chosen = [], []
        try:
            with os.scandir(directory or ".") as scan:
                for entry in scan:
                    path = _join(directory, entry.name)
                    if entry.is_dir(follow_symlinks=False):
                        if may_hold_matches(entry.name, depth):
                            below.append(entry.name)
                    elif regex.match(path) or (entry.is_symlink() and may_hold_matches(entry.name, depth)
                                               and os.path.isdir(path)):
                        chosen.append(entry.name)
        except (FileNotFoundError, NotADirectoryError):
            continue  # nothing there: the glob's folder does not exist (or went since listed)
        except OSError as error:
            yield Matched(directory or ".", error_type=UNREADABLE_DIRECTORY,
                          message=f"cannot list this directory ({error.strerror}): none of the "
                                  "files under it is scored; give the job read and search "
                                  "permission on it")
            continue
        chosen.sort()
        for index, name in enumerate(chosen):
            chosen[index] = None  # each name goes as it is listed
            yield _classify(_join(directory, name))
        stack.extend((_join(directory, name), depth + 1) for name in sorted(below, reverse=True))


def _classify(path: str) -> Matched:
    """A local entry that is not a directory (or is a link to one) as the listing reports it."""
    try:
        status = os.stat(path)
    except OSError as error:
        if os.path.islink(path):
            if error.errno == errno.ELOOP:
                return Matched(path, error_type=SYMLINK_LOOP,
                               message="a symbolic link that never reaches a file (a loop of links)")
            if isinstance(error, FileNotFoundError):
                return Matched(path, error_type=DANGLING_SYMLINK,
                               message=f"a symbolic link to {os.readlink(path)!r}, which does not exist")
        return Matched(path, error_type=type(error).__name__, message=str(error))
    if stat.S_ISREG(status.st_mode):
        return Matched(path, status.st_size, status.st_mtime)
    if stat.S_ISDIR(status.st_mode):  # a link: directories themselves are walked, not classified
        target = os.path.realpath(path)
        holder = os.path.realpath(os.path.dirname(path) or ".")
        if holder == target or holder.startswith(target.rstrip("/") + "/"):
            return Matched(path, error_type=SYMLINK_LOOP,
                           message=f"a symbolic link to {target!r}, a directory that holds the "
                                   "link itself (a loop): links to directories are not followed")
        return Matched(path, error_type=SYMLINK_TO_DIRECTORY,
                       message=f"a symbolic link to the directory {target!r}: links to "
                               "directories are not followed (one can loop); give that directory "
                               "as --input to score its files")
    kind = next((name for test, name in SPECIAL_FILES if test(status.st_mode)), "not a regular file")
    return Matched(path, error_type=NOT_A_FILE,
                   message=f"{kind}, not a file: reading it could wait forever")
