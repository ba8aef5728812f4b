"""A path as petscore records it in text, and the path it names again.

A local file name is bytes, not text: Linux lets a name hold any byte but ``/`` and NUL, so a
name copied from a Windows ZIP or an old Samba share can be ``caf\\xe9.jpg`` (Latin-1, not
UTF-8). Python hands such a name over as a ``str`` holding lone surrogates (``os.fsdecode``),
which no UTF-8 output (Parquet, CSV, JSON, HTML) can hold. Every output therefore records a path
in one reversible text form:

- a path whose name is valid UTF-8 is recorded as it is, newlines and all;
- a local path that is not valid UTF-8 is recorded as an RFC 8089 ``file://`` URI of its
  absolute path, every byte outside RFC 3986's unreserved set and ``/`` percent-encoded
  (``file:///data/in/caf%E9.jpg``): the form GLib/GIO and the freedesktop.org specifications use
  for such names. So is a plain path that itself starts with ``file://``, the one plain path that
  could be taken for a URI.

No plain path petscore reads starts with ``file://`` (Beam has no filesystem for that scheme,
and object stores hold only UTF-8 names), so the form is unambiguous: ``storage_path`` turns a
recorded path back into the path to open. The listing records (``recorded_path``), the readers
open through ``storage_path``, a manifest may list either form, and ``--skip-scored`` finds a
file again because the same file is recorded as the same text every night.
"""

from __future__ import annotations

import os
import urllib.parse

from apache_beam.io.filesystems import FileSystems

FILE_URI = "file://"


def is_utf8(path: str) -> bool:
    """True when ``path`` is text UTF-8 can hold: no lone surrogate from ``os.fsdecode``."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def file_uri(path: str) -> str:
    """The RFC 8089 ``file://`` URI of a local ``path`` (relative: to the working directory),
    each byte outside RFC 3986's unreserved set and ``/`` percent-encoded. The path is made
    absolute by joining, not normalised: ``a/../b`` stays as written, as the filesystem reads it
    (``a`` may be a symbolic link)."""
    absolute = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    return FILE_URI + urllib.parse.quote(os.fsencode(absolute), safe="/")


def recorded_path(path: str) -> str:
    """The text every output records for the storage ``path`` (as a listing or ``os.fsdecode``
    gives it): ``path`` itself when it is valid UTF-8, else its ``file_uri``. The inverse is
    ``storage_path``. Not idempotent on ``file://`` text: record a storage path once."""
    if is_utf8(path) and not path.startswith(FILE_URI):
        return path
    return file_uri(path)


def storage_path(recorded: str) -> str:
    """The path to open for a ``recorded`` path (``recorded_path``'s inverse): a ``file://``
    URI (host empty or ``localhost``) becomes the local path whose bytes it percent-encodes;
    anything else is a path already.

    Raises ``ValueError`` for a ``file://`` URI that names another host: petscore reads the
    files of the machine it runs on."""
    if not recorded.startswith(FILE_URI):
        return recorded
    host, _, rest = recorded[len(FILE_URI):].partition("/")
    if host.lower() not in ("", "localhost"):
        raise ValueError(f"{recorded!r} is a file:// URI of host {host!r}: petscore reads the "
                         "files of the machine it runs on; write file:///path (no host)")
    return os.fsdecode(urllib.parse.unquote_to_bytes("/" + rest))


def normalised_entry(entry: str) -> str:
    """The recorded form of a path a person wrote (a manifest line): a ``file://`` URI of a
    UTF-8 name becomes the plain path, so that one file is one text whichever form named it."""
    return recorded_path(storage_path(entry))


def recorded_prefixes(prefix: str) -> list[str]:
    """What the recorded paths of the files under the storage ``prefix`` start with: the
    prefix itself (its UTF-8 names) and, for a local prefix, its ``file_uri`` (names that are
    not UTF-8). Used to find tonight's files among an earlier night's rows."""
    forms = [prefix] if is_utf8(prefix) and not prefix.startswith(FILE_URI) else []
    if FileSystems.get_scheme(prefix) is None:
        forms.append(file_uri(prefix))
    return forms
