"""The ChouetteCopro client against the sandbox: operations, error mapping, and key secrecy;
against loopback servers of its own: answers too large to read and ids that could leave the API's
paths."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email.utils
import hashlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from consumer.core.events import Audience, Content, Document, Module
from consumer.errors import (
    PartnerError,
    PartnerParkedError,
    PartnerRejectedError,
    PartnerRetriableError,
    RelayError,
    RemoteIdError,
)
from consumer.failures import Disposition, Scope, classify
from consumer.local.pdf import make_pdf
from consumer.local.sandbox import Answer, RateLimit, SandboxServer, Scripted
from consumer.partner.answers import RemoteDocument
from consumer.partner.client import JSON_API, ChouetteCoproClient
from consumer.partner.keys import ApiKeyStore
from tests.fixtures.partner import AGENCY_A_KEY, SandboxFactory

AGENCY = "agence-a"


def lsc_document(
    doc_id: str = "evt-1:att-1", title: str = "PV AG 2024", **changes: Any
) -> tuple[Document, bytes]:
    pdf = make_pdf(title)
    content = Content(
        media_type="application/pdf",
        size_bytes=len(pdf),
        sha256=hashlib.sha256(pdf).hexdigest(),
        url="https://lsc.example/documents/x.pdf",
    )
    fields: dict[str, Any] = {
        "id": doc_id,
        "module": Module.AG,
        "category": "Procès-verbal",
        "title": title,
        "document_date": dt.date(2024, 3, 12),
        "audience": Audience.BUILDING,
        "content": content,
        **changes,
    }
    return Document(**fields), pdf


@dataclass
class Observations:
    calls: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, operation: str, status: str, seconds: float) -> None:
        assert seconds >= 0
        self.calls.append((operation, status))


def make_client(
    base_url: str, *, key: str = AGENCY_A_KEY, timeout_s: float = 5.0, observe: Any = None
) -> ChouetteCoproClient:
    return ChouetteCoproClient(
        base_url=base_url,
        api_keys=ApiKeyStore.from_mapping({AGENCY: key}),
        timeout_s=timeout_s,
        user_agent="chouette-relay-tests",
        observe=observe,
    )


@pytest.fixture
def observations() -> Observations:
    return Observations()


@pytest.fixture
async def client(
    sandbox: SandboxServer, observations: Observations
) -> AsyncIterator[ChouetteCoproClient]:
    async with make_client(sandbox.base_url, observe=observations) as client:
        yield client


async def upload(client: ChouetteCoproClient, doc_id: str = "evt-1:att-1") -> RemoteDocument:
    document, pdf = lsc_document(doc_id)
    return await client.upload(
        agency_id=AGENCY, condominium_id="c-1", document=document, content=pdf
    )


# -- operations ------------------------------------------------------------------------------


async def test_upload_publishes_the_document_with_its_lsc_id_as_reference(
    client: ChouetteCoproClient, sandbox: SandboxServer, observations: Observations
) -> None:
    document, pdf = lsc_document()

    remote = await client.upload(
        agency_id=AGENCY, condominium_id="c-1", document=document, content=pdf
    )

    assert remote.reference == document.id
    assert remote.sha256 == document.content.sha256
    [stored] = sandbox.documents("c-1")
    assert (stored.id, stored.reference, stored.title, stored.module, stored.document_date) == (
        remote.remote_id,
        "evt-1:att-1",
        "PV AG 2024",
        "ag",
        "2024-03-12",
    )
    assert observations.calls == [("upload", "201")]


async def test_find_by_reference_finds_only_the_relays_document(
    client: ChouetteCoproClient, sandbox: SandboxServer
) -> None:
    sandbox.seed_manual_document("c-1", "Affiche")
    remote = await upload(client, "evt-1:att-1")
    await upload(client, "evt-2:att-1")

    found = await client.find_by_reference(
        agency_id=AGENCY, condominium_id="c-1", reference="evt-1:att-1"
    )
    missing = await client.find_by_reference(
        agency_id=AGENCY, condominium_id="c-2", reference="evt-1:att-1"
    )

    assert found == remote
    assert missing is None


async def test_update_replaces_content_under_the_same_remote_id(
    client: ChouetteCoproClient, sandbox: SandboxServer
) -> None:
    remote = await upload(client)
    document, pdf = lsc_document(title="PV AG 2024 (rectifié)")

    updated = await client.update(
        agency_id=AGENCY, remote_id=remote.remote_id, document=document, content=pdf
    )

    assert updated.remote_id == remote.remote_id
    assert updated.sha256 == hashlib.sha256(pdf).hexdigest() != remote.sha256
    [stored] = sandbox.documents("c-1")
    assert (stored.title, stored.sha256) == ("PV AG 2024 (rectifié)", updated.sha256)
    assert sandbox.create_count(document.id) == 1


async def test_delete_twice_is_fine(
    client: ChouetteCoproClient, sandbox: SandboxServer, observations: Observations
) -> None:
    remote = await upload(client)

    await client.delete(agency_id=AGENCY, remote_id=remote.remote_id)
    await client.delete(agency_id=AGENCY, remote_id=remote.remote_id)

    assert sandbox.documents() == []
    assert observations.calls[-2:] == [("delete", "204"), ("delete", "404")]


async def test_closing_twice_is_harmless(sandbox: SandboxServer) -> None:
    client = make_client(sandbox.base_url)
    async with client:
        await upload(client)
    await client.close()


# -- error mapping against the sandbox -------------------------------------------------------


async def test_rate_limit_is_retriable_with_the_partners_retry_after(
    sandbox_factory: SandboxFactory,
) -> None:
    sandbox = await sandbox_factory(rate_limit=RateLimit(rate_per_s=0.25, burst=1))
    async with make_client(sandbox.base_url) as client:
        await upload(client)
        with pytest.raises(PartnerRetriableError) as caught:
            await upload(client, "evt-2:att-1")

    assert (caught.value.status, caught.value.retry_after) == (429, 4.0)
    assert "rate_limited" in str(caught.value)


async def test_outage_is_retriable(client: ChouetteCoproClient, sandbox: SandboxServer) -> None:
    sandbox.set_faults(outage_seconds=30)

    with pytest.raises(PartnerRetriableError) as caught:
        await upload(client)

    assert (caught.value.status, caught.value.retry_after) == (503, 30.0)


async def test_random_5xx_is_retriable_without_retry_after(
    client: ChouetteCoproClient, sandbox: SandboxServer
) -> None:
    sandbox.set_faults(error_rate=1.0)

    with pytest.raises(PartnerRetriableError) as caught:
        await client.delete(agency_id=AGENCY, remote_id="doc-000001")

    assert (caught.value.status, caught.value.retry_after) == (503, None)


async def test_timeout_is_retriable_and_observed(
    sandbox: SandboxServer, observations: Observations
) -> None:
    sandbox.set_faults(latency_ms=2000)
    async with make_client(sandbox.base_url, timeout_s=0.1, observe=observations) as client:
        with pytest.raises(PartnerRetriableError, match="timed out") as caught:
            await upload(client)

        document, pdf = lsc_document()
        with pytest.raises(PartnerRetriableError, match="timed out") as updated:
            await client.update(
                agency_id=AGENCY, remote_id="doc-000001", document=document, content=pdf
            )
        with pytest.raises(PartnerRetriableError, match="timed out") as looked_up:
            await client.find_by_reference(agency_id=AGENCY, condominium_id="c-1", reference="x")
        with pytest.raises(PartnerRetriableError, match="timed out") as withdrawn:
            await client.delete(agency_id=AGENCY, remote_id="doc-000001")

    assert observations.calls == [
        ("upload", "timeout"),
        ("update", "timeout"),
        ("find_by_reference", "timeout"),
        ("delete", "timeout"),
    ]
    assert caught.value.in_doubt  # a create sent, and no answer: it may still be carried out
    assert updated.value.in_doubt  # an update too: it may land after the document's next one
    assert not looked_up.value.in_doubt  # a lookup or a withdrawal of an id twice changes nothing
    assert not withdrawn.value.in_doubt


async def test_connection_refused_is_retriable(observations: Observations) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with make_client(f"http://127.0.0.1:{port}/api/v1", observe=observations) as client:
        with pytest.raises(PartnerRetriableError, match="cannot reach") as caught:
            await upload(client)

    assert observations.calls == [("upload", "network")]
    assert not caught.value.in_doubt  # nothing was sent: no doubt about the outcome


async def test_unknown_key_parks_the_agency(sandbox: SandboxServer) -> None:
    async with make_client(sandbox.base_url, key="revoked-key") as client:
        with pytest.raises(PartnerParkedError) as caught:
            await upload(client)

    assert caught.value.status == 401


async def test_missing_key_parks_without_calling_the_partner(
    client: ChouetteCoproClient, sandbox: SandboxServer
) -> None:
    document, pdf = lsc_document()

    with pytest.raises(PartnerParkedError, match="no ChouetteCopro API key for agency agence-z"):
        await client.upload(
            agency_id="agence-z", condominium_id="c-1", document=document, content=pdf
        )

    assert sandbox.request_count() == 0


async def test_condominium_of_another_account_parks(
    sandbox_factory: SandboxFactory,
) -> None:
    sandbox = await sandbox_factory(accounts={AGENCY_A_KEY: {"c-1"}, "key-agence-b": {"c-9"}})
    document, pdf = lsc_document()
    async with make_client(sandbox.base_url) as client:
        with pytest.raises(PartnerParkedError) as forbidden:
            await client.upload(
                agency_id=AGENCY, condominium_id="c-9", document=document, content=pdf
            )
        with pytest.raises(PartnerParkedError) as unknown:
            await client.upload(
                agency_id=AGENCY, condominium_id="c-404", document=document, content=pdf
            )

    assert (forbidden.value.status, unknown.value.status) == (403, 404)


async def test_content_that_does_not_match_its_attributes_is_rejected(
    client: ChouetteCoproClient,
) -> None:
    document, _ = lsc_document()
    other_pdf = make_pdf("another document")

    with pytest.raises(PartnerRejectedError) as caught:
        await client.upload(
            agency_id=AGENCY, condominium_id="c-1", document=document, content=other_pdf
        )

    assert caught.value.status == 422
    assert "size_mismatch" in str(caught.value) or "sha256_mismatch" in str(caught.value)


async def test_individual_documents_are_refused_by_the_contract(
    client: ChouetteCoproClient,
) -> None:
    document, pdf = lsc_document(audience=Audience.INDIVIDUAL)

    with pytest.raises(PartnerRejectedError, match=r"invalid_request.*audience"):
        await client.upload(agency_id=AGENCY, condominium_id="c-1", document=document, content=pdf)


async def test_updating_a_document_deleted_by_hand_is_rejected_as_404(
    client: ChouetteCoproClient,
) -> None:
    remote = await upload(client)
    await client.delete(agency_id=AGENCY, remote_id=remote.remote_id)
    document, pdf = lsc_document()

    with pytest.raises(PartnerRejectedError) as caught:
        await client.update(
            agency_id=AGENCY, remote_id=remote.remote_id, document=document, content=pdf
        )

    assert caught.value.status == 404


# -- error mapping against a scripted server (answers the sandbox never gives) ----------------


@dataclass
class ScriptedPartner:
    """Answers every request with ``status``, ``headers`` and ``body``; echoes auth if asked."""

    base_url: str = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    echo_authorization: bool = False

    async def handle(self, request: web.Request) -> web.Response:
        body = self.body
        if self.echo_authorization:
            header = request.headers.get("Authorization", "")
            credentials = base64.b64decode(header.removeprefix("Basic ")).decode()
            error = {"status": "401", "code": "unauthorized", "detail": f"bad key {credentials}"}
            body = orjson.dumps({"errors": [error]})
        return web.Response(status=self.status, headers=self.headers, body=body)


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedPartner]:
    partner = ScriptedPartner()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", partner.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    partner.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/api/v1"
    yield partner
    await runner.cleanup()


def jsonapi_error(status: int, code: str, detail: str) -> bytes:
    return orjson.dumps({"errors": [{"status": str(status), "code": code, "detail": detail}]})


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, PartnerRejectedError),
        (409, PartnerRejectedError),
        (413, PartnerRejectedError),
        (422, PartnerRejectedError),
        (401, PartnerParkedError),
        (403, PartnerParkedError),
        (405, PartnerParkedError),
        (415, PartnerParkedError),
        (408, PartnerRetriableError),
        (429, PartnerRetriableError),
        (500, PartnerRetriableError),
        (502, PartnerRetriableError),
    ],
)
async def test_each_status_maps_to_the_errors_nature(
    scripted: ScriptedPartner, status: int, expected: type[PartnerError]
) -> None:
    scripted.status = status
    scripted.body = jsonapi_error(status, "some_code", "what went wrong")

    async with make_client(scripted.base_url) as client:
        with pytest.raises(expected) as caught:
            await upload(client)

    assert caught.value.status == status
    assert f"answered {status}: some_code: what went wrong" in str(caught.value)


async def test_retry_after_as_an_http_date(scripted: ScriptedPartner) -> None:
    in_two_minutes = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120)
    scripted.status = 429
    scripted.headers = {"Retry-After": email.utils.format_datetime(in_two_minutes, usegmt=True)}

    async with make_client(scripted.base_url) as client:
        with pytest.raises(PartnerRetriableError) as caught:
            await upload(client)

    assert caught.value.retry_after is not None
    assert 100 < caught.value.retry_after <= 120


async def test_garbage_retry_after_is_ignored(scripted: ScriptedPartner) -> None:
    scripted.status = 503
    scripted.headers = {"Retry-After": "soon"}

    async with make_client(scripted.base_url) as client:
        with pytest.raises(PartnerRetriableError) as caught:
            await upload(client)

    assert caught.value.retry_after is None


async def test_a_created_answer_without_a_resource_is_an_unknown_outcome(
    scripted: ScriptedPartner,
) -> None:
    scripted.status = 201
    scripted.body = b"<html>oops</html>"

    async with make_client(scripted.base_url) as client:
        with pytest.raises(PartnerRetriableError, match="no resource object"):
            await upload(client)


# -- the API key never leaks -----------------------------------------------------------------

SECRET = "s3cr3t-key-agence-a-0123456789"


def _texts_of(error: BaseException) -> Iterator[str]:
    current: BaseException | None = error
    while current is not None:
        yield str(current)
        yield repr(current)
        yield from (str(arg) for arg in current.args)
        current = current.__cause__ or current.__context__


async def error_of(call: Awaitable[object]) -> PartnerError:
    with pytest.raises(PartnerError) as caught:
        await call
    return caught.value


async def test_the_api_key_never_appears_in_errors_reprs_or_logs(
    sandbox_factory: SandboxFactory,
    scripted: ScriptedPartner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    sandbox = await sandbox_factory(accounts={SECRET: {"c-1"}}, rate_limit=RateLimit(0.1, 1))
    scripted.status = 401
    scripted.echo_authorization = True  # a partner that repeats the key in its error detail
    document, pdf = lsc_document()
    errors: list[PartnerError] = []
    texts: list[str] = []

    async with make_client(sandbox.base_url, key=SECRET) as client:
        texts.append(repr(client))
        await client.upload(agency_id=AGENCY, condominium_id="c-1", document=document, content=pdf)
        errors.append(await error_of(client.delete(agency_id=AGENCY, remote_id="doc-000001")))
    async with make_client(scripted.base_url, key=SECRET) as client:
        errors.append(await error_of(client.delete(agency_id=AGENCY, remote_id="doc-000001")))

    store = ApiKeyStore.from_mapping({AGENCY: SECRET})
    texts += [repr(store), str(store), repr(store.require(AGENCY)), caplog.text]
    texts += [text for error in errors for text in _texts_of(error)]
    assert [type(e) for e in errors] == [PartnerRetriableError, PartnerParkedError]
    assert any("bad key ***" in text for text in texts), "the echoed key is masked"
    assert not [text for text in texts if SECRET in text]


# -- API keys from a mounted Secret ----------------------------------------------------------


def mount_secret(directory: Path, keys: dict[str, str], version: str) -> None:
    """Lay files out as the kubelet does: ``..data`` -> ``..<version>``, names link into it."""
    target = directory / f"..{version}"
    target.mkdir()
    for agency, key in keys.items():
        (target / agency).write_text(key)
    (directory / "..data_tmp").symlink_to(target.name)
    os.replace(directory / "..data_tmp", directory / "..data")
    for agency in keys:
        link = directory / agency
        if not link.is_symlink():
            link.symlink_to(Path("..data") / agency)


def test_keys_are_read_from_a_mounted_secret_and_reloaded(tmp_path: Path) -> None:
    mount_secret(tmp_path, {"agence-a": "key-a\n", "agence-b": "  key-b  "}, "2024_01")
    (tmp_path / ".hidden").write_text("not a key")

    store = ApiKeyStore(tmp_path)
    before = (store.agencies(), store.require("agence-a").get_secret_value())
    mount_secret(tmp_path, {"agence-a": "key-a-rotated", "agence-b": "key-b"}, "2024_02")
    store.reload()

    assert before == (frozenset({"agence-a", "agence-b"}), "key-a")
    assert store.require("agence-a").get_secret_value() == "key-a-rotated"
    assert store.get("agence-c") is None
    assert "key-a" not in repr(store)


def test_empty_key_files_and_odd_names_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "agence-a").write_text("   \n")
    (tmp_path / "not an agency").write_text("key")
    (tmp_path / "agence-b").write_text("key-b")

    assert ApiKeyStore(tmp_path).agencies() == frozenset({"agence-b"})


# -- outcomes in doubt ---------------------------------------------------------------------


async def test_a_create_given_up_on_is_in_doubt_and_may_still_land(
    sandbox: SandboxServer,
) -> None:
    sandbox.script("POST", Scripted(Answer.LATE, delay_s=1.5))
    async with make_client(sandbox.base_url, timeout_s=0.5) as client:
        with pytest.raises(PartnerRetriableError) as raised:
            await upload(client)
        assert raised.value.in_doubt
        assert sandbox.documents("c-1") == []
        for _ in range(50):  # the partner carries it out after the relay gave up
            if sandbox.documents("c-1"):
                break
            await asyncio.sleep(0.1)
        assert [d.reference for d in sandbox.documents("c-1")] == ["evt-1:att-1"]


@pytest.mark.parametrize(("status", "in_doubt"), [(502, True), (504, True), (503, False)])
async def test_a_gateway_that_gave_up_leaves_the_outcome_in_doubt(
    sandbox: SandboxServer, status: int, in_doubt: bool
) -> None:
    async def gateway(request: web.Request) -> web.Response:
        return web.Response(status=status, text="<html>gateway</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", gateway)
    async with TestServer(app) as server, make_client(str(server.make_url("/api/v1"))) as client:
        with pytest.raises(PartnerRetriableError) as raised:
            await upload(client)
    assert raised.value.in_doubt is in_doubt


# -- answers beyond the size limit ---------------------------------------------------------

MIB = 1024 * 1024
HUGE_ANSWER_BYTES = 512 * MIB


@dataclass
class HugeAnswer:
    """A partner that carries a create out and answers 201 with 512 MiB: blanks, then the
    resource (valid JSON, for a client that reads it whole), streamed a MiB at a time and never
    held; ``sent`` counts what left the server before the client hung up."""

    declare_length: bool
    sent: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resource = orjson.dumps(
            {
                "data": {
                    "type": "documents",
                    "id": "doc-000001",
                    "attributes": {"reference": "evt-1:att-1", "title": "PV AG 2024"},
                }
            }
        )
        response = web.StreamResponse(status=201, headers={"Content-Type": JSON_API})
        if self.declare_length:
            response.content_length = HUGE_ANSWER_BYTES + len(resource)
        blanks = b" " * MIB
        try:
            await response.prepare(request)
            for _ in range(HUGE_ANSWER_BYTES // MIB):
                await response.write(blanks)
                self.sent += len(blanks)
            await response.write(resource)
            await response.write_eof()
        except ConnectionError:
            pass  # the client hung up: what an answer too large to read should get
        finally:
            self.done.set()
        return response


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "chunked"])
async def test_a_512_mib_answer_is_not_read_whole_nor_counted_a_success(
    declare_length: bool, observations: Observations
) -> None:
    partner = HugeAnswer(declare_length)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", partner.handle)
    async with TestServer(app) as server:
        # A timeout long enough to read it all: only the size limit may stop the client.
        base_url = str(server.make_url("/api/v1"))
        async with make_client(base_url, timeout_s=300, observe=observations) as client:
            with pytest.raises(PartnerRetriableError, match="more than 4194304 bytes") as raised:
                await upload(client)
        await asyncio.wait_for(partner.done.wait(), timeout=60)

    assert partner.sent < 64 * MIB, "the client hung up at the limit, it did not read it all"
    assert raised.value.status == 201
    # The partner answered: no settle wait; the retry looks the reference up before sending.
    assert not raised.value.in_doubt
    assert observations.calls == [("upload", "too_large")]


async def test_a_lookup_answered_beyond_the_limit_finds_nothing_and_is_retried(
    scripted: ScriptedPartner,
) -> None:
    found = {"type": "documents", "id": "doc-000001", "attributes": {"reference": "evt-1:att-1"}}
    padding = {"type": "documents", "id": "doc-000002", "attributes": {"title": "x" * 100}}
    scripted.status = 200
    scripted.body = orjson.dumps({"data": [found] + [padding] * 50_000})  # about 6 MiB

    async with make_client(scripted.base_url) as client:
        with pytest.raises(PartnerRetriableError, match="more than 4194304 bytes") as raised:
            await client.find_by_reference(
                agency_id=AGENCY, condominium_id="c-1", reference="evt-1:att-1"
            )

    assert raised.value.status == 200


async def test_a_refusal_beyond_the_limit_still_says_when_to_come_back(
    scripted: ScriptedPartner, observations: Observations
) -> None:
    scripted.status = 429
    scripted.headers = {"Retry-After": "7"}
    scripted.body = b" " * (5 * MIB)

    async with make_client(scripted.base_url, observe=observations) as client:
        with pytest.raises(PartnerRetriableError) as raised:
            await upload(client)

    assert (raised.value.status, raised.value.retry_after) == (429, 7.0)
    assert observations.calls == [("upload", "too_large")]


# -- ids in URLs ---------------------------------------------------------------------------

HOSTILE_IDS = [
    "../../../admin/x",
    "..",
    ".",
    "doc-1/../../admin",
    "c-1/documents",
    "doc-1?filter[condominium]=c-9",
    "doc-1#x",
    "%2e%2e",
    "%2e%2e%2fadmin",
    "doc-1%2F..",
    "doc-1\n",
    "",
    "doc 1",
    "dôc-1",
    "d" * 65,
]


@dataclass
class RecordingPartner:
    """Answers every request as the contract's success would, and records each request's path
    as it came on the wire; ``resource_id`` is the id its answers give."""

    base_url: str = ""
    resource_id: str = "doc-000001"
    received: list[tuple[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.received.append((request.method, request.raw_path))
        resource = {
            "type": "documents",
            "id": self.resource_id,
            "attributes": {"reference": "evt-1:att-1", "title": "PV AG 2024"},
        }
        if request.method == "DELETE":
            return web.Response(status=204)
        if request.method == "GET":
            return web.json_response({"data": [resource]}, content_type=JSON_API)
        status = 201 if request.method == "POST" else 200
        return web.json_response({"data": resource}, status=status, content_type=JSON_API)


@pytest.fixture
async def recording() -> AsyncIterator[RecordingPartner]:
    partner = RecordingPartner()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", partner.handle)
    async with TestServer(app) as server:
        partner.base_url = str(server.make_url("/api/v1"))
        yield partner


@pytest.mark.parametrize("remote_id", HOSTILE_IDS)
async def test_a_remote_id_not_of_the_contracts_form_is_never_sent(
    recording: RecordingPartner, remote_id: str
) -> None:
    document, pdf = lsc_document()
    refused: dict[str, Exception | None] = {}

    async def attempt(operation: str, call: Awaitable[object]) -> None:
        try:
            await call
        except RelayError as error:
            refused[operation] = error
        else:
            refused[operation] = None

    async with make_client(recording.base_url) as client:
        await attempt("delete", client.delete(agency_id=AGENCY, remote_id=remote_id))
        await attempt(
            "update",
            client.update(agency_id=AGENCY, remote_id=remote_id, document=document, content=pdf),
        )
        await attempt(
            "upload",
            client.upload(
                agency_id=AGENCY, condominium_id=remote_id, document=document, content=pdf
            ),
        )
        await attempt(
            "find_by_reference",
            client.find_by_reference(
                agency_id=AGENCY, condominium_id=remote_id, reference="evt-1:att-1"
            ),
        )

    assert recording.received == [], "no request is made with such an id"
    assert {op: type(error) for op, error in refused.items()} == dict.fromkeys(
        ("delete", "update", "upload", "find_by_reference"), RemoteIdError
    )
    # The document's work is parked for an operator; the partner is not blamed for it.
    verdict = classify(refused["delete"] or Exception(), Scope.RELAY)
    assert (verdict.disposition, verdict.reason, verdict.from_partner) == (
        Disposition.PARK,
        "bad_remote_id",
        False,
    )


async def test_ids_of_the_contracts_form_go_into_the_apis_paths_as_they_are(
    recording: RecordingPartner,
) -> None:
    document, pdf = lsc_document()

    async with make_client(recording.base_url) as client:
        await client.upload(agency_id=AGENCY, condominium_id="8841", document=document, content=pdf)
        await client.update(
            agency_id=AGENCY, remote_id="Doc_01.v2-x", document=document, content=pdf
        )
        await client.delete(agency_id=AGENCY, remote_id="a..b")

    assert recording.received == [
        ("POST", "/api/v1/condominia/8841/documents"),
        ("PATCH", "/api/v1/documents/Doc_01.v2-x"),
        ("DELETE", "/api/v1/documents/a..b"),
    ]


@pytest.mark.parametrize("remote_id", ["../../../admin/x", "doc-1/../x", "doc-1?x=1", "%2e%2e"])
async def test_a_partner_answer_with_an_id_not_of_the_contracts_form_parks_the_document(
    recording: RecordingPartner, remote_id: str
) -> None:
    recording.resource_id = remote_id

    async with make_client(recording.base_url) as client:
        with pytest.raises(PartnerParkedError, match="not in the contract") as created:
            await upload(client)
        with pytest.raises(PartnerParkedError, match="not in the contract") as found:
            await client.find_by_reference(
                agency_id=AGENCY, condominium_id="c-1", reference="evt-1:att-1"
            )

    # Never recorded, so never put into a later URL; an operator must look at the partner.
    assert [classify(e.value).disposition for e in (created, found)] == [Disposition.PARK] * 2
    assert [method for method, _ in recording.received] == ["POST", "GET"]
