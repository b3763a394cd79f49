"""The make run progress view: rows redrawn in place on a terminal, log lines kept above them."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from dataclasses import replace

import pytest

from consumer.local.console import AgencyProgress, ProgressView

LYON = AgencyProgress("agence-lyon", in_sandbox=3, pending=5, parked=0, held=0, breaker="closed")
PARIS = AgencyProgress("agence-paris", in_sandbox=0, pending=2, parked=1, held=0, breaker="open")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = saved


def screen(output: str) -> list[str]:
    """What a terminal shows after ``output``: applies 'n lines up' + 'clear to the end'."""
    parts = re.split(r"\x1b\[(\d+)F\x1b\[J", output)
    lines = parts[0].splitlines()
    for up, text in zip(parts[1::2], parts[2::2], strict=True):
        del lines[len(lines) - int(up) :]
        lines += text.splitlines()
    return lines


def test_a_terminal_sees_one_block_redrawn_below_the_log_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(logging.INFO)
    view = ProgressView(out, live=True)
    view.attach_logging()

    view.show([LYON, PARIS], "dead letters 0")
    logging.getLogger("consumer.app.relay").info("partition restored")
    view.show([LYON, PARIS], "dead letters 0")  # unchanged: nothing is redrawn
    drawn = out.getvalue()
    view.show([AgencyProgress("agence-lyon", 8, 0, 0, 0, "closed"), PARIS], "dead letters 1")
    view.close()

    assert out.getvalue().startswith(drawn)
    shown = screen(out.getvalue())
    assert shown[0] == "partition restored"
    assert shown[1].split() == ["agency", "sandbox", "pending", "parked", "held", "breaker"]
    assert shown[2].split() == ["agence-lyon", "8", "0", "0", "0", "closed"]
    assert shown[3].split() == ["agence-paris", "0", "2", "1", "0", "open"]
    assert shown[4] == "dead letters 1"
    assert len(shown) == 5
    assert handler.stream is out  # the log handler writes straight to the stream again


def test_elsewhere_each_change_is_one_plain_line() -> None:
    out = io.StringIO()
    view = ProgressView(out)  # a StringIO is not a terminal
    view.show([LYON, PARIS], "dead letters 0")
    view.show([LYON, PARIS], "dead letters 0")
    view.show([LYON, replace(PARIS, pending=0)], "dead letters 0")
    assert "\x1b" not in out.getvalue()
    assert out.getvalue().splitlines() == [
        "[local] agence-lyon: sandbox 3, pending 5, parked 0, held 0, breaker closed",
        "[local] agence-paris: sandbox 0, pending 2, parked 1, held 0, breaker open",
        "[local] dead letters 0",
        "[local] agence-paris: sandbox 0, pending 0, parked 1, held 0, breaker open",
    ]


def test_a_paused_agency_says_so_in_its_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    out = io.StringIO()
    view = ProgressView(out, live=False)
    paused = AgencyProgress("agence-lyon", 3, 5, 0, 0, "closed", paused=True)
    view.show([paused], "dead letters 0")
    assert out.getvalue().splitlines()[0] == (
        "[local] agence-lyon: sandbox 3, pending 5, parked 0, held 0, breaker closed, PAUSED"
    )
    live = io.StringIO()
    table = ProgressView(live, live=True)
    table.show([paused], "dead letters 0")
    assert screen(live.getvalue())[1].split() == [
        "agence-lyon",
        "3",
        "5",
        "0",
        "0",
        "closed",
        "PAUSED",
    ]


def test_a_backfill_only_pause_says_its_scope_in_the_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    paused = AgencyProgress("agence-lyon", 3, 5, 0, 0, "closed", backfill_paused=True)
    out = io.StringIO()
    ProgressView(out, live=False).show([paused], "dead letters 0")
    assert out.getvalue().splitlines()[0].endswith("breaker closed, PAUSED (backfill)")
    live = io.StringIO()
    ProgressView(live, live=True).show([paused], "dead letters 0")
    assert screen(live.getvalue())[1].split()[-2:] == ["PAUSED", "(backfill)"]
