"""The deployment surface agrees with the code: manifests, alerts and dashboard.

Kubernetes manifests are validated offline against the schemas bundled with kubernetes-validate,
alert rules are checked and unit-tested with promtool, and every metric, environment variable and
timeout the deployment files name is checked against ``RelayMetrics`` and ``Settings``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ValidationError

from consumer.metrics import RelayMetrics
from consumer.routing import RoutingTable
from consumer.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "chouette-relay.json"

KUBERNETES_VERSION = "1.30"
# After the drain, the relay still closes its consumer (leaving the group) and exits.
SHUTDOWN_MARGIN_S = 10
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


def load_yaml_documents(path: Path) -> list[Document]:
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def k8s_manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def all_manifests() -> list[Document]:
    return [doc for path in k8s_manifest_files() for doc in load_yaml_documents(path)]


def find(kind: str, name: str) -> Document:
    matches = [m for m in all_manifests() if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r} in {K8S}, found {len(matches)}"
    return matches[0]


def relay_deployment() -> Document:
    return find("Deployment", "chouette-relay")


def relay_container() -> Document:
    containers: list[Document] = relay_deployment()["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "relay")


def deployment_environment() -> dict[str, str]:
    """The relay container's environment: its ConfigMaps' data, then its own ``env``."""
    container = relay_container()
    environment: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "secretRef" not in source, "secrets are mounted as files, never put in the env"
        environment.update(find("ConfigMap", source["configMapRef"]["name"])["data"])
    for variable in container.get("env", []):
        assert "valueFrom" not in variable, f"{variable['name']}: secrets are files, not env"
        environment[variable["name"]] = variable["value"]
    return environment


def settings_variable_names() -> set[str]:
    """Every environment variable ``Settings`` reads, derived from the model fields."""
    names: set[str] = set()
    for field_name, field in Settings.model_fields.items():
        group = field.annotation
        if isinstance(group, type) and issubclass(group, BaseModel):
            names.update(
                f"{ENV_PREFIX}{field_name.upper()}__{nested.upper()}"
                for nested in group.model_fields
            )
        else:
            names.add(f"{ENV_PREFIX}{field_name.upper()}")
    return names


def exposed_samples() -> dict[str, frozenset[str]]:
    """The relay's exposed sample names, each with its label names, once every metric has data."""
    registry = CollectorRegistry()
    metrics = RelayMetrics.create(registry, version="test")
    for field in dataclasses.fields(metrics):
        metric = getattr(metrics, field.name)
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


# --- Kubernetes manifests -----------------------------------------------------------------------


@pytest.mark.parametrize("path", k8s_manifest_files(), ids=lambda p: p.name)
def test_manifest_is_valid_for_kubernetes(path: Path) -> None:
    documents = load_yaml_documents(path)
    assert documents, f"{path.name} holds no manifest"
    problems = []
    for document in documents:
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = "/".join(str(part) for part in error.path)
            problems.append(f"{document['kind']} at {where}: {error.message}")
    assert not problems, f"{path.name} is not valid for Kubernetes {KUBERNETES_VERSION}: {problems}"


def test_kustomization_applies_every_manifest_except_the_example_secrets() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    expected = {p.name for p in k8s_manifest_files() if not p.name.endswith(".example.yaml")}
    assert set(kustomization["resources"]) == expected


def test_example_secrets_hold_only_placeholders() -> None:
    for path in K8S.glob("secret-*.example.yaml"):
        for secret in load_yaml_documents(path):
            assert secret["kind"] == "Secret"
            assert "data" not in secret, f"{path.name}: use stringData placeholders"
            for key, value in secret["stringData"].items():
                assert value.startswith("REPLACE-"), f"{path.name}: {key} is not a placeholder"


def test_deployment_rolls_out_without_losing_capacity() -> None:
    spec = relay_deployment()["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budget = find("PodDisruptionBudget", "chouette-relay")["spec"]
    assert budget["minAvailable"] == 1
    pod_labels = spec["template"]["metadata"]["labels"]
    for selector in (
        spec["selector"]["matchLabels"],
        budget["selector"]["matchLabels"],
        find("Service", "chouette-relay")["spec"]["selector"],
    ):
        assert selector.items() <= pod_labels.items()


def test_deployment_runs_locked_down() -> None:
    pod = relay_deployment()["spec"]["template"]["spec"]
    container = relay_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= container["resources"].keys()


def test_probes_use_the_ops_endpoints() -> None:
    container = relay_container()
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "restore needs time"
    annotations = relay_deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_deployment_references_only_defined_objects() -> None:
    pod = relay_deployment()["spec"]["template"]["spec"]
    for volume in pod["volumes"]:
        if "configMap" in volume:
            find("ConfigMap", volume["configMap"]["name"])
        if "secret" in volume:
            find("Secret", volume["secret"]["secretName"])
    mounted = {m["name"] for m in relay_container()["volumeMounts"]}
    assert mounted == {v["name"] for v in pod["volumes"]}


# --- settings and timeouts ----------------------------------------------------------------------


def test_deployment_sets_only_variables_that_settings_reads() -> None:
    unknown = set(deployment_environment()) - settings_variable_names()
    assert not unknown, f"not read by consumer/settings.py: {sorted(unknown)}"


@pytest.fixture
def deployed_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``Settings`` as the relay container builds them from its environment."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in deployment_environment().items():
        monkeypatch.setenv(name, value)
    try:
        return Settings()
    except ValidationError as error:
        problem = str(error)
    pytest.fail(f"Settings rejects the Deployment's environment: {problem}")


def test_deployment_environment_is_a_valid_production_configuration(
    deployed_settings: Settings,
) -> None:
    assert not deployed_settings.is_local
    assert deployed_settings.log_format == "json"
    ports = {p["containerPort"] for p in relay_container()["ports"]}
    assert deployed_settings.http.port in ports


def test_settings_point_at_the_mounted_files(deployed_settings: Settings) -> None:
    pod = relay_deployment()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {
        PurePosixPath(m["mountPath"]): volumes[m["name"]] for m in relay_container()["volumeMounts"]
    }

    assert deployed_settings.partner.api_keys_dir is not None
    api_keys = mounts[PurePosixPath(deployed_settings.partner.api_keys_dir)]
    assert api_keys["secret"]["secretName"] == "chouette-relay-api-keys"

    assert deployed_settings.http.admin_token_file is not None
    token_file = PurePosixPath(deployed_settings.http.admin_token_file)
    token_volume = mounts[token_file.parent]
    assert token_file.name in {item["path"] for item in token_volume["secret"]["items"]}

    assert deployed_settings.routing_file is not None
    routing_file = PurePosixPath(deployed_settings.routing_file)
    routing_map = find("ConfigMap", mounts[routing_file.parent]["configMap"]["name"])
    routing = RoutingTable.from_mapping(tomllib.loads(routing_map["data"][routing_file.name]))
    # The relay refuses to start when a routed agency has no API key file.
    example_keys = find("Secret", "chouette-relay-api-keys")["stringData"]
    assert set(routing.agencies) <= set(example_keys)


def test_grace_period_outlasts_the_drain(deployed_settings: Settings) -> None:
    grace = relay_deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= deployed_settings.drain_timeout_s + SHUTDOWN_MARGIN_S, (
        f"terminationGracePeriodSeconds {grace} leaves no time after the "
        f"{deployed_settings.drain_timeout_s} s drain: Kubernetes would kill the relay mid-drain"
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
