"""The progress view of ``make run``: one row per agency, for a person at a terminal.

On a terminal the rows are redrawn in place at the bottom while log lines keep scrolling above
them; elsewhere (a pipe, a file) each change is one plain line. The view only renders the
``AgencyProgress`` rows it is given, so any source of per-agency figures can feed it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

_RED, _YELLOW, _DIM, _RESET = "\x1b[31m", "\x1b[33m", "\x1b[2m", "\x1b[0m"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_HEADER = ("sandbox", "pending", "parked", "held")


@dataclass(frozen=True, slots=True)
class AgencyProgress:
    """What one agency's documents are doing: sent, waiting, parked, held, and its breaker."""

    agency: str
    in_sandbox: int
    pending: int
    parked: int
    held: int
    breaker: str
    paused: bool = False  # an operator paused the agency: nothing of it is sent
    backfill_paused: bool = False  # only its first publication waits (pause --backfill-only)


class ProgressView:
    """Prints lines and a block of agency rows; ``live`` redraws the block in place."""

    def __init__(self, stream: TextIO, *, live: bool | None = None) -> None:
        self._stream = stream
        self._live = stream.isatty() if live is None else live
        self._colour = self._live and not os.environ.get("NO_COLOR")
        self._block: list[str] = []  # the rows as drawn, redrawn after every line above them
        self._drawn = 0  # how many lines of the terminal the block occupies now
        self._last: dict[str, AgencyProgress] = {}
        self._last_footer = ""
        self._handlers: list[tuple[logging.StreamHandler[TextIO], TextIO]] = []

    @property
    def live(self) -> bool:
        return self._live

    def say(self, text: str) -> None:
        """One line above the block."""
        self.write_above(f"[local] {text}\n")

    def show(self, rows: Sequence[AgencyProgress], footer: str) -> None:
        """The current figures: redrawn in place when live, else a line per agency that changed."""
        if not self._live:
            for row in rows:
                if self._last.get(row.agency) != row:
                    self.say(_plain_row(row))
            if footer != self._last_footer:
                self.say(footer)
            self._last = {row.agency: row for row in rows}
            self._last_footer = footer
            return
        width = shutil.get_terminal_size().columns
        name = max((len(row.agency) for row in rows), default=6)
        header = f"{'agency':<{name}}  " + "  ".join(f"{h:>7}" for h in _HEADER) + "  breaker"
        lines = [self._paint(header, _DIM)]
        lines += [self._table_row(row, name) for row in rows]
        lines.append(self._paint(footer, _DIM))
        # A wrapped line would take two rows of the terminal and the erase would miss one.
        block = [_clip(line, width) for line in lines]
        if block != self._block:
            self._block = block
            self._erase()
            self._draw()

    def attach_logging(self) -> None:
        """Route the log handlers writing to our stream through the view, above the block."""
        if not self._live:
            return
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self._stream:
                previous = handler.setStream(_Above(self))
                if previous is not None:
                    self._handlers.append((handler, previous))

    def close(self) -> None:
        """Leave the last block on screen as the final state and give the log handlers back."""
        for handler, stream in self._handlers:
            handler.setStream(stream)
        self._handlers.clear()
        self._drawn = 0
        self._block = []

    def _table_row(self, row: AgencyProgress, name: int) -> str:
        figures = (row.in_sandbox, row.pending, row.parked, row.held)
        breaker = row.breaker
        if breaker == "open":
            breaker = self._paint(breaker, _RED)
        elif breaker == "half_open":
            breaker = self._paint(breaker, _YELLOW)
        if row.paused:
            breaker += "  " + self._paint("PAUSED", _YELLOW)
        elif row.backfill_paused:
            breaker += "  " + self._paint("PAUSED (backfill)", _YELLOW)
        return f"{row.agency:<{name}}  " + "  ".join(f"{n:>7}" for n in figures) + f"  {breaker}"

    def _paint(self, text: str, colour: str) -> str:
        return f"{colour}{text}{_RESET}" if self._colour else text

    def write_above(self, text: str) -> None:
        """Text (whole lines) above the block, which is redrawn below it."""
        self._erase()
        self._stream.write(text)
        if text.endswith("\n"):
            self._draw()
        self._stream.flush()

    def _erase(self) -> None:
        if self._drawn:
            # Cursor to the start of the block's first line, then clear to the end of the screen.
            self._stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        if self._block:
            self._stream.write("".join(line + "\n" for line in self._block))
            self._drawn = len(self._block)
        self._stream.flush()


class _Above:
    """A stream for a log handler: each line goes above the view's block."""

    def __init__(self, view: ProgressView) -> None:
        self._view = view

    def write(self, text: str) -> int:
        self._view.write_above(text)
        return len(text)

    def flush(self) -> None:
        return None


def _plain_row(row: AgencyProgress) -> str:
    return (
        f"{row.agency}: sandbox {row.in_sandbox}, pending {row.pending}, parked {row.parked}, "
        f"held {row.held}, breaker {row.breaker}{_pause_note(row)}"
    )


def _pause_note(row: AgencyProgress) -> str:
    if row.paused:
        return ", PAUSED"
    return ", PAUSED (backfill)" if row.backfill_paused else ""


def _clip(line: str, width: int) -> str:
    plain = _ANSI.sub("", line)
    return line if len(plain) < width else plain[: max(width - 1, 1)]
