"""Log lines on stdout: JSON for a container's collector, a readable console format for a person.

Messages are constant strings; what varies goes in ``extra`` so that log queries can filter on it.
``LOG_FORMAT=auto`` picks the console format when stdout is a terminal and JSON otherwise; the
retriable coordinator lookups and moves aiokafka logs as errors and warnings while a group
forms are lowered to debug, and what aiokafka repeats while Kafka is away is shown once a minute
with a count.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from typing import Any, TextIO

import orjson
from aiokafka.errors import (
    CoordinatorLoadInProgressError,
    CoordinatorNotAvailableError,
    NotCoordinatorError,
)

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

# ANSI colours by level; the console format uses them only on a terminal without NO_COLOR.
_COLOURS = {
    logging.DEBUG: "\x1b[2m",
    logging.INFO: "\x1b[32m",
    logging.WARNING: "\x1b[33m",
    logging.ERROR: "\x1b[31m",
    logging.CRITICAL: "\x1b[1;31m",
}
_DIM, _RESET = "\x1b[2m", "\x1b[0m"
_LEVEL_NAMES = {"WARNING": "WARN", "CRITICAL": "CRIT"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class ConsoleFormatter(logging.Formatter):
    """``12:04:31.250 INFO  relay        partition restored partition=0 records=12``.

    Local time to the millisecond, the level (coloured when ``colour``), the last part of the
    logger's name, the message, then the extras as ``key=value``; a traceback is indented below.
    """

    def __init__(self, *, colour: bool) -> None:
        super().__init__()
        self._colour = colour

    def format(self, record: logging.LogRecord) -> str:
        moment = dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        level = f"{_LEVEL_NAMES.get(record.levelname, record.levelname):<5}"
        name = f"{record.name.rsplit('.', 1)[-1]:<12}"
        extras = " ".join(f"{k}={_plain(v)}" for k, v in _extras(record).items())
        if self._colour:
            level = f"{_COLOURS.get(record.levelno, '')}{level}{_RESET}"
            extras = f"{_DIM}{extras}{_RESET}" if extras else ""
        line = f"{moment} {level} {name} {record.getMessage()}"
        line = f"{line} {extras}" if extras else line
        details = []
        if record.exc_info:
            details.append(self.formatException(record.exc_info))
        if record.stack_info:
            details.append(self.formatStack(record.stack_info))
        for text in details:
            line += "\n" + "\n".join("    " + part for part in text.splitlines())
        return line


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value and "=" not in value else repr(value)
    if isinstance(value, dict | list | tuple):
        return orjson.dumps(value, default=str).decode()
    return str(value)


class CoordinatorLookupFilter(logging.Filter):
    """Lowers aiokafka's "Group Coordinator Request failed" to debug while a group forms.

    aiokafka logs every failed coordinator lookup at ERROR and retries it 100 ms later. On a new
    cluster the broker creates its offsets topic on the first lookup and answers "not available"
    meanwhile; a coordinator that moves answers "load in progress" or "not coordinator" for a
    moment. The Java client logs these at debug. A streak of them longer than ``grace_s`` is a
    real outage and keeps its level, as does any other lookup error.

    "Marking the coordinator dead" (a warning) follows every such move; its cause is logged on
    its own line at the level aiokafka judges right (an expired session or a failed request at
    error, a commit or a join answered "not coordinator" at info or debug), so it is lowered too.
    """

    MESSAGE = "Group Coordinator Request failed: %s"
    MOVED = "Marking the coordinator dead (node %s)for group %s."
    TRANSIENT = (CoordinatorNotAvailableError, CoordinatorLoadInProgressError, NotCoordinatorError)

    def __init__(self, *, grace_s: float = 30.0, streak_gap_s: float = 5.0) -> None:
        super().__init__()
        self._grace_s = grace_s
        self._gap_s = streak_gap_s
        self._streak_start: float | None = None
        self._last: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == self.MOVED:
            return self._lower(record)
        if record.msg != self.MESSAGE or not isinstance(record.args, tuple) or not record.args:
            return True
        if not isinstance(record.args[0], self.TRANSIENT):
            return True
        if self._last is None or record.created - self._last > self._gap_s:
            self._streak_start = record.created  # lookups a while apart start a new streak
        self._last = record.created
        start = self._streak_start if self._streak_start is not None else record.created
        if record.created - start > self._grace_s:
            return True
        return self._lower(record)

    @staticmethod
    def _lower(record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


class RepeatedLineFilter(logging.Filter):
    """Lets through one line a minute of each message a library repeats, and how many it held.

    While Kafka is away, aiokafka logs every failed connection, metadata refresh, fetch and
    produce, each retried every 100 ms (one relay and one producer logged 11,000 lines in a
    one-minute outage), burying the relay's own lines (the readiness change, the commits that
    failed, the stop). For loggers under ``prefixes``, a message (its template, logger and level)
    seen again within ``window_s`` of the last one shown is held back and counted; the next one
    shown carries ``repeated``, how many were held. The relay's own lines are never held back.
    """

    MAX_MESSAGES = 1024  # a library that formats its messages itself makes each one new

    def __init__(self, *, prefixes: tuple[str, ...] = ("aiokafka",), window_s: float = 60.0):
        super().__init__()
        self._prefixes = prefixes
        self._window_s = window_s
        self._shown: dict[tuple[str, int, str], float] = {}
        self._held: dict[tuple[str, int, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefixes):
            return True
        key = (record.name, record.levelno, str(record.msg))
        last = self._shown.get(key)
        if last is not None and record.created - last < self._window_s:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        if held := self._held.pop(key, 0):
            record.repeated = held
        if len(self._shown) >= self.MAX_MESSAGES:
            self._forget(record.created)
        self._shown[key] = record.created
        return True

    def _forget(self, now: float) -> None:
        for key, shown in list(self._shown.items()):
            if now - shown >= self._window_s:
                del self._shown[key]
                self._held.pop(key, None)
        if len(self._shown) >= self.MAX_MESSAGES:
            self._shown.clear()  # all recent and all different: nothing here repeats
            self._held.clear()


def pick_format(fmt: str, stream: TextIO) -> logging.Formatter:
    """``json``, ``text`` (the console format) or ``auto``: console on a terminal, else JSON."""
    is_tty = stream.isatty()
    if fmt == "json" or (fmt == "auto" and not is_tty):
        return JsonFormatter()
    return ConsoleFormatter(colour=is_tty and not os.environ.get("NO_COLOR"))


def configure_logging(*, level: str, fmt: str, stream: TextIO | None = None) -> None:
    out = stream if stream is not None else sys.stdout
    handler = logging.StreamHandler(out)
    handler.setFormatter(pick_format(fmt, out))
    handler.addFilter(RepeatedLineFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    aiokafka = logging.getLogger("aiokafka")
    aiokafka.setLevel(max(logging.getLevelName(level), logging.WARNING))
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    coordinator.filters[:] = [
        f for f in coordinator.filters if not isinstance(f, CoordinatorLookupFilter)
    ]
    coordinator.addFilter(CoordinatorLookupFilter())
