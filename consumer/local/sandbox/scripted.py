"""Scripted answers: what the next requests of a method get instead of their normal answer.

A script is a queue per HTTP method. A refusal is answered without doing the work; a spoilt answer
(malformed, a proxy's HTML page, a hang) comes after the work was done, and a late one does the
work only after a delay (the client has given up by then), which is how the tests reach an
outcome the relay cannot know. ``echo_credentials`` plays a careless partner.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import urllib.parse
from collections import defaultdict, deque
from dataclasses import dataclass
from enum import StrEnum

import orjson
from aiohttp import web

from consumer.local.sandbox.jsonapi import JSON_API, error


class Answer(StrEnum):
    """A scripted answer to one API request; see ``SandboxServer.script``."""

    REFUSE = "refuse"  # not carried out: ``status`` with a JSON:API error
    BAD_JSON = "bad_json"  # carried out: its status, and a body that is not JSON
    HTML_502 = "html_502"  # carried out: a proxy's HTML 502 page instead of the answer
    ERROR_200 = "error_200"  # not carried out: 200 with a JSON:API error body
    HANG = "hang"  # carried out: no answer comes until the sandbox closes
    LATE = "late"  # carried out after ``delay_s``, when the client has usually given up
    ECHO_CREDENTIALS = "echo_credentials"  # not carried out: ``status``, echoing the key


@dataclass(frozen=True, slots=True)
class Scripted:
    """One scripted answer and, for refusals, its status; for a late one, its delay."""

    answer: Answer
    status: int = 422
    delay_s: float = 0.0

    @property
    def carried_out(self) -> bool:
        return self.answer in (Answer.BAD_JSON, Answer.HTML_502, Answer.HANG, Answer.LATE)


class Script:
    """The scripted answers not given yet, per HTTP method, in order."""

    def __init__(self) -> None:
        self._queues: defaultdict[str, deque[Scripted]] = defaultdict(deque)

    def add(self, method: str, answers: tuple[Scripted, ...]) -> None:
        self._queues[method.upper()].extend(answers)

    def next(self, method: str) -> Scripted | None:
        """The answer scripted for this request, taken from the queue, or None."""
        queue = self._queues.get(method)
        return queue.popleft() if queue else None

    def left(self, method: str | None = None) -> int:
        if method is not None:
            return len(self._queues[method.upper()])
        return sum(len(queue) for queue in self._queues.values())

    def clear(self) -> None:
        self._queues.clear()


def refusal(scripted: Scripted, request: web.Request) -> web.Response:
    """The answer to a request the script refuses (it is not carried out)."""
    if scripted.answer is Answer.ERROR_200:
        return error(200, "unprocessable", "the document could not be stored")
    if scripted.answer is Answer.ECHO_CREDENTIALS:
        return echo_credentials(scripted.status, request.headers.get("Authorization", ""))
    return error(scripted.status, "refused", "scripted refusal")


async def late(scripted: Scripted, request: web.Request, closing: asyncio.Event) -> None:
    """Before a late request's work: the whole request is received (the client may be gone
    when the work starts), then its delay passes, cut short when the sandbox closes."""
    if scripted.answer is Answer.LATE:
        await request.read()  # kept by aiohttp for the work's own read
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), scripted.delay_s)


async def spoil(scripted: Scripted, done: web.Response, closing: asyncio.Event) -> web.Response:
    """The answer to a request that was carried out, spoilt as scripted."""
    if scripted.answer is Answer.LATE:
        return done  # its lateness was the fault
    if scripted.answer is Answer.HANG:
        await closing.wait()  # the client gives up first; closing ends the wait
        return done
    if scripted.answer is Answer.HTML_502:
        page = "<html><body><h1>502 Bad Gateway</h1></body></html>"
        return web.Response(status=502, text=page, content_type="text/html")
    return web.Response(status=done.status, body=b'{"data": {"type": "documents", "id": ')


def echo_credentials(status: int, authorization: str) -> web.Response:
    """A careless partner's error: the credentials it got, in every form it might echo them."""
    _, _, encoded = authorization.partition(" ")
    try:
        key = base64.b64decode(encoded).decode().removesuffix(":")
    except ValueError:
        key = ""
    as_json = orjson.dumps(key).decode()  # then quoted again, so its escapes stay in the text
    errors = [
        {
            "status": str(status),
            "code": "invalid_credentials",
            "title": f"Authorization: {authorization}",
            "detail": f"the key {key} (as JSON {as_json}) was refused",
            "source": {"header": authorization},
        },
        {
            "status": str(status),
            "code": "echo",
            "title": urllib.parse.quote(key, safe=""),
            "detail": f"query api_key={urllib.parse.quote_plus(key)}",
        },
    ]
    # ASCII-only JSON with escaped slashes: the key's bytes appear nowhere raw in the body.
    body = json.dumps({"errors": errors}, ensure_ascii=True).replace("/", "\\/")
    return web.Response(status=status, body=body.encode(), content_type=JSON_API)
