"""One format for every line the service writes to its log: logfmt.

Each line is ``key=value`` pairs separated by spaces: ``time``, ``level``, ``logger``, then the
record's own. A record the service writes names its ``event`` and its fields (``log(logger,
level, "deleted", repo=..., freed_bytes=...)``); any other record (the library's, uvicorn's) has
its text in ``msg``; a traceback is one ``traceback`` value. A value with a space, a quote, an
equals sign, a backslash or a line break is quoted, with ``\\``, ``\"`` and ``\\n`` escaped: a log
shipper parses every line, and no value can forge a field or a line of its own.

Depends on nothing of the service: the service process (``install`` from ``configure_logging``,
for its own loggers and uvicorn's) and its download workers and zygote (``install`` at their
start) all write through it.
"""

from __future__ import annotations

import logging
import sys
import time

_QUOTED = frozenset(' "=\\\n\r\t')


def value(raw: object) -> str:
    """``raw`` as a logfmt value: as it is when it needs no quotes, else quoted and escaped."""
    if raw is None:
        return "-"
    text = raw if isinstance(raw, str) else str(raw)
    if text and not any(c in _QUOTED or not c.isprintable() for c in text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return '"' + "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped) + '"'


def line(event: str, **fields: object) -> str:
    """``event=<event> key=value ...``: a record's own part of the line."""
    return " ".join(f"{key}={value(raw)}" for key, raw in {"event": event, **fields}.items())


def log(
    logger: logging.Logger, level: int, event: str, *, exc_info: bool = False, **fields: object
) -> None:
    """Log ``event`` with its fields (formatted only when the level is on)."""
    if logger.isEnabledFor(level):
        log_line(logger, level, line(event, **fields), exc_info=exc_info)


def log_line(logger: logging.Logger, level: int, text: str, *, exc_info: bool = False) -> None:
    """Log a line ``line`` made, as it is."""
    logger.log(level, "%s", _Line(text), exc_info=exc_info)


class _Line(str):
    """A message that is already logfmt (``log`` made it): the formatter takes it as it is."""


class Formatter(logging.Formatter):
    """Every record as one logfmt line (the module's docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        head = (
            f"time={stamp}.{int(record.msecs):03d}Z level={record.levelname.lower()}"
            f" logger={value(record.name)}"
        )
        own = record.args if isinstance(record.args, tuple) else ()
        if record.msg == "%s" and len(own) == 1 and isinstance(own[0], _Line):
            body = str(own[0])
        elif record.name == "uvicorn.access" and len(own) == 5:
            client, method, path, version, status = own
            body = line(
                "request", client=client, method=method, path=path, http=version, status=status
            )
        else:
            body = f"msg={value(record.getMessage())}"
        if record.exc_info:
            body += f" traceback={value(self.formatException(record.exc_info))}"
        return f"{head} {body}"


def install(name: str = "", level: int | str = logging.INFO) -> None:
    """Write the logger ``name`` (the root by default) in logfmt to stderr: a handler of this
    module's, added once."""
    logger = logging.getLogger(name)
    if not any(isinstance(h.formatter, Formatter) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(Formatter())
        logger.addHandler(handler)
    logger.setLevel(level)


def reformat(*names: str) -> None:
    """The handlers the loggers ``names`` already have (uvicorn's own) write in logfmt too."""
    for name in names:
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(Formatter())


def install_in_worker() -> None:
    """A download worker's or zygote's process: every record, and the library's warnings
    (Python's ``warnings``), as logfmt lines on stderr, which is the service's."""
    install("", logging.WARNING)  # the library's own INFO records are not the service's news
    logging.captureWarnings(True)
