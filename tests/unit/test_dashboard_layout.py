"""The dashboard answers an operator's questions first: what waits for them, then progress and lag.

And the lag it shows says which part of it is held on purpose (a pause, an approval awaited), so
that a paused agency does not read as a relay falling behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "chouette-relay.json"


def _rows() -> list[tuple[str, list[dict[str, Any]]]]:
    """Rows in screen order, each with its panels."""
    panels = sorted(
        json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"],
        key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]),
    )
    rows: list[tuple[str, list[dict[str, Any]]]] = []
    for panel in panels:
        if panel["type"] == "row":
            rows.append((panel["title"], []))
        else:
            rows[-1][1].append(panel)
    return rows


def test_what_waits_for_an_operator_comes_right_after_the_overview() -> None:
    titles = [title for title, _ in _rows()]
    assert titles[:4] == [
        "Overview",
        "What waits for an operator",
        "First publication",
        "Consumer lag",
    ]
    waiting = dict(_rows())["What waits for an operator"]
    assert [p["title"] for p in waiting] == [
        "Paused agencies",
        "Buildings awaiting approval",
        "Audit findings",
    ]


def test_the_first_publication_row_holds_only_first_publication_panels() -> None:
    panels = dict(_rows())["First publication"]
    assert all("Kafka" not in p["title"] and "rate" not in p["title"] for p in panels)


def test_the_lag_shows_beside_it_what_holds_it_on_purpose() -> None:
    lag = next(p for p in dict(_rows())["Consumer lag"] if p["title"].startswith("Lag by topic"))
    legends = [target["legendFormat"] for target in lag["targets"]]
    assert "agencies paused (their input waits on purpose)" in legends
    assert "buildings awaiting approval (their manifests wait on purpose)" in legends
