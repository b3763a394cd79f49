"""The audit: what ChouetteCopro holds with the relay's references, against the relay's view.

Someone deleted relay-made documents in the app (one from a manifest, one from a document-created
event), replaced another's file, and a duplicate copy exists; a hand-made document sits beside
them. The audit lists exactly those findings and leaves the hand-made one out; the repair deletes
the duplicate and sends the deleted and the replaced documents again at once, read again from the
relay's input, without waiting for LSC's next manifest. The hand-made document is never touched,
nothing is created more than twice, and a second audit finds nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest

from consumer.app.relay import Relay
from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory, metric
from tests.integration.operator_helpers import call, cli, token_http

pytestmark = pytest.mark.integration

AGENCY = "agence-a"


def _idle(relay: Relay) -> bool:
    return all(p["pending_operations"] == 0 for p in relay.status()["partitions"].values())


def _remote_id(world: RelayWorld, document: Json) -> str:
    [found] = [d.id for d in world.sandbox.documents() if d.reference == document["id"]]
    return found


async def _manifest(world: RelayWorld, building: str, documents: list[Json], hours: int) -> None:
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours)
    await world.publish(*world.manifest_parts(AGENCY, building, documents, taken_at=taken_at))


async def test_the_audit_finds_what_changed_on_the_partner_and_the_repair_settles_it(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1", "bat-2": "c-2"})}
    )
    relay = await world.start_relay(http=token_http(world.tmp))
    first = [world.document() for _ in range(4)]
    second = [world.document() for _ in range(2)]
    await _manifest(world, "bat-1", first, hours=3)
    await _manifest(world, "bat-2", second, hours=3)
    late = world.document()  # published by an event after the manifest
    await world.publish(world.document_created(AGENCY, "bat-1", late))
    await world.wait_until(
        lambda: len(world.partner_references()) == 7 and _idle(relay), what="7 published"
    )
    manual = world.sandbox.seed_manual_document("c-1", "Affiche posée à la main")
    deleted, replaced = first[0], first[1]
    world.sandbox.delete_by_hand(_remote_id(world, deleted))
    world.sandbox.delete_by_hand(_remote_id(world, late))
    replaced_id = _remote_id(world, replaced)
    world.sandbox.replace_file_by_hand(replaced_id, hashlib.sha256(b"other").hexdigest())
    copy = world.sandbox.seed_copy(_remote_id(world, first[2]))

    report = await cli(world, "audit", "--agency", AGENCY)

    assert report["findings"] == {"missing": 2, "unexpected": 1, "changed": 1}
    c1, c2 = report["condominia"]
    assert (c1["condominium"], c1["hand_made"], c1["relay_documents"]) == ("c-1", 1, 5)
    assert sorted(f["document_id"] for f in c1["missing"]) == sorted([deleted["id"], late["id"]])
    assert [(f["document_id"], f["remote_id"]) for f in c1["unexpected"]] == [
        (first[2]["id"], copy)
    ]
    assert [(f["document_id"], f["remote_id"]) for f in c1["changed"]] == [
        (replaced["id"], replaced_id)
    ]
    assert (c2["missing"], c2["unexpected"], c2["changed"]) == ([], [], [])
    only_bat_2 = await cli(world, "audit", "--agency", AGENCY, "--building", "bat-2")
    assert [c["condominium"] for c in only_bat_2["condominia"]] == ["c-2"]

    status, repaired = await call(relay, "POST", f"/admin/audit/repair?agency={AGENCY}", token=True)
    assert status == 202
    assert [(r["building"], r["findings"]) for r in repaired["repairs"]] == [("bat-1", 4)]
    await world.wait_until(lambda: world.sandbox.document(copy) is None, what="the copy deleted")
    assert await metric(relay, "chouette_relay_audit_findings", agency=AGENCY, kind="missing") == 2

    # No new manifest: the repair itself sends the missing and the replaced documents again.
    expected = {d["id"]: d["content"]["sha256"] for d in [*first, late]}
    await world.wait_until(
        lambda: world.partner_references("c-1") == expected and _idle(relay),
        what="the missing and the replaced documents sent again",
    )
    assert world.sandbox.document(manual) is not None
    assert world.sandbox.document(replaced_id) is not None  # updated in place, not duplicated
    references = [d.reference for d in world.sandbox.documents("c-1") if d.reference]
    assert sorted(references) == sorted(expected)  # one copy each
    created = {ref: world.sandbox.create_count(ref) for ref in [*expected, *map(_id, second)]}
    assert created == {ref: 2 if ref in (deleted["id"], late["id"]) else 1 for ref in created}
    assert world.partner_references("c-2") == {d["id"]: d["content"]["sha256"] for d in second}
    again = await cli(world, "audit", "--agency", AGENCY)
    assert again["findings"] == {"missing": 0, "unexpected": 0, "changed": 0}


def _id(document: Json) -> str:
    return str(document["id"])
