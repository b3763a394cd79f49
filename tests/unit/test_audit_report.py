"""An audit read by a person: totals first, then only what differs, a few documents per kind.

Twenty clean condominia are one line, not 282 lines of JSON; the JSON stays for ``--json`` and
pipes.
"""

from __future__ import annotations

from typing import Any

from consumer.ops.audit import render_audit


def _condominium(number: int, **findings: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "condominium": f"c-{number}",
        "buildings": [f"bat-{number}"],
        "relay_documents": 1000,
        "partner_documents": 1000,
        "hand_made": 1,
        "missing": findings.get("missing", []),
        "unexpected": findings.get("unexpected", []),
        "changed": findings.get("changed", []),
    }


def _report(condominia: list[dict[str, Any]]) -> dict[str, Any]:
    kinds = ("missing", "unexpected", "changed")
    return {
        "agency": "agence-grenoble",
        "findings": {kind: sum(len(c[kind]) for c in condominia) for kind in kinds},
        "condominia": condominia,
        "requests": {
            "sent": 200,
            "per_second_at_most": 1.0,
            "share_of_agency_rate": 0.2,
            "agency_limiter": True,
        },
    }


def test_a_clean_audit_of_twenty_condominia_is_three_lines() -> None:
    text = render_audit(_report([_condominium(n) for n in range(20)]))
    assert text.splitlines() == [
        "agence-grenoble: 20 condominia audited, 20000 documents published by the relay (20 made "
        "by hand on ChouetteCopro, never touched)",
        "  no difference between ChouetteCopro and the relay's view",
        "  requests: 200 sent, at most 1/s (20% of the agency's rate), through the replica's "
        "limiter",
    ]


def test_findings_are_listed_by_condominium_and_kind_and_a_long_list_is_cut() -> None:
    missing = [
        {"building": "bat-3", "document_id": f"d-{n}", "remote_id": f"r-{n}"} for n in range(12)
    ]
    changed = [{"building": "bat-5", "document_id": "d-x", "remote_id": "r-x"}]
    report = _report(
        [_condominium(3, missing=missing), _condominium(4), _condominium(5, changed=changed)]
    )
    lines = render_audit(report).splitlines()
    assert lines[1] == "  differences: 12 missing, 0 unexpected, 1 changed"
    assert lines[2].startswith("  condominium c-3: 12 missing: d-0 (bat-3), d-1 (bat-3)")
    assert lines[2].endswith("d-9 (bat-3) and 2 more")
    assert lines[3] == "  condominium c-5: 1 changed: d-x (bat-5)"
    assert lines[-1] == "  to repair: the same command with --repair"
