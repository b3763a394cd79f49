"""The API the OpenAPI contract describes: condominia, and documents created, listed, replaced,
withdrawn.

By the time a handler runs, the request has passed the faults, Basic auth, the rate limit and the
contract check; what is left is the partner's own rules: rights on the condominium (403 when
another account has them, 404 when nobody does), a file that is a PDF of the announced size and
SHA-256, and JSON:API answers with links.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from hashlib import sha256
from typing import Any

from aiohttp import web

from consumer.local.sandbox.accounts import Account
from consumer.local.sandbox.contract import Call
from consumer.local.sandbox.jsonapi import error, json_response
from consumer.local.sandbox.storage import SandboxDocument, Storage

_NOT_ATTRIBUTES = frozenset({"id", "condominium_id", "created_by_hand"})


class ContractHandlers:
    """One method per operation of the contract; ``base_url`` is read when an answer links."""

    def __init__(
        self,
        *,
        storage: Storage,
        accounts: Mapping[str, Account],
        base_url: Callable[[], str],
    ) -> None:
        self._storage = storage
        self._accounts = accounts
        self._base_url = base_url

    async def get_condominium(self, request: web.Request, call: Call) -> web.Response:
        condominium_id = call.path["id"]
        if denied := self._access(call, condominium_id):
            return denied
        attributes = {"name": condominium_id}
        return json_response(
            200, {"data": {"type": "condominia", "id": condominium_id, "attributes": attributes}}
        )

    async def create_document(self, request: web.Request, call: Call) -> web.Response:
        condominium_id = call.path["condominium_id"]
        if denied := self._access(call, condominium_id):
            return denied
        attributes, file = call.body["data"]["data"]["attributes"], _file_of(call)
        if refused := _check_file(attributes, file):
            return refused
        storage = self._storage
        document = storage.store(storage.new_id(), condominium_id, attributes, file)
        storage.count_creation(attributes["reference"])
        location = f"{self._base_url()}/documents/{document.id}"
        return json_response(
            201, {"data": _resource(document, self._base_url())}, {"Location": location}
        )

    async def update_document(self, request: web.Request, call: Call) -> web.Response:
        found = self._owned(call, call.path["id"])
        if isinstance(found, web.Response):
            return found
        resource, file = call.body["data"]["data"], _file_of(call)
        if resource["id"] != found.id:
            return error(409, "conflict", "data.id differs from the URL", pointer="/data/id")
        if refused := _check_file(resource["attributes"], file):
            return refused
        document = self._storage.store(found.id, found.condominium_id, resource["attributes"], file)
        return json_response(200, {"data": _resource(document, self._base_url())})

    async def delete_document(self, request: web.Request, call: Call) -> web.Response:
        found = self._owned(call, call.path["id"])
        if isinstance(found, web.Response):
            return found
        self._storage.delete(found.id)
        return web.Response(status=204)

    async def list_documents(self, request: web.Request, call: Call) -> web.Response:
        condominium_id = call.query["filter[condominium]"]
        if denied := self._access(call, condominium_id):
            return denied
        reference = call.query.get("filter[reference]")
        matching = [
            d
            for d in self._storage.documents(condominium_id)
            if reference is None or d.reference == reference
        ]
        number, size = call.query["page[number]"], call.query["page[size]"]
        page = matching[(number - 1) * size : number * size]
        next_url = None
        if number * size < len(matching):
            next_url = str(request.url.update_query({"page[number]": str(number + 1)}))
        base_url = self._base_url()
        return json_response(
            200,
            {
                "data": [_resource(d, base_url) for d in page],
                "meta": {"total": len(matching)},
                "links": {"next": next_url},
            },
        )

    async def never_reached(self, request: web.Request, call: Call) -> web.Response:
        # The contract check answers 404/405 for every path and method it does not define.
        return error(404, "not_found", request.path)

    def _access(self, call: Call, condominium_id: str) -> web.Response | None:
        if condominium_id in call.account.condominia:
            return None
        if any(condominium_id in a.condominia for a in self._accounts.values()):
            detail = f"this key's user has no right on condominium {condominium_id}"
            return error(403, "forbidden", detail)
        return error(404, "not_found", f"no condominium {condominium_id}")

    def _owned(self, call: Call, remote_id: str) -> SandboxDocument | web.Response:
        found = self._storage.document(remote_id)
        if found is None:
            return error(404, "not_found", f"no document {remote_id}")
        return self._access(call, found.condominium_id) or found


def _file_of(call: Call) -> bytes:
    file: str = call.body["file"]
    return file.encode("latin-1")


def _check_file(attributes: Mapping[str, Any], file: bytes) -> web.Response | None:
    if not file.startswith(b"%PDF"):
        return error(422, "not_a_pdf", "the file part must be a PDF", parameter="file")
    if len(file) != attributes["size_bytes"]:
        detail = f"the file is {len(file)} bytes, size_bytes says {attributes['size_bytes']}"
        return error(422, "size_mismatch", detail, pointer="/data/attributes/size_bytes")
    if sha256(file).hexdigest() != attributes["sha256"]:
        detail = "the file's SHA-256 differs from the sha256 attribute"
        return error(422, "sha256_mismatch", detail, pointer="/data/attributes/sha256")
    return None


def _resource(document: SandboxDocument, base_url: str) -> dict[str, Any]:
    fields = dataclasses.asdict(document)
    attributes = {name: value for name, value in fields.items() if name not in _NOT_ATTRIBUTES}
    return {
        "type": "documents",
        "id": document.id,
        "attributes": attributes,
        "relationships": {
            "condominium": {"data": {"type": "condominia", "id": document.condominium_id}}
        },
        "links": {"self": f"{base_url}/documents/{document.id}"},
    }
