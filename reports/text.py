"""Strings from a table file, made safe to print: a table is hand-editable JSON, so treat every string in it as
untrusted terminal input.

Three things go wrong when such a string is printed as it is: escape sequences (``\\x1b[2J``, OSC 8 links, a
title change) act on the user's terminal; rich reads ``[...]`` as markup and swallows text such as the
``[a-z0-9-]`` of a warning; and a 20 MB field floods the screen. :func:`plain` fixes the first and the last,
:func:`markup` also the second, for strings that go into a rich markup string.
"""

from __future__ import annotations

import re
import unicodedata

from rich.markup import escape

# Long enough for a GPU name, a path or a warning naming a file and a field; a longer string is cut and says so.
MAX_CHARS = 300
# CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or ESC \) and the two-byte escapes: removed whole, so that no
# half of a sequence is left to print as noise.
_ESCAPE_SEQUENCE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]|\x9b[0-?]*[ -/]*[@-~]")
# Control characters (C0, DEL, C1), format characters (bidirectional overrides that reorder what is shown,
# zero-width characters) and line/paragraph separators: shown as escapes, so the user sees that they were there.
_UNSAFE_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")


def plain(value: object, limit: int = MAX_CHARS) -> str:
    """``value`` as one printable line of at most ``limit`` characters (plus a note of how much was cut)."""
    text = _ESCAPE_SEQUENCE.sub("", str(value))
    out = []
    for ch in text:
        if ch in "\t\n":
            out.append(" ")
        elif unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            out.append(ascii(ch)[1:-1])
        else:
            out.append(ch)
    text = "".join(out)
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text) - limit} more characters)"
    return text


def markup(value: object, limit: int = MAX_CHARS) -> str:
    """:func:`plain`, with rich markup escaped: for a table's string inside a ``console.print`` markup string."""
    return escape(plain(value, limit))
