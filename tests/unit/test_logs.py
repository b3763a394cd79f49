"""Log formats: JSON for a collector, a readable console format on a terminal, quiet group joins."""

from __future__ import annotations

import io
import logging
import os
import pty
from collections.abc import Iterator
from typing import TextIO

import orjson
import pytest
from aiokafka.errors import GroupAuthorizationFailedError, GroupCoordinatorNotAvailableError

from consumer.ops.logs import (
    ConsoleFormatter,
    CoordinatorLookupFilter,
    JsonFormatter,
    RepeatedLineFilter,
    configure_logging,
    pick_format,
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    saved = (root.handlers[:], root.level, coordinator.filters[:])
    yield
    root.handlers[:], root.level, coordinator.filters[:] = saved[0], saved[1], saved[2]


def _record(
    msg: str = "partition restored",
    *,
    level: int = logging.INFO,
    name: str = "consumer.app.relay",
    args: tuple[object, ...] = (),
    created: float | None = None,
    **extra: object,
) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    if created is not None:
        record.created = created
    return record


def _log_through(stream: TextIO, fmt: str) -> None:
    configure_logging(level="INFO", fmt=fmt, stream=stream)
    logging.getLogger("consumer.app.relay").info(
        "partition restored", extra={"partition": 2, "records": 12}
    )
    stream.flush()


def test_a_terminal_gets_the_console_format() -> None:
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as terminal:
        _log_through(terminal, "auto")
        line = os.read(leader, 4096).decode()
    os.close(leader)
    assert not line.lstrip().startswith("{")
    assert "relay" in line
    assert "partition restored partition=2 records=12" in line.replace("\x1b[2m", "")


def test_a_pipe_gets_json() -> None:
    reader, writer = os.pipe()
    with os.fdopen(writer, "w") as pipe:
        _log_through(pipe, "auto")
    with os.fdopen(reader) as output:
        entry = orjson.loads(output.readline())
    assert entry["msg"] == "partition restored"
    assert entry["logger"] == "consumer.app.relay"
    assert (entry["level"], entry["partition"], entry["records"]) == ("info", 2, 12)


def test_explicit_formats_win_over_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as terminal:
        assert isinstance(pick_format("json", terminal), JsonFormatter)
        assert isinstance(pick_format("text", terminal), ConsoleFormatter)
    os.close(leader)
    assert isinstance(pick_format("text", io.StringIO()), ConsoleFormatter)


def test_colour_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    warning = _record("offset commit failed", level=logging.WARNING)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert "\x1b[" not in pick_format("text", io.StringIO()).format(warning)
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as terminal:
        assert "\x1b[33mWARN" in pick_format("auto", terminal).format(warning)
        monkeypatch.setenv("NO_COLOR", "1")
        assert "\x1b[" not in pick_format("auto", terminal).format(warning)
    os.close(leader)


def test_the_console_line_is_aligned_and_keeps_the_extras() -> None:
    formatter = ConsoleFormatter(colour=False)
    info = formatter.format(_record(partition=0, records=3))
    error = formatter.format(
        _record(
            "dead-lettered input record",
            level=logging.ERROR,
            name="consumer.kafka.deadletters",
            reason="not_json",
            detail="the value is not JSON",
        )
    )
    # time, level and logger name take the same width on every line: messages start together
    assert info.index("partition restored") == error.index("dead-lettered input record")
    assert info.endswith("partition restored partition=0 records=3")
    assert error.endswith("reason=not_json detail='the value is not JSON'")


def test_an_exception_is_indented_under_its_line() -> None:
    error = ValueError("boom")
    record = _record("partition work failed; stopping", level=logging.ERROR)
    record.exc_info = (ValueError, error, None)
    first, *rest = ConsoleFormatter(colour=False).format(record).splitlines()
    assert first.endswith("partition work failed; stopping")
    assert rest
    assert all(line.startswith("    ") for line in rest)
    assert rest[-1].strip() == "ValueError: boom"


def _lookup_failed(error: Exception, at: float) -> logging.LogRecord:
    return _record(
        CoordinatorLookupFilter.MESSAGE,
        level=logging.ERROR,
        name="aiokafka.consumer.group_coordinator",
        args=(error,),
        created=at,
    )


def test_a_coordinator_being_created_is_not_an_error() -> None:
    lookups = CoordinatorLookupFilter(grace_s=30.0)
    records = [
        _lookup_failed(GroupCoordinatorNotAvailableError(), 1000.0 + i * 0.1) for i in range(5)
    ]
    assert [lookups.filter(r) for r in records] == [False] * 5
    assert all(r.levelno == logging.DEBUG for r in records)


def test_a_coordinator_missing_beyond_the_grace_keeps_its_error_level() -> None:
    lookups = CoordinatorLookupFilter(grace_s=30.0)
    start = 1000.0
    for second in range(31):
        lookups.filter(_lookup_failed(GroupCoordinatorNotAvailableError(), start + second))
    late = _lookup_failed(GroupCoordinatorNotAvailableError(), start + 31.0)
    assert lookups.filter(late)
    assert late.levelno == logging.ERROR


def test_other_lookup_errors_and_other_messages_stay_visible() -> None:
    lookups = CoordinatorLookupFilter()
    refused = _lookup_failed(GroupAuthorizationFailedError(), 1000.0)
    assert lookups.filter(refused)
    assert refused.levelno == logging.ERROR
    other = _record(
        "Heartbeat failed: %s", level=logging.ERROR, args=(GroupCoordinatorNotAvailableError(),)
    )
    assert lookups.filter(other)


def test_a_coordinator_marked_dead_is_lowered_its_cause_keeps_its_level() -> None:
    lookups = CoordinatorLookupFilter()
    moved = _record(
        CoordinatorLookupFilter.MOVED,
        level=logging.WARNING,
        name="aiokafka.consumer.group_coordinator",
        args=(1, "chouette-relay"),
    )
    assert not lookups.filter(moved)
    expired = _record(
        "Heartbeat session expired - marking coordinator dead",
        level=logging.ERROR,
        name="aiokafka.consumer.group_coordinator",
    )
    assert lookups.filter(expired)
    assert expired.levelno == logging.ERROR


def test_what_aiokafka_repeats_during_an_outage_is_shown_once() -> None:
    stream = io.StringIO()
    configure_logging(level="INFO", fmt="json", stream=stream)
    conn, fetcher = logging.getLogger("aiokafka.conn"), logging.getLogger("aiokafka.consumer")
    for attempt in range(300):  # what a few seconds of a broker away look like
        conn.error("Unable connect to node with id %s: %s", 1, f"refused ({attempt})")
        fetcher.error("Failed fetch messages from %s: %s", 1, "NodeNotReadyError")
        logging.getLogger("consumer.app.relay").warning("offset commit failed")

    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]

    assert [line["logger"] for line in lines].count("aiokafka.conn") == 1
    assert [line["logger"] for line in lines].count("aiokafka.consumer") == 1
    assert [line["msg"] for line in lines].count("offset commit failed") == 300  # the relay's own


def test_the_next_line_shown_says_how_many_were_held_back() -> None:
    repeats = RepeatedLineFilter(window_s=60.0)
    message = "Unable to update metadata from [%s]"

    shown = [
        repeats.filter(_record(message, name="aiokafka.cluster", args=(1,), created=t))
        for t in (0.0, 10.0, 20.0, 59.0)
    ]
    later = _record(message, name="aiokafka.cluster", args=(1,), created=61.0)

    assert shown == [True, False, False, False]
    assert repeats.filter(later)
    assert later.__dict__["repeated"] == 3
    other_level = _record(message, level=logging.WARNING, name="aiokafka.cluster", created=62.0)
    assert repeats.filter(other_level)  # a message at another level is another message


def test_messages_a_library_formats_itself_do_not_grow_the_memory() -> None:
    repeats = RepeatedLineFilter(window_s=60.0)
    for number in range(5 * RepeatedLineFilter.MAX_MESSAGES):
        assert repeats.filter(_record(f"node {number} down", name="aiokafka.conn", created=1.0))
    assert len(repeats._shown) <= RepeatedLineFilter.MAX_MESSAGES
