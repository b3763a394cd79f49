"""The platform resources around the relay agree with it: Strimzi, KEDA, Prometheus, Grafana.

Topics have the partition count the relay requires and the configuration it would create them
with, the KafkaUsers hold exactly the rights the relay (and KEDA) need, the autoscaler never asks
for more replicas than partitions, the PrometheusRule is the alert rule file, the dashboard
ConfigMap is the dashboard json, and the NetworkPolicies open only what the relay uses.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from consumer.app.clients import _kafka_clients
from consumer.kafka.changelog import COMPACTED_TOPIC_CONFIG, dead_letter_room
from consumer.kafka.connection import kafka_connection
from consumer.settings import ENV_PREFIX, KafkaSettings, Settings
from tests.fixtures.manifests import OVERLAYS, ROOT, Document, Manifests, rendered

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "chouette-relay.json"
LSC_TOPICS = ROOT / "deploy" / "k8s" / "components" / "lsc-input-topics" / "kafkatopics.yaml"
GENERATOR = ROOT / "deploy" / "k8s" / "prometheusrule.py"


def kafka(manifests: Manifests, name: str) -> str:
    value: str = manifests.environment()[f"{ENV_PREFIX}KAFKA__{name}"]
    return value


def topics(manifests: Manifests) -> dict[str, Document]:
    """topicName -> KafkaTopic, LSC's input topics included even where they are not applied."""
    found = {t["spec"]["topicName"]: t for t in manifests.of_kind("KafkaTopic")}
    for documented in yaml.safe_load_all(LSC_TOPICS.read_text(encoding="utf-8")):
        found.setdefault(documented["spec"]["topicName"], documented)
    return found


def acls(user: Document) -> dict[tuple[str, str], set[str]]:
    """(resource type, name) -> allowed operations; every rule is a literal allow."""
    found: dict[tuple[str, str], set[str]] = {}
    for rule in user["spec"]["authorization"]["acls"]:
        resource = rule["resource"]
        assert resource.get("patternType", "literal") == "literal", resource
        assert rule.get("type", "allow") == "allow", rule
        assert rule.get("host", "*") == "*", rule
        found.setdefault((resource["type"], resource.get("name", "")), set()).update(
            rule["operations"]
        )
    return found


def partition_count(manifests: Manifests) -> int:
    (count,) = {t["spec"]["partitions"] for t in topics(manifests).values()}
    return int(count)


# --- Strimzi ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_topic_has_the_same_partition_count(overlay: str) -> None:
    manifests = rendered(overlay)
    counts = {name: t["spec"]["partitions"] for name, t in topics(manifests).items()}
    names = {kafka(manifests, n) for n in ("DOCUMENTS_TOPIC", "MANIFESTS_TOPIC", "STATE_TOPIC")}
    names |= {kafka(manifests, n) for n in ("COMMANDS_TOPIC", "DEAD_LETTER_TOPIC")}
    assert set(counts) == names, "one KafkaTopic per topic the relay names"
    assert len(set(counts.values())) == 1, f"partition counts differ: {counts}"


def test_lsc_input_topics_are_applied_only_in_dev() -> None:
    documented = {t["spec"]["topicName"] for t in yaml.safe_load_all(LSC_TOPICS.read_text("utf-8"))}
    applied = {
        overlay: {t["spec"]["topicName"] for t in rendered(overlay).of_kind("KafkaTopic")}
        for overlay in OVERLAYS
    }
    assert documented <= applied["dev"]
    assert not documented & applied["prod"], "LSC owns its topics: deleting ours would drop them"


def test_relay_topics_are_configured_as_the_relay_would_create_them() -> None:
    prod = rendered("prod")
    state = topics(prod)[kafka(prod, "STATE_TOPIC")]["spec"]["config"]
    assert {k: str(state[k]) for k in COMPACTED_TOPIC_CONFIG} == COMPACTED_TOPIC_CONFIG
    dead_letters = topics(prod)[kafka(prod, "DEAD_LETTER_TOPIC")]["spec"]["config"]
    max_value = int(
        prod.environment().get(
            f"{ENV_PREFIX}KAFKA__MAX_VALUE_BYTES", KafkaSettings().max_value_bytes
        )
    )
    assert int(dead_letters["max.message.bytes"]) >= dead_letter_room(max_value)
    for topic in topics(prod).values():
        assert topic["spec"]["replicas"] >= 3
        assert int(topic["spec"]["config"]["min.insync.replicas"]) == 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_relay_user_has_least_privilege(overlay: str) -> None:
    manifests = rendered(overlay)
    user = manifests.find("KafkaUser", kafka(manifests, "SASL_USERNAME"))
    assert user["spec"]["authentication"]["type"] == "scram-sha-512"
    read, read_write = {"Describe", "Read"}, {"Describe", "Read", "Write"}
    assert acls(user) == {
        ("topic", kafka(manifests, "DOCUMENTS_TOPIC")): read,
        ("topic", kafka(manifests, "MANIFESTS_TOPIC")): read,
        ("group", kafka(manifests, "GROUP_ID")): {"Read"},
        ("topic", kafka(manifests, "STATE_TOPIC")): read_write,
        ("topic", kafka(manifests, "COMMANDS_TOPIC")): read_write,
        ("topic", kafka(manifests, "DEAD_LETTER_TOPIC")): read_write,
    }


def test_keda_reads_lag_with_a_user_that_cannot_read_documents() -> None:
    prod = rendered("prod")
    auth = prod.find("TriggerAuthentication", "chouette-relay-lag-reader")["spec"]
    (username,) = auth["configMapTargetRef"]
    name = prod.find("ConfigMap", username["name"])["data"][username["key"]]
    user = prod.find("KafkaUser", name)
    secrets = {ref["parameter"]: ref["name"] for ref in auth["secretTargetRef"]}
    assert secrets["password"] == name, "Strimzi names the user's Secret after the KafkaUser"
    assert acls(user) == {
        ("topic", kafka(prod, "DOCUMENTS_TOPIC")): {"Describe"},
        ("topic", kafka(prod, "MANIFESTS_TOPIC")): {"Describe"},
        ("group", kafka(prod, "GROUP_ID")): {"Describe"},
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_kafka_reference_names_one_strimzi_cluster(overlay: str) -> None:
    manifests = rendered(overlay)
    strimzi = manifests.of_kind("KafkaTopic") + manifests.of_kind("KafkaUser")
    (cluster,) = {r["metadata"]["labels"]["strimzi.io/cluster"] for r in strimzi}
    assert kafka(manifests, "BOOTSTRAP_SERVERS").startswith(f"{cluster}-kafka-bootstrap:")
    ca_secrets = {
        v["secret"]["secretName"]
        for v in manifests.pod()["volumes"]
        if v.get("secret", {}).get("secretName", "").endswith("-cluster-ca-cert")
    }
    for auth in manifests.of_kind("TriggerAuthentication"):
        ca_secrets |= {r["name"] for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "ca"}
    assert ca_secrets == {f"{cluster}-cluster-ca-cert"}
    brokers = manifests.find("NetworkPolicy", "chouette-relay")["spec"]["egress"]
    selectors = [p["podSelector"]["matchLabels"] for rule in brokers for p in rule["to"]]
    assert {"strimzi.io/cluster": cluster, "strimzi.io/broker-role": "true"} in selectors


# --- KEDA ---------------------------------------------------------------------------------------


def test_autoscaling_never_exceeds_the_partition_count() -> None:
    prod = rendered("prod")
    spec = prod.find("ScaledObject", "chouette-relay")["spec"]
    partitions = partition_count(prod)
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
    # KEDA asks only for divisors of the partition count, so both bounds must be divisors too.
    assert partitions % spec["maxReplicaCount"] == 0
    assert partitions % spec["minReplicaCount"] == 0
    budget = prod.find("PodDisruptionBudget", "chouette-relay")["spec"]["minAvailable"]
    assert spec["minReplicaCount"] > budget, "a node drain must leave a replica consuming"


def test_autoscaling_follows_the_lag_of_both_inputs_of_the_relay_group() -> None:
    prod = rendered("prod")
    spec = prod.find("ScaledObject", "chouette-relay")["spec"]
    assert spec["scaleTargetRef"]["name"] == prod.deployment()["metadata"]["name"]
    triggers = spec["triggers"]
    assert {t["type"] for t in triggers} == {"kafka"}
    assert {t["metadata"]["topic"] for t in triggers} == {
        kafka(prod, "DOCUMENTS_TOPIC"),
        kafka(prod, "MANIFESTS_TOPIC"),
    }
    for trigger in triggers:
        meta = trigger["metadata"]
        # Resolved from the relay container's environment: one source for both.
        assert meta["consumerGroupFromEnv"] == f"{ENV_PREFIX}KAFKA__GROUP_ID"
        assert meta["bootstrapServersFromEnv"] == f"{ENV_PREFIX}KAFKA__BOOTSTRAP_SERVERS"
        assert (meta["sasl"], meta["tls"]) == ("scram_sha512", "enable")
        assert meta["ensureEvenDistributionOfPartitions"] == "true"
        assert meta["excludePersistentLag"] == "true"
        prod.find("TriggerAuthentication", trigger["authenticationRef"]["name"])


def test_autoscaling_waits_out_the_waves_of_a_first_publication() -> None:
    spec = rendered("prod").find("ScaledObject", "chouette-relay")["spec"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    startup = rendered("prod").container()["startupProbe"]
    # Scaling up is a rebalance: lag must outlast a partition's restore (bounded by the startup
    # probe's budget) before it is worth one, and scaling down waits much longer still.
    up = behavior["scaleUp"]["stabilizationWindowSeconds"]
    down = behavior["scaleDown"]["stabilizationWindowSeconds"]
    assert up >= 300
    assert down >= max(1800, 2 * startup["periodSeconds"] * startup["failureThreshold"])


async def test_every_replica_count_keeps_a_partition_number_on_one_replica() -> None:
    # Scaling (and a rolling update's surge pod) may run any count from 1 to max + 1.
    prod = rendered("prod")
    partitions = partition_count(prod)
    most = prod.find("ScaledObject", "chouette-relay")["spec"]["maxReplicaCount"] + 1
    subscribed = [kafka(prod, n) for n in ("DOCUMENTS_TOPIC", "MANIFESTS_TOPIC", "COMMANDS_TOPIC")]

    class Cluster:
        def partitions_for_topic(self, topic: str) -> set[int]:
            return set(range(partitions))

    settings = Settings(kafka=KafkaSettings(bootstrap_servers="kafka:9093"))
    producer, consumer = _kafka_clients(settings, kafka_connection(settings.kafka))
    # The consumer keeps its assignors privately; the group uses the first one.
    assignor = consumer._partition_assignment_strategy[0]
    await consumer.stop()
    await producer.stop()
    for replicas in range(1, most + 1):
        members = {f"relay-{i}": assignor.metadata(subscribed) for i in range(replicas)}
        owners: dict[int, set[str]] = {}
        for member, assignment in assignor.assign(Cluster(), members).items():
            for _topic, numbers in assignment.assignment:
                for number in numbers:
                    owners.setdefault(number, set()).add(member)
        split = sorted(p for p, o in owners.items() if len(o) > 1)
        assert not split, f"{replicas} replicas: partitions {split} have several owners"


# --- Prometheus and Grafana ---------------------------------------------------------------------


def test_prometheus_rule_carries_the_alert_rule_file() -> None:
    rule = rendered("prod").find("PrometheusRule", "chouette-relay")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text("utf-8"))["groups"]


def test_prometheus_rule_is_regenerated_from_the_alert_rule_file() -> None:
    result = subprocess.run(  # noqa: S603 - our own generator, run by this interpreter
        [sys.executable, str(GENERATOR), "--check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_pod_monitor_scrapes_every_replica_as_the_job_the_alerts_expect() -> None:
    prod = rendered("prod")
    monitor = prod.find("PodMonitor", "chouette-relay")["spec"]
    pod_labels = prod.deployment()["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    # The job label is taken from this pod label: ChouetteRelayInstanceDown selects that job.
    assert pod_labels[monitor["jobLabel"]] == "chouette-relay"
    assert 'job="chouette-relay"' in ALERTS.read_text("utf-8")
    ports = {p["name"]: p for p in prod.container()["ports"]}
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in ports
    # A scrape annotation as well would have annotation-based Prometheus scrape pods twice.
    annotations = prod.deployment()["spec"]["template"]["metadata"].get("annotations", {})
    assert not any(key.startswith("prometheus.io/") for key in annotations)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_ships_as_the_json_for_the_grafana_sidecar(overlay: str) -> None:
    dashboards = [
        c
        for c in rendered(overlay).of_kind("ConfigMap")
        if "grafana_dashboard" in c["metadata"]["labels"]
    ]
    (dashboard,) = dashboards
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"] == {DASHBOARD.name: DASHBOARD.read_text("utf-8")}


# --- network ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_open_only_what_the_relay_uses(overlay: str) -> None:
    manifests = rendered(overlay)
    policies = manifests.of_kind("NetworkPolicy")
    pod_labels = manifests.deployment()["spec"]["template"]["metadata"]["labels"]
    ingress, egress_ports = [], set()
    for policy in policies:
        spec = policy["spec"]
        assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
        ingress += spec.get("ingress", [])
        for rule in spec.get("egress", []):
            assert rule.get("to"), f"{policy['metadata']['name']}: an egress rule to anywhere"
            assert rule.get("ports"), f"{policy['metadata']['name']}: an egress rule on any port"
            egress_ports |= {(p["port"], p["protocol"]) for p in rule["ports"]}
    assert any("Ingress" in p["spec"]["policyTypes"] for p in policies)
    assert ingress == [
        {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ],
            "ports": [{"port": 8080, "protocol": "TCP"}],
        }
    ]
    assert egress_ports == {(53, "UDP"), (53, "TCP"), (9093, "TCP"), (443, "TCP")}
    port = int(kafka(manifests, "BOOTSTRAP_SERVERS").rsplit(":", 1)[1])
    assert (port, "TCP") in egress_ports


def test_prod_does_not_open_https_to_the_whole_internet() -> None:
    policy = rendered("prod").find("NetworkPolicy", "chouette-relay-egress-https")
    blocks = [peer["ipBlock"]["cidr"] for rule in policy["spec"]["egress"] for peer in rule["to"]]
    assert blocks
    assert "0.0.0.0/0" not in blocks
    assert "::/0" not in blocks
