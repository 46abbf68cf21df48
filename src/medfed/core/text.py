"""Text that came from elsewhere, made safe to print, log and store.

A site's error reasons, names and other strings reach ``run.log``, the operator's terminal,
the audit table and the report. Raw, a newline in them can forge a whole log line and an
ANSI escape sequence can rewrite the terminal. :func:`printable` escapes every control and
format character (Unicode categories Cc and Cf: newlines, escapes, bidirectional overrides,
zero-width characters) and the line and paragraph separators, so that one message stays one
visible line of exactly the characters it holds.
"""

from __future__ import annotations

import logging
import unicodedata

_UNSAFE = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _SHORT:
        return _SHORT[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: object, limit: int | None = None) -> str:
    """``str(text)`` with every control or format character escaped (``\\n``, ``\\x1b``,
    ``\\u202e``...), cut to ``limit`` characters (with ``...``) when given."""
    s = str(text)
    if limit is not None and len(s) > limit:
        s = s[: limit + 1]  # escaping only makes it longer
    if not (s.isascii() and s.isprintable()):  # the common case needs no pass per character
        s = "".join(_escape(c) if unicodedata.category(c) in _UNSAFE else c for c in s)
    if limit is not None and len(s) > limit:
        return s[:limit] + "..."
    return s


class PrintableLogFilter(logging.Filter):
    """Escapes control characters in a record's message, arguments included, before any
    handler sees it: one record is one line of the log, whatever a peer put in it.
    (Tracebacks, formatted by handlers from ``exc_info``, keep their lines.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = printable(message)
        if safe is not message:
            record.msg, record.args = safe, None
        return True


def install_log_filter(logger: logging.Logger) -> None:
    """Put one :class:`PrintableLogFilter` on ``logger`` (idempotent)."""
    if not any(isinstance(f, PrintableLogFilter) for f in logger.filters):
        logger.addFilter(PrintableLogFilter())
