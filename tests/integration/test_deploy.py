"""The monitoring surface agrees with the code: alert rules and the dashboard.

Alert rules are checked and unit-tested with promtool, and every metric the alerts and the
dashboard name is checked against ``RelayMetrics``. The Kubernetes manifests have their own
module, test_k8s.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from consumer.metrics import RelayMetrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "chouette-relay.json"

# What every runbook section says, in this order of need.
RUNBOOK_PARTS = ("**What it means**", "**How to look**", "**What to do**")
METRIC_NAME = re.compile(r"\bchouette_relay_[a-z0-9_]+")
# Labels that Prometheus adds to every scraped series, not the relay.
TARGET_LABELS = frozenset({"job", "instance", "__name__"})
# Values Grafana substitutes into queries, replaced by plausible ones to check the PromQL.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "6h",
    "$instance": ".*",
    "$agency": ".*",
}

Document = dict[str, Any]


# --- helpers ------------------------------------------------------------------------------------


def exposed_samples() -> dict[str, frozenset[str]]:
    """The relay's exposed sample names, each with its label names, once every metric has data."""
    registry = CollectorRegistry()
    metrics = RelayMetrics.create(registry, version="test")
    for field in dataclasses.fields(metrics):
        metric = getattr(metrics, field.name)
        if field.name == "agencies":  # the agency label's values, not a metric
            continue
        # prometheus_client exposes a labelled metric only once a child exists, and offers no
        # public accessor for the label names needed to create one.
        label_names: tuple[str, ...] = tuple(metric._labelnames)
        if label_names:
            metric.labels(*["x"] * len(label_names))
    samples: dict[str, frozenset[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            samples[sample.name] = frozenset(sample.labels)
    return samples


def alert_rules() -> list[Document]:
    groups: list[Document] = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def alert_test_cases() -> list[Document]:
    tests: list[Document] = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))["tests"]
    return tests


def runbook_sections() -> dict[str, str]:
    """Anchor -> body of each ``### Heading`` of deploy/README.md, anchored as Markdown does."""
    text = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    sections: dict[str, str] = {}
    for block in re.split(r"^### ", text, flags=re.MULTILINE)[1:]:
        heading, _, body = block.partition("\n")
        anchor = re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")
        sections[anchor] = body.split("\n## ", 1)[0]
    return sections


def dashboard() -> Document:
    model: Document = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return model


def dashboard_panels() -> Iterator[Document]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> list[str]:
    queries = [
        target["expr"]
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    queries += [
        variable["definition"]
        for variable in dashboard()["templating"]["list"]
        if variable["type"] == "query"
    ]
    return queries


def as_promql(query: str) -> str:
    """A Grafana query with its variables replaced, as Prometheus would receive it."""
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    return query


def metric_names_in(text: str) -> set[str]:
    return set(METRIC_NAME.findall(text))


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = (
            "promtool is not installed: install the Debian package 'prometheus' "
            "(apt-get install -y --no-install-recommends prometheus)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_promtool(promtool: str, *args: str) -> None:
    result = subprocess.run(  # noqa: S603 - fixed arguments, promtool found on PATH
        [promtool, *args], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, (
        f"promtool {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    )


# --- metric names -------------------------------------------------------------------------------


def test_alerts_and_dashboard_use_only_exposed_metrics() -> None:
    exposed = set(exposed_samples())
    used_by = {
        ALERTS.name: {n for rule in alert_rules() for n in metric_names_in(rule["expr"])},
        DASHBOARD.name: {n for q in dashboard_queries() for n in metric_names_in(q)},
    }
    for source, used in used_by.items():
        assert used, f"{source} uses no chouette_relay_ metric"
        assert used <= exposed, f"{source} uses unknown metrics: {sorted(used - exposed)}"


def test_alert_tests_feed_series_shaped_like_the_relays() -> None:
    samples = exposed_samples()
    for case in alert_test_cases():
        for series in case["input_series"]:
            name, _, labels = series["series"].partition("{")
            if not name.startswith("chouette_relay_"):
                continue
            assert name in samples, f"{case['name']}: {name} is not exposed"
            label_names = set(re.findall(r"([a-zA-Z_]\w*)\s*=", labels)) - TARGET_LABELS
            assert label_names == samples[name], (
                f"{case['name']}: {name} has labels {sorted(samples[name])}, "
                f"the test feeds {sorted(label_names)}"
            )


def test_dashboard_charts_every_metric() -> None:
    charted = {n for q in dashboard_queries() for n in metric_names_in(q)}
    families = {re.sub(r"_(total|created|bucket|sum|count)$", "", n) for n in exposed_samples()}
    uncharted = {f for f in families if not any(n.startswith(f) for n in charted)}
    assert not uncharted, f"metrics missing from the dashboard: {sorted(uncharted)}"


# --- alert rules --------------------------------------------------------------------------------


def test_alerts_are_actionable() -> None:
    runbooks = runbook_sections()
    for rule in alert_rules():
        assert rule.get("for"), f"{rule['alert']} has no `for`"
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= annotations.keys(), rule["alert"]
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "deploy/README.md", rule["alert"]
        assert anchor in runbooks, f"{rule['alert']}: no section #{anchor} in deploy/README.md"
        for part in RUNBOOK_PARTS:
            assert part in runbooks[anchor], f"{rule['alert']}'s runbook lacks {part!r}"


def test_every_alert_is_tested_firing_and_silent() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for case in alert_test_cases():
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts <= firing, f"never shown firing: {sorted(alerts - firing)}"
    assert alerts <= silent, f"never shown silent: {sorted(alerts - silent)}"


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", str(ALERTS))


def test_alert_rules_pass_their_unit_tests(promtool: str) -> None:
    run_promtool(promtool, "test", "rules", str(ALERT_TESTS))


# --- dashboard ----------------------------------------------------------------------------------


def test_dashboard_queries_the_selected_prometheus() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard_panels():
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    rules = []
    for index, query in enumerate(q for q in dashboard_queries() if "label_values" not in q):
        rules.append({"record": f"dashboard:query_{index}", "expr": as_promql(query)})
    rule_file = tmp_path / "dashboard-queries.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", str(rule_file))
