"""Exceptions that carry a message meant for the user.

The CLI turns a :class:`UserError` into one line on stderr and exit status 1 (no traceback);
the REST service turns it into a 4xx response with the message as JSON ``detail``.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (a file, a flag, a config value), not a bug.

    The message must name the offending file, key or value and say what is wrong.
    """


class DataError(UserError):
    """A dataset or image file is unreadable or inconsistent (names the file in the message)."""


class GridError(DataError):
    """A volume refused by one of uumamba's own geometry rules (origin, axes, spacing), not by a
    reader: ``rule`` is that rule's sentence alone (no path, no reader text), which the
    service shows for an upload; the message is ``"<file>: <rule>"``."""

    def __init__(self, file: object, rule: str) -> None:
        super().__init__(f"{file}: {rule}")
        self.rule = rule


class ConfigError(UserError):
    """A configuration key is unknown or has a value of the wrong type or range."""


class ReportError(DataError):
    """A :class:`DataError` whose message is a report of several lines, one per problem, each
    line's file names and text already escaped (:func:`printable`): the CLI keeps its line
    breaks. Every other :class:`UserError` prints as one line, so a line break inside a file
    name it quotes is written as ``\\x0a`` and cannot start a line of its own."""


def cli_text(exc: BaseException) -> str:
    """``exc``'s message as the CLI prints it after ``error:`` (:func:`printable`; line
    breaks kept only for a :class:`ReportError`)."""
    return printable(exc, newlines=isinstance(exc, ReportError))


def escape_quoted(text: str, *quoted: object) -> str:
    """``text`` with each occurrence of every ``quoted`` string (a file's path or name that a
    reader's message quotes) written as :func:`printable` writes it: a line break inside a
    name then no longer cuts the message when its first line is taken."""
    for item in quoted:
        text = text.replace(str(item), printable(item))
    return text


def shown(value: object, limit: int = 20) -> str:
    """``repr`` of ``str(value)`` cut to ``limit`` characters, with ``...`` when cut: a
    crafted value (a 100 kB flag, control characters) named in one short line."""
    text = str(value)
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def printable(text: object, newlines: bool = False) -> str:
    """``str(text)`` with every control or format character (newlines unless ``newlines``,
    ESC, BEL, bidi overrides) written as its ``\\xNN`` / ``\\uNNNN`` escape: a crafted file
    name cannot move the cursor, recolour or retitle the terminal, and a one-line message
    stays one line (``newlines=True`` keeps the line breaks of a multi-line report)."""
    import unicodedata

    out = []
    for ch in str(text):
        if ch == "\n" and newlines:
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)

