"""Dead letters for the operator: listed from any pod, replayed to their source once.

A document refused because of the relay's own configuration (its content host not allowed) is
dead-lettered. Once the configuration is fixed, the operator replays it: the original record goes
back to its source partition with a header naming the dead-lettered offset, is processed, and the
document is sent once. A second replay of the same record is refused unless forced, and a forced
one changes nothing on the partner (the view knows the document is published).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.ops import replay as replay_module
from consumer.ops.admin import Operator
from consumer.ops.replay import REPLAY_HEADER
from consumer.settings import ContentSettings
from tests.fixtures.relay import AgencySpec, RelayWorld, WorldFactory
from tests.integration.operator_helpers import call, cli, token_http

pytestmark = pytest.mark.integration

AGENCY = "agence-a"


async def _letters(world: RelayWorld, reason: str) -> list[dict[str, Any]]:
    return [d for d in await world.dead_letters() if d["reason"] == reason]


async def _copies_read(world: RelayWorld, letter: dict[str, Any]) -> list[Any]:
    """The copies of ``letter`` in its source partition, as the relay reads it."""
    source = letter["source"]
    reader = AIOKafkaConsumer(
        bootstrap_servers=world.bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await reader.start()
    try:
        tp = TopicPartition(source["topic"], source["partition"])
        reader.assign([tp])
        end = (await reader.end_offsets([tp]))[tp]
        reader.seek(tp, source["offset"] + 1)
        found = []
        while await reader.position(tp) < end:
            for record in (await reader.getmany(tp, timeout_ms=500)).get(tp, []):
                if (REPLAY_HEADER, letter["id"].encode()) in record.headers:
                    found.append(record)
        return found
    finally:
        await reader.stop()


async def test_a_dead_letter_is_replayed_once_after_the_fix_and_processed_once(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    http = token_http(world.tmp)
    relay = await world.start_relay(http=http, content=ContentSettings(allowed_hosts=("cdn.lsc",)))
    document = world.document(title="Contrat d'ascenseur")
    await world.publish(world.document_created(AGENCY, "bat-1", document))
    await world.publish_raw(world.documents_topic, key=b"agence-a:bat-1", value=b"{not json")

    async def both_dead_lettered() -> bool:
        return bool(await _letters(world, "content_rejected") and await _letters(world, "not_json"))

    await world.wait_until(both_dead_lettered, what="two dead letters")
    listed = (await cli(world, "dead-letters"))["dead_letters"]
    assert {(d["reason"], d["key"], d["source"]["topic"]) for d in listed} == {
        ("content_rejected", "agence-a:bat-1", world.documents_topic),
        ("not_json", "agence-a:bat-1", world.documents_topic),
    }
    [rejected] = [d for d in listed if d["reason"] == "content_rejected"]
    source = rejected["source"]
    assert rejected["id"] == f"{source['topic']}/{source['partition']}/{source['offset']}"
    assert (await cli(world, "dead-letters", "--reason", "not_json"))["dead_letters"] == [
        d for d in listed if d["reason"] == "not_json"
    ]
    assert world.partner_references("c-1") == {}

    # The operator fixes the allowlist and restarts, then replays the refused document.
    await world.stop_relay(relay)
    relay = await world.start_relay(http=http)
    replayed = await cli(world, "replay", rejected["id"])

    assert [r["outcome"] for r in replayed["replayed"]] == ["replayed"]
    assert replayed["replayed"][0]["partition"] == source["partition"]
    await world.wait_until(
        lambda: world.partner_references("c-1") == {document["id"]: document["content"]["sha256"]},
        what="the replayed document on the partner",
    )
    copies = [
        r
        for r in await world.read_topic(world.documents_topic)
        if (REPLAY_HEADER, rejected["id"].encode()) in r.headers
    ]
    assert len(copies) == 1
    assert copies[0].key == b"agence-a:bat-1"
    assert ("event-type", b"document-created") in copies[0].headers

    again = await cli(world, "replay", rejected["id"], expect=1)
    assert again["replayed"] == [
        {
            "id": rejected["id"],
            "outcome": "refused",
            "why": "replayed already; use --force to replay it again",
        }
    ]
    status, forced = await call(
        relay,
        "POST",
        "/admin/dead-letters/replay",
        token=True,
        body={"ids": [rejected["id"]], "force": True},
    )
    assert status == 200
    assert [r["outcome"] for r in forced["replayed"]] == ["replayed"]

    async def forced_copy_processed() -> bool:
        committed: dict[str, int] = relay.status()["partitions"][str(source["partition"])][
            "committable"
        ]
        return committed.get(world.documents_topic, 0) > int(forced["replayed"][0]["offset"])

    await world.wait_until(forced_copy_processed, what="the forced copy processed")
    assert world.sandbox.create_count(document["id"]) == 1
    assert world.sandbox.request_count("PATCH") == 0
    assert len(await _letters(world, "content_rejected")) == 1  # no copy was refused again


async def test_replay_needs_a_selection_and_the_token(relay_world: WorldFactory) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await world.start_relay(http=token_http(world.tmp))

    assert (await call(relay, "POST", "/admin/dead-letters/replay", body={"ids": []}))[0] == 401
    status, body = await call(relay, "POST", "/admin/dead-letters/replay", token=True, body={})
    assert status == 400
    assert "name the dead letters" in body["error"]
    status, body = await call(
        relay, "POST", "/admin/dead-letters/replay", token=True, body={"ids": ["t/0/1"]}
    )
    assert (status, body) == (  # the only dead letter named is unknown: a 404
        404,
        {
            "error": "no such dead letter",
            "replayed": [{"id": "t/0/1", "outcome": "refused", "why": "no such dead letter"}],
        },
    )
    status, body = await call(
        relay, "POST", "/admin/dead-letters/replay", token=True, body={"ids": ["../x"]}
    )
    assert status == 400
    assert "is not a dead letter id" in body["error"]


async def test_a_replay_refused_again_is_listed_as_a_replay_of_the_first_dead_letter(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    await world.start_relay()
    await world.publish_raw(world.documents_topic, key=b"agence-a:bat-1", value=b"{not json")

    async def dead_lettered(count: int) -> bool:
        return len(await _letters(world, "not_json")) == count

    await world.wait_until(lambda: dead_lettered(1), what="the poison record dead-lettered")
    [first] = (await cli(world, "dead-letters"))["dead_letters"]
    assert first["replay_of"] is None

    # Not JSON: no fix of the relay makes the same bytes pass, so a replay needs --force.
    refused = await cli(world, "replay", first["id"], expect=1)
    assert refused["replayed"] == [
        {
            "id": first["id"],
            "outcome": "refused",
            "why": "not_json: the same bytes would be refused again; use --force",
        }
    ]
    assert await dead_lettered(1)
    await cli(world, "replay", first["id"], "--force")  # nothing was fixed: it fails the same way

    await world.wait_until(lambda: dead_lettered(2), what="the replayed copy dead-lettered")
    listed = (await cli(world, "dead-letters"))["dead_letters"]
    assert [d["replay_of"] for d in listed] == [None, first["id"]]
    # A reason selects the original alone, never the dead letter of a replayed copy.
    again = await cli(world, "replay", "--reason", "not_json", expect=1)
    assert [r["id"] for r in again["replayed"]] == [first["id"]]
    assert await dead_lettered(2)


async def test_two_concurrent_replays_of_a_dead_letter_write_one_copy(
    relay_world: WorldFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await world.start_relay(content=ContentSettings(allowed_hosts=("cdn.lsc",)))
    document = world.document()
    await world.publish(world.document_created(AGENCY, "bat-1", document))

    async def dead_lettered() -> bool:
        return bool(await _letters(world, "content_rejected"))

    await world.wait_until(dead_lettered, what="a dead letter")
    await world.stop_relay(relay)
    await world.start_relay()  # the allowlist fixed
    [letter] = (await cli(world, "dead-letters"))["dead_letters"]
    assert (letter["replayed"], letter["replayed_at"]) == (False, None)

    # The race at its worst: each run has looked for an earlier copy before either writes one.
    both_looked = asyncio.Barrier(2)
    look = replay_module.replayed_already

    async def look_then_wait(*args: Any, **kwargs: Any) -> Any:
        found = await look(*args, **kwargs)
        await both_looked.wait()
        return found

    monkeypatch.setattr(replay_module, "replayed_already", look_then_wait)

    async def run() -> list[dict[str, Any]]:
        async with Operator(world.settings()) as operator:
            return await operator.replay([letter["id"]])

    runs = await asyncio.wait_for(asyncio.gather(run(), run()), timeout=60)
    monkeypatch.undo()

    assert sorted(report[0]["outcome"] for report in runs) == ["refused", "replayed"]
    [copy] = await _copies_read(world, letter)
    await world.wait_until(
        lambda: world.partner_references("c-1") == {document["id"]: document["content"]["sha256"]},
        what="the replayed document on the partner",
    )
    assert world.sandbox.create_count(document["id"]) == 1
    [listed] = (await cli(world, "dead-letters"))["dead_letters"]
    assert listed["replayed"] is True
    replayed_at = dt.datetime.fromisoformat(listed["replayed_at"])
    assert replayed_at == dt.datetime.fromtimestamp(copy.timestamp / 1000, dt.UTC)
