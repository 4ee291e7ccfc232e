"""What a preds.csv cell may hold: text that every CSV reader and spreadsheet takes as it is.

DICOM header values and file names are untrusted input. Three things are neutralised before they reach a
cell (and the log):

* Control characters (a lone carriage return, a newline, a tab, ESC...), Unicode line and paragraph
  separators and the bytes of a file name that are not UTF-8 are written as escapes: ``\\r``, ``\\n``,
  ``\\t``, ``\\xNN`` (a control character below 0x80, or an undecodable byte of a file name), ``\\uNNNN``
  (any other). A CSV row is then always one line, and the file is always UTF-8.
* A cell that a spreadsheet would run as a formula (it begins with ``=``, ``+``, ``-`` or ``@``) gets a
  leading apostrophe, which spreadsheets hide; so does a cell that begins with an apostrophe, so the rule
  reverses exactly: :func:`raw_cell` drops one leading apostrophe.
* In the ``path`` column a backslash is escaped too (``\\\\``), so the escape is reversible:
  :func:`raw_path` gives back the very file name (undecodable bytes as ``surrogateescape`` characters,
  which ``open()`` and ``os.fsencode`` take), and ``--resume`` recognises a file by its cell.
"""

from __future__ import annotations

import re
import unicodedata

_FORMULA = ("=", "+", "-", "@", "'")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPE = re.compile(r"\\(\\|n|r|t|x[0-9a-f]{2}|u[0-9a-f]{4})")


def _needs_escape(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp")


def _escape(char: str) -> str:
    code = ord(char)
    if char in _SHORT:
        return _SHORT[char]
    if code < 0x80:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode carries it (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def escape_text(value: str, *, backslash: bool = False) -> str:
    """``value`` with its control characters, line separators and undecodable bytes escaped (and its
    backslashes, when ``backslash``); the form for a log line."""
    if backslash:
        value = value.replace("\\", "\\\\")
    if not any(_needs_escape(c) for c in value):
        return value
    return "".join(_escape(c) if _needs_escape(c) else c for c in value)


def _guard(value: str) -> str:
    return "'" + value if value.startswith(_FORMULA) else value


def text_cell(value: object) -> str:
    """A header value or a message as a cell: escaped, and guarded against formulas."""
    return _guard(escape_text("" if value is None else str(value)))


def path_cell(path: str) -> str:
    """A file name as a cell: escaped reversibly (backslashes too), and guarded against formulas."""
    return _guard(escape_text(path, backslash=True))


def raw_cell(cell: str) -> str:
    """A cell as a program reads the value it was written from: a leading apostrophe is always the formula
    guard's, and is dropped (the escapes stay: the value held control characters)."""
    return cell[1:] if cell.startswith("'") else cell


def raw_path(cell: str) -> str:
    """The file name a ``path`` cell was written from (:func:`path_cell` reversed)."""

    def unescape(match: re.Match) -> str:
        token = match.group(1)
        if token == "\\":
            return "\\"
        if token in ("n", "r", "t"):
            return {"n": "\n", "r": "\r", "t": "\t"}[token]
        code = int(token[1:], 16)
        return chr(0xDC00 + code) if token[0] == "x" and code >= 0x80 else chr(code)

    return _ESCAPE.sub(unescape, raw_cell(cell))
