"""Writing files a user names on the command line without destroying anything: ``report --export`` and the
tables ``tune.py export``/``merge`` write.

A command may overwrite a file only when it can tell that it wrote that file before: an export carries a
signature comment (:data:`SIGNATURE`), a table is recognised by its header. Anything else (a README, a source
file, someone's notes) needs ``--force``. Every check runs before the command does any work, so a bad path fails
at once rather than after a tune or a render.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

EXPORT_KINDS = ("html", "svg")
# In the first bytes of every export; what tells an earlier export from a file that must not be overwritten.
SIGNATURE = "written by gdn2-tune report --export"
_SNIFF_BYTES = 4096


class OutputError(ValueError):
    """A path the user named that this command must not or cannot write; the message says what to do."""


def check_output(path: Path, *, ours: Callable[[Path], bool], what: str, force: bool) -> None:
    """Raise :class:`OutputError` unless ``path`` can be written: not a directory, its nearest existing parent a
    writable directory (missing ones are created on write), and either absent, ``ours``, or ``force``."""
    if path.is_dir():
        raise OutputError(f"{path} is a directory; name a file inside it")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise OutputError(f"{path} is not writable; choose another path")
        if not force and not ours(path):
            raise OutputError(f"{path} exists and is not an earlier {what} written by gdn2-tune; "
                              "choose another path, or pass --force to overwrite it")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create {path}: {parent} is not a directory; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {path}: {parent} is not writable; choose another path")


def is_export(path: Path) -> bool:
    """Whether ``path`` starts like a file :func:`write_export` wrote."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except OSError:
        return False
    return SIGNATURE.encode() in head


def mark(kind: str, text: str) -> str:
    """``text`` (an html or svg document) with the signature comment near its start."""
    comment = f"<!-- {SIGNATURE} -->\n"
    if kind == "html" and text.lstrip().lower().startswith("<!doctype"):
        # After the doctype: anything before it may put a browser into quirks mode.
        first, _, rest = text.partition("\n")
        return f"{first}\n{comment}{rest}"
    return comment + text


def write_text(path: Path, text: str) -> None:
    """Create missing parent directories and replace ``path`` atomically (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
