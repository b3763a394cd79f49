"""The ChouetteCopro sandbox implements the OpenAPI contract, its rate limits and its faults.

Requests are sent with plain aiohttp (not the relay's client) so that the contract itself is
under test; answers are checked against the same OpenAPI file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from yarl import URL

from consumer.local.pdf import make_pdf
from consumer.local.sandbox import SCHEMA_PATH, Account, RateLimit, SandboxServer, load_accounts
from tests.fixtures.partner import AGENCY_A_KEY, SandboxFactory

CONTRACT = OpenAPI.from_file_path(str(SCHEMA_PATH))
OTHER_KEY = "key-agence-b"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _ContractRequest:
    def __init__(self, method: str, url: URL, body: bytes | None, content_type: str) -> None:
        self.method = method.lower()
        self.host_url = f"{url.scheme}://{url.host}"
        self.path = url.path
        self.body = body
        self.content_type = content_type
        self.parameters = RequestParameters(query=url.query, header=CIMultiDict(), cookie={})


class _ContractResponse:
    def __init__(self, status: int, headers: CIMultiDict[str], data: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.data = data
        self.content_type = headers.get("Content-Type", "")


class Api:
    """Raw HTTP against the sandbox; every answer is validated against the contract."""

    def __init__(self, session: aiohttp.ClientSession, sandbox: SandboxServer) -> None:
        self.session = session
        self.sandbox = sandbox

    async def call(
        self,
        method: str,
        path: str,
        *,
        key: str | None = AGENCY_A_KEY,
        password: str = "",
        params: Mapping[str, str] | None = None,
        form: aiohttp.FormData | None = None,
        validate: bool = True,
    ) -> tuple[int, CIMultiDict[str], Any]:
        url = URL(self.sandbox.base_url + path).with_query(params)
        authorization = {"Authorization": basic(key, password)} if key is not None else {}
        async with self.session.request(method, url, headers=authorization, data=form) as response:
            raw = await response.read()
            headers = CIMultiDict(response.headers)
            if validate:
                CONTRACT.validate_response(
                    _ContractRequest(method, url, None, ""),
                    _ContractResponse(response.status, headers, raw),
                )
            return response.status, headers, orjson.loads(raw) if raw else None


def basic(key: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{key}:{password}".encode()).decode()


def attributes(
    reference: str = "lsc-1", pdf: bytes | None = None, **changes: Any
) -> dict[str, Any]:
    content = make_pdf(f"Document {reference}") if pdf is None else pdf
    return {
        "reference": reference,
        "title": f"Document {reference}",
        "category": "Procès-verbal",
        "document_date": "2024-03-12",
        "module": "ag",
        "audience": "building",
        "sha256": hashlib.sha256(content).hexdigest(),
        "size_bytes": len(content),
        **changes,
    }


def document_form(resource: Mapping[str, Any] | None, file: bytes | None) -> aiohttp.FormData:
    form = aiohttp.FormData()
    if resource is not None:
        form.add_field(
            "data", json.dumps({"data": resource}), content_type="application/vnd.api+json"
        )
    if file is not None:
        form.add_field("file", file, filename="d.pdf", content_type="application/pdf")
    return form


def upload_form(reference: str = "lsc-1", **changes: Any) -> aiohttp.FormData:
    pdf = make_pdf(f"Document {reference}")
    resource = {"type": "documents", "attributes": attributes(reference, pdf, **changes)}
    return document_form(resource, pdf)


@pytest.fixture
async def api(sandbox: SandboxServer) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, sandbox)


@pytest.fixture
async def two_agencies(sandbox_factory: SandboxFactory) -> AsyncIterator[Api]:
    sandbox = await sandbox_factory(
        accounts={AGENCY_A_KEY: {"c-1", "c-2"}, OTHER_KEY: {"c-9"}}, keep_bytes=True
    )
    async with aiohttp.ClientSession() as session:
        yield Api(session, sandbox)


async def test_upload_stores_the_document_under_a_server_assigned_id(
    two_agencies: Api,
) -> None:
    pdf = make_pdf("AG 2024")
    resource = {"type": "documents", "attributes": attributes("lsc-1", pdf)}

    status, headers, body = await two_agencies.call(
        "POST", "/condominia/c-1/documents", form=document_form(resource, pdf)
    )

    assert status == 201
    remote_id = body["data"]["id"]
    assert headers["Location"].endswith(f"/documents/{remote_id}")
    assert body["data"]["attributes"]["reference"] == "lsc-1"
    [stored] = two_agencies.sandbox.documents("c-1")
    assert (stored.id, stored.sha256, stored.size_bytes) == (
        remote_id,
        hashlib.sha256(pdf).hexdigest(),
        len(pdf),
    )
    assert two_agencies.sandbox.content_of(remote_id) == pdf
    assert two_agencies.sandbox.create_count("lsc-1") == 1


@pytest.mark.parametrize(
    ("form", "pointer"),
    [
        (lambda: upload_form(document_date="12/03/2024"), "/data/data/attributes/document_date"),
        (lambda: upload_form(audience="individual"), "/data/data/attributes/audience"),
        (lambda: upload_form(sha256="ABC"), "/data/data/attributes/sha256"),
        (lambda: upload_form(extra="nope"), "/data/data/attributes"),
        (lambda: document_form({"type": "condominia", "attributes": attributes()}, b"%PDF"), None),
        (lambda: document_form(None, make_pdf("x")), ""),
        (lambda: document_form({"type": "documents", "attributes": attributes()}, None), ""),
    ],
    ids=["bad-date", "individual", "bad-sha", "extra-attr", "wrong-type", "no-data", "no-file"],
)
async def test_an_upload_that_breaks_the_contract_is_refused_with_422(
    api: Api, form: Callable[[], aiohttp.FormData], pointer: str | None
) -> None:
    status, _, body = await api.call("POST", "/condominia/c-1/documents", form=form())

    assert status == 422
    assert {e["code"] for e in body["errors"]} == {"invalid_request"}
    if pointer is not None:
        assert pointer in [e["source"]["pointer"] for e in body["errors"]]
    assert api.sandbox.documents() == []


@pytest.mark.parametrize(
    ("file", "changes", "code"),
    [
        (b"<html>not a pdf</html>", {}, "not_a_pdf"),
        (make_pdf("one"), {"sha256": hashlib.sha256(b"other").hexdigest()}, "sha256_mismatch"),
        (make_pdf("one"), {"size_bytes": 3}, "size_mismatch"),
    ],
)
async def test_the_file_must_be_the_pdf_the_attributes_describe(
    api: Api, file: bytes, changes: dict[str, Any], code: str
) -> None:
    resource = {"type": "documents", "attributes": attributes("lsc-1", file, **changes)}

    status, _, body = await api.call(
        "POST", "/condominia/c-1/documents", form=document_form(resource, file)
    )

    assert (status, body["errors"][0]["code"]) == (422, code)


@pytest.mark.parametrize(
    ("key", "password"),
    [(None, ""), ("unknown-key", ""), (AGENCY_A_KEY, "not-empty")],
    ids=["no-auth", "unknown-key", "password-set"],
)
async def test_requests_without_a_valid_key_get_401(
    api: Api, key: str | None, password: str
) -> None:
    status, headers, body = await api.call("GET", "/condominia/c-1", key=key, password=password)

    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Basic")
    assert body["errors"][0]["code"] == "unauthorized"


async def test_a_key_only_reaches_its_own_condominia(two_agencies: Api) -> None:
    _, _, created = await two_agencies.call("POST", "/condominia/c-9/documents",
                                            key=OTHER_KEY, form=upload_form())  # fmt: skip
    other_document = created["data"]["id"]

    assert (await two_agencies.call("GET", "/condominia/c-1"))[0] == 200
    assert (await two_agencies.call("GET", "/condominia/c-9"))[0] == 403
    assert (await two_agencies.call("GET", "/condominia/c-404"))[0] == 404
    upload = await two_agencies.call("POST", "/condominia/c-9/documents", form=upload_form())
    assert upload[0] == 403
    listing = await two_agencies.call("GET", "/documents", params={"filter[condominium]": "c-9"})
    assert listing[0] == 403
    assert (await two_agencies.call("DELETE", f"/documents/{other_document}"))[0] == 403
    assert len(two_agencies.sandbox.documents("c-9")) == 1


async def test_update_replaces_the_file_and_delete_is_gone_afterwards(api: Api) -> None:
    _, _, created = await api.call("POST", "/condominia/c-1/documents", form=upload_form())
    remote_id = created["data"]["id"]
    pdf = make_pdf("AG 2024, corrected")
    resource = {"type": "documents", "id": remote_id, "attributes": attributes("lsc-1", pdf)}

    status, _, updated = await api.call(
        "PATCH", f"/documents/{remote_id}", form=document_form(resource, pdf)
    )

    assert status == 200
    assert updated["data"]["attributes"]["sha256"] == hashlib.sha256(pdf).hexdigest()
    assert api.sandbox.create_count("lsc-1") == 1
    assert (await api.call("DELETE", f"/documents/{remote_id}"))[0] == 204
    assert (await api.call("DELETE", f"/documents/{remote_id}"))[0] == 404
    assert api.sandbox.documents() == []


async def test_update_with_an_id_that_differs_from_the_url_is_a_conflict(api: Api) -> None:
    _, _, created = await api.call("POST", "/condominia/c-1/documents", form=upload_form())
    pdf = make_pdf("x")
    resource = {"type": "documents", "id": "doc-999999", "attributes": attributes("lsc-1", pdf)}

    status, _, body = await api.call(
        "PATCH", f"/documents/{created['data']['id']}", form=document_form(resource, pdf)
    )

    assert (status, body["errors"][0]["code"]) == (409, "conflict")


async def test_documents_are_found_by_reference_and_hand_made_ones_have_none(api: Api) -> None:
    manual_id = api.sandbox.seed_manual_document("c-1", "Affiche du local vélos")
    for reference in ("lsc-1", "lsc-2", "lsc-1"):
        await api.call("POST", "/condominia/c-1/documents", form=upload_form(reference))

    _, _, by_reference = await api.call(
        "GET", "/documents", params={"filter[condominium]": "c-1", "filter[reference]": "lsc-1"}
    )
    _, _, everything = await api.call("GET", "/documents", params={"filter[condominium]": "c-1"})

    assert [d["attributes"]["reference"] for d in by_reference["data"]] == ["lsc-1", "lsc-1"]
    assert everything["meta"]["total"] == 4
    assert everything["data"][0]["id"] == manual_id
    assert everything["data"][0]["attributes"]["reference"] is None
    assert api.sandbox.duplicated_references() == {"lsc-1": 2}


async def test_listing_pages_through_links_next(api: Api) -> None:
    for n in range(3):
        await api.call("POST", "/condominia/c-1/documents", form=upload_form(f"lsc-{n}"))

    _, _, first = await api.call(
        "GET", "/documents", params={"filter[condominium]": "c-1", "page[size]": "2"}
    )
    authorization = {"Authorization": basic(AGENCY_A_KEY)}
    async with api.session.get(first["links"]["next"], headers=authorization) as r:
        second = await r.json(content_type=None)

    assert [len(first["data"]), len(second["data"])] == [2, 1]
    assert second["links"]["next"] is None


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"filter[reference]": "lsc-1"}, "filter[condominium]"),
        ({"filter[condominium]": "c-1", "page[size]": "500"}, "page[size]"),
    ],
)
async def test_bad_query_parameters_get_422_naming_the_parameter(
    api: Api, params: dict[str, str], parameter: str
) -> None:
    status, _, body = await api.call("GET", "/documents", params=params)

    assert status == 422
    assert body["errors"][0]["source"] == {"parameter": parameter}


async def test_paths_and_methods_outside_the_contract(api: Api) -> None:
    assert (await api.call("GET", "/buildings/c-1", validate=False))[0] == 404
    assert (await api.call("PUT", "/documents/doc-000001", validate=False))[0] == 405


async def test_rate_limit_answers_429_with_retry_after_and_records_early_requests(
    sandbox_factory: SandboxFactory,
) -> None:
    clock = FakeClock()
    sandbox = await sandbox_factory(rate_limit=RateLimit(rate_per_s=0.5, burst=2), clock=clock)
    async with aiohttp.ClientSession() as session:
        api = Api(session, sandbox)
        statuses = [(await api.call("GET", "/condominia/c-1"))[0] for _ in range(2)]
        status, headers, body = await api.call("GET", "/condominia/c-1")

        assert statuses == [200, 200]
        assert (status, headers["Retry-After"], body["errors"][0]["code"]) == (
            429,
            "2",
            "rate_limited",
        )
        assert sandbox.early_request_count() == 0

        clock.now += 1  # half the wait: too early
        early = await api.call("GET", "/condominia/c-1")
        assert (early[0], early[1]["Retry-After"]) == (429, "1")
        assert sandbox.early_request_count(AGENCY_A_KEY) == 1

        clock.now += 1  # Retry-After honoured: a token is back
        assert (await api.call("GET", "/condominia/c-1"))[0] == 200
        assert sandbox.early_request_count() == 1
        assert sandbox.request_count("GET", 429) == 2


async def test_rate_limits_are_per_key(sandbox_factory: SandboxFactory) -> None:
    accounts = {
        AGENCY_A_KEY: Account(frozenset({"c-1"}), RateLimit(rate_per_s=0.1, burst=1)),
        OTHER_KEY: Account(frozenset({"c-9"})),
    }
    sandbox = await sandbox_factory(accounts=accounts, clock=FakeClock())
    async with aiohttp.ClientSession() as session:
        api = Api(session, sandbox)
        assert (await api.call("GET", "/condominia/c-1"))[0] == 200
        assert (await api.call("GET", "/condominia/c-1"))[0] == 429
        for _ in range(5):
            assert (await api.call("GET", "/condominia/c-9", key=OTHER_KEY))[0] == 200


async def test_faults_are_set_and_cleared_through_the_control_endpoint(
    sandbox_factory: SandboxFactory,
) -> None:
    clock = FakeClock()
    sandbox = await sandbox_factory(clock=clock)
    control = sandbox.base_url.removesuffix("/api/v1") + "/_sandbox/faults"
    async with aiohttp.ClientSession() as session:
        api = Api(session, sandbox)

        async with session.post(control, json={"outage_seconds": 60}) as response:
            assert response.status == 200
        outage = await api.call("GET", "/condominia/c-1")
        async with session.delete(control) as response:
            assert response.status == 200
        clock.now += 60
        after_outage = await api.call("GET", "/condominia/c-1")

        async with session.post(control, json={"storm_seconds": 10}):
            pass
        storm = await api.call("GET", "/condominia/c-1")
        clock.now += 10  # the storm ends by itself
        after_storm = await api.call("GET", "/condominia/c-1")

        async with session.post(control, json={"error_rate": 1.0}):
            pass
        error = await api.call("GET", "/condominia/c-1")
        sandbox.clear_faults()
        healthy = await api.call("GET", "/condominia/c-1")

        async with session.post(control, json={"error_rate": 2}) as response:
            assert response.status == 400

    assert (outage[0], outage[1]["Retry-After"]) == (503, "60")
    assert (storm[0], storm[1]["Retry-After"]) == (429, "10")
    assert (error[0], error[2]["errors"][0]["code"]) == (503, "unavailable")
    assert "Retry-After" not in error[1]
    assert [after_outage[0], after_storm[0], healthy[0]] == [200, 200, 200]
    assert sandbox.early_request_count() == 0


async def test_a_storm_retry_after_is_owed_by_the_key_that_received_it(
    sandbox_factory: SandboxFactory,
) -> None:
    clock = FakeClock()
    sandbox = await sandbox_factory(clock=clock)
    sandbox.set_faults(storm_seconds=30, storm_retry_after_s=5)
    async with aiohttp.ClientSession() as session:
        api = Api(session, sandbox)
        assert (await api.call("GET", "/condominia/c-1"))[0] == 429
        sandbox.clear_faults()
        clock.now += 4
        assert (await api.call("GET", "/condominia/c-1"))[0] == 429
        clock.now += 1
        assert (await api.call("GET", "/condominia/c-1"))[0] == 200
    assert sandbox.early_request_count() == 1


async def test_injected_latency_delays_answers(api: Api) -> None:
    api.sandbox.set_faults(latency_ms=200)
    started = time.monotonic()

    status, _, _ = await api.call("GET", "/condominia/c-1")

    assert status == 200
    assert time.monotonic() - started >= 0.2


async def test_state_endpoint_shows_documents_counts_and_no_keys(api: Api) -> None:
    await api.call("POST", "/condominia/c-1/documents", form=upload_form("lsc-7"))
    await api.call("GET", "/condominia/c-1", key="wrong")
    state_url = api.sandbox.base_url.removesuffix("/api/v1") + "/_sandbox/state"

    async with api.session.get(state_url) as response:
        raw = await response.read()
    state = orjson.loads(raw)

    [document] = state["documents"]["c-1"]
    assert (document["reference"], document["created_by_hand"]) == ("lsc-7", False)
    assert state["create_counts"] == {"lsc-7": 1}
    assert {"method": "GET", "status": 401, "count": 1} in state["requests"]
    assert AGENCY_A_KEY.encode() not in raw


async def test_manual_documents_can_be_seeded_over_http(api: Api) -> None:
    url = api.sandbox.base_url.removesuffix("/api/v1") + "/_sandbox/manual-documents"

    async with api.session.post(url, json={"condominium_id": "c-2", "title": "Affiche"}) as r:
        created = await r.json()

    [document] = api.sandbox.documents("c-2")
    assert (document.id, document.reference, document.created_by_hand) == (
        created["id"],
        None,
        True,
    )


def test_accounts_file_accepts_plain_lists_and_rate_limits(tmp_path: Path) -> None:
    path = tmp_path / "accounts.json"
    path.write_text(
        json.dumps({"a": ["c-1"], "b": {"condominia": ["c-2"], "rate_per_s": 2, "burst": 5}})
    )

    assert load_accounts(path) == {
        "a": Account(frozenset({"c-1"})),
        "b": Account(frozenset({"c-2"}), RateLimit(rate_per_s=2, burst=5)),
    }
