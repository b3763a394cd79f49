"""The Kubernetes overlays render, are valid, and run the relay as its settings expect.

Each overlay is rendered with the pinned kustomize; core objects are validated against the
Kubernetes schemas of kubernetes-validate, custom resources against the pinned CRD schemas, and
the relay container's variables, mounted files and grace period against ``Settings``.
"""

from __future__ import annotations

import copy
import os
import tomllib
from pathlib import Path, PurePosixPath

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml
from pydantic import BaseModel, ValidationError

from consumer.core.routing import RoutingTable
from consumer.settings import ENV_PREFIX, Settings
from tests.fixtures.crd_schema import schema_errors
from tests.fixtures.manifests import K8S, OVERLAYS, Document, Manifests, rendered, rendered_with

KUBERNETES_VERSION = "1.30"
# After the drain, the relay still closes its consumer (leaving the group) and exits.
SHUTDOWN_MARGIN_S = 10
EXAMPLE_POD_NAME = "chouette-relay-5d8c7b9f6d-x2x7q"


# --- helpers ------------------------------------------------------------------------------------


def kubernetes_errors(document: Document) -> list[str]:
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = "/".join(str(part) for part in error.path)
        return [f"{where}: {error.message}"]
    return []


def is_custom(document: Document) -> bool:
    """A custom resource: its API group is neither core nor one of Kubernetes' own."""
    group = str(document["apiVersion"]).rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")


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


def settings_environment(manifests: Manifests) -> dict[str, str]:
    """The container's ``CHOUETTE_RELAY_*`` variables (every one must be a setting)."""
    return {
        name: value
        for name, value in manifests.environment().items()
        if name.startswith(ENV_PREFIX)
    }


def example_secrets() -> dict[str, Document]:
    secrets = {}
    for path in sorted((K8S / "examples").glob("secret-*.example.yaml")):
        for secret in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            secrets[secret["metadata"]["name"]] = secret
    return secrets


def mounts(manifests: Manifests) -> dict[PurePosixPath, Document]:
    """Mount path -> the volume mounted there."""
    volumes = {v["name"]: v for v in manifests.pod()["volumes"]}
    return {
        PurePosixPath(m["mountPath"]): volumes[m["name"]]
        for m in manifests.container()["volumeMounts"]
    }


# --- rendering and schemas ----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_are_valid_for_kubernetes(overlay: str) -> None:
    manifests = rendered(overlay)
    problems = [
        f"{doc['kind']} {doc['metadata']['name']}: {problem}"
        for doc in manifests.documents
        if not is_custom(doc)
        for problem in kubernetes_errors(doc)
    ]
    assert not problems, f"overlays/{overlay} is not valid for Kubernetes: {problems}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_pinned_crd_schemas(overlay: str) -> None:
    manifests = rendered(overlay)
    custom = [doc for doc in manifests.documents if is_custom(doc)]
    assert {doc["kind"] for doc in custom} >= {"KafkaTopic", "KafkaUser", "PodMonitor"}
    problems = [
        f"{doc['kind']} {doc['metadata']['name']}: {problem}"
        for doc in custom
        for problem in schema_errors(doc)
    ]
    assert not problems, f"overlays/{overlay}: {problems}"


def test_kubernetes_validation_rejects_a_misspelt_field() -> None:
    deployment = copy.deepcopy(rendered("prod").deployment())
    assert not kubernetes_errors(deployment)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    errors = kubernetes_errors(deployment)
    assert any("'resource'" in error for error in errors), errors


def _misspell(document: Document, path: str, wrong: str) -> None:
    *parents, last = path.split("/")
    node = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[wrong] = node.pop(last)


@pytest.mark.parametrize(
    ("kind", "name", "path", "wrong"),
    [
        ("KafkaTopic", "chouette-relay.published-view.v1", "spec/partitions", "partition"),
        # Strimzi's v1 ACLs list "operations"; the v1beta2 "operation" is gone.
        ("KafkaUser", "chouette-relay", "spec/authorization/acls/0/operations", "operation"),
        ("ScaledObject", "chouette-relay", "spec/maxReplicaCount", "maxReplicas"),
        ("TriggerAuthentication", "chouette-relay-lag-reader", "spec/secretTargetRef", "secrets"),
        ("PodMonitor", "chouette-relay", "spec/podMetricsEndpoints/0/port", "targetPortName"),
        ("PrometheusRule", "chouette-relay", "spec/groups/0/rules/0/expr", "expression"),
    ],
)
def test_crd_validation_rejects_a_misspelt_field(
    kind: str, name: str, path: str, wrong: str
) -> None:
    document = copy.deepcopy(rendered("prod").find(kind, name))
    assert not schema_errors(document)
    _misspell(document, path, wrong)
    errors = schema_errors(document)
    assert any(f"'{wrong}'" in error for error in errors), f"{kind}: {wrong!r} accepted: {errors}"


def test_crd_validation_rejects_a_wrong_value() -> None:
    user = copy.deepcopy(rendered("prod").find("KafkaUser", "chouette-relay"))
    user["spec"]["authentication"]["type"] = "scram-sha-1"
    assert any("'scram-sha-1'" in error for error in schema_errors(user))


def test_a_custom_resource_without_a_pinned_schema_is_an_error() -> None:
    connect = {"apiVersion": "kafka.strimzi.io/v1", "kind": "KafkaConnect", "spec": {}}
    assert schema_errors(connect) == [
        "no pinned CRD schema for kafka.strimzi.io/v1 KafkaConnect in crds"
    ]


def test_every_base_and_component_file_is_rendered() -> None:
    for kustomization in [K8S / "base", *sorted((K8S / "components").iterdir())]:
        listed = yaml.safe_load((kustomization / "kustomization.yaml").read_text("utf-8"))
        used = {Path(p).name for p in listed.get("resources", [])}
        for generator in listed.get("configMapGenerator", []):
            used.update(generator.get("envs", []) + generator.get("files", []))
        files = {p.name for p in kustomization.iterdir() if p.name != "kustomization.yaml"}
        assert files <= used, f"{kustomization.name}: not in its kustomization: {files - used}"


def test_example_secrets_hold_only_placeholders() -> None:
    for name, secret in example_secrets().items():
        assert secret["kind"] == "Secret"
        assert "data" not in secret, f"{name}: use stringData placeholders"
        for key, value in secret["stringData"].items():
            assert value.startswith("REPLACE-"), f"{name}: {key} is not a placeholder"


# --- the Deployment -----------------------------------------------------------------------------


def test_prod_rolls_out_without_losing_capacity() -> None:
    prod = rendered("prod")
    spec = prod.deployment()["spec"]
    assert "replicas" not in spec, "KEDA owns the replica count: apply must not reset it"
    assert prod.find("ScaledObject", "chouette-relay")["spec"]["minReplicaCount"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budget = prod.find("PodDisruptionBudget", "chouette-relay")["spec"]
    assert budget["minAvailable"] == 1
    pod_labels = spec["template"]["metadata"]["labels"]
    for selector in (
        spec["selector"]["matchLabels"],
        budget["selector"]["matchLabels"],
        prod.find("Service", "chouette-relay")["spec"]["selector"],
    ):
        assert selector.items() <= pod_labels.items()


def test_dev_runs_one_replica_without_a_budget_that_would_block_drains() -> None:
    dev = rendered("dev")
    assert dev.deployment()["spec"]["replicas"] == 1
    assert not dev.of_kind("PodDisruptionBudget")
    assert not dev.of_kind("ScaledObject")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_runs_locked_down(overlay: str) -> None:
    manifests = rendered(overlay)
    pod, container = manifests.pod(), manifests.container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= container["resources"].keys()
    account = manifests.find("ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is False


def test_probes_use_the_ops_endpoints() -> None:
    container = rendered("prod").container()
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "restore needs time"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_references_only_objects_that_will_exist(overlay: str) -> None:
    manifests = rendered(overlay)
    users = {u["metadata"]["name"]: u for u in manifests.of_kind("KafkaUser")}
    clusters = {u["metadata"]["labels"]["strimzi.io/cluster"] for u in users.values()}
    made_elsewhere = (
        set(example_secrets())  # created by the operator, shaped like the examples
        | set(users)  # created by Strimzi's User Operator
        | {f"{cluster}-cluster-ca-cert" for cluster in clusters}  # by its Cluster Operator
    )
    pod = manifests.pod()
    for volume in pod["volumes"]:
        if "configMap" in volume:
            manifests.find("ConfigMap", volume["configMap"]["name"])
        if "secret" in volume:
            assert volume["secret"]["secretName"] in made_elsewhere, volume["name"]
    assert {m["name"] for m in manifests.container()["volumeMounts"]} == {
        v["name"] for v in pod["volumes"]
    }


def test_private_ca_component_mounts_one_bundle_for_partner_and_documents(tmp_path: Path) -> None:
    manifests = rendered_with("prod", "private-ca", tmp_path)
    assert not kubernetes_errors(manifests.deployment())
    env, mounted = manifests.environment(), mounts(manifests)
    for name in ("PARTNER__CA_FILE", "CONTENT__CA_FILE"):
        bundle = PurePosixPath(env[f"{ENV_PREFIX}{name}"])
        volume = mounted[bundle.parent]["configMap"]
        assert volume["name"] == "chouette-relay-private-ca"
        assert {"key": "ca.crt", "path": bundle.name} in volume["items"]
    unknown = set(settings_environment(manifests)) - settings_variable_names()
    assert not unknown, f"not read by consumer/settings.py: {sorted(unknown)}"


def test_pod_name_comes_from_the_downward_api() -> None:
    env = {v["name"]: v for v in rendered("prod").container()["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert f"{ENV_PREFIX}KAFKA__GROUP_INSTANCE_ID" not in rendered("prod").environment()


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_sets_only_variables_that_settings_reads(overlay: str) -> None:
    manifests = rendered(overlay)
    unknown = set(settings_environment(manifests)) - settings_variable_names()
    assert not unknown, f"not read by consumer/settings.py: {sorted(unknown)}"


def deployed_settings(overlay: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``Settings`` as the relay container of an overlay builds them from its environment."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv("POD_NAME", EXAMPLE_POD_NAME)
    for name, value in settings_environment(rendered(overlay)).items():
        monkeypatch.setenv(name, value)
    try:
        return Settings()
    except ValidationError as error:
        problem = str(error)
    pytest.fail(f"Settings rejects the environment of overlays/{overlay}: {problem}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_environment_is_a_valid_production_configuration(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = deployed_settings(overlay, monkeypatch)
    assert not settings.is_local
    assert not settings.kafka.create_state_topic, "topics are KafkaTopics; the user cannot create"
    ports = {p["containerPort"] for p in rendered(overlay).container()["ports"]}
    assert settings.http.port in ports


def test_prod_logs_json(monkeypatch: pytest.MonkeyPatch) -> None:
    assert deployed_settings("prod", monkeypatch).log_format == "json"


def test_settings_point_at_the_mounted_files(monkeypatch: pytest.MonkeyPatch) -> None:
    prod = rendered("prod")
    settings = deployed_settings("prod", monkeypatch)
    mounted = mounts(prod)

    assert settings.partner.api_keys_dir is not None
    api_keys = mounted[PurePosixPath(settings.partner.api_keys_dir)]
    assert api_keys["secret"]["secretName"] == "chouette-relay-api-keys"

    assert settings.http.admin_token_file is not None
    token_file = PurePosixPath(settings.http.admin_token_file)
    assert token_file.name in {i["path"] for i in mounted[token_file.parent]["secret"]["items"]}

    assert settings.routing_file is not None
    routing_file = PurePosixPath(settings.routing_file)
    routing_map = prod.find("ConfigMap", mounted[routing_file.parent]["configMap"]["name"])
    routing = RoutingTable.from_mapping(tomllib.loads(routing_map["data"][routing_file.name]))
    # The relay refuses to start when a routed agency has no API key file.
    example_keys = example_secrets()["chouette-relay-api-keys"]["stringData"]
    assert set(routing.agencies) <= set(example_keys)


def test_kafka_credentials_are_the_files_strimzi_creates() -> None:
    prod = rendered("prod")
    env, mounted = prod.environment(), mounts(prod)
    user = prod.find("KafkaUser", env[f"{ENV_PREFIX}KAFKA__SASL_USERNAME"])
    assert user["spec"]["authentication"]["type"] == "scram-sha-512"
    assert env[f"{ENV_PREFIX}KAFKA__SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert env[f"{ENV_PREFIX}KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL"

    password = PurePosixPath(env[f"{ENV_PREFIX}KAFKA__SASL_PASSWORD_FILE"])
    secret = mounted[password.parent]["secret"]
    assert secret["secretName"] == user["metadata"]["name"]
    assert {"key": "password", "path": password.name} in secret["items"]

    cluster = user["metadata"]["labels"]["strimzi.io/cluster"]
    ca = PurePosixPath(env[f"{ENV_PREFIX}KAFKA__SSL_CA_FILE"])
    secret = mounted[ca.parent]["secret"]
    assert secret["secretName"] == f"{cluster}-cluster-ca-cert"
    assert {"key": "ca.crt", "path": ca.name} in secret["items"]
    bootstrap = env[f"{ENV_PREFIX}KAFKA__BOOTSTRAP_SERVERS"]
    assert bootstrap.startswith(f"{cluster}-kafka-bootstrap:"), bootstrap


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_outlasts_the_drain(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = deployed_settings(overlay, monkeypatch)
    grace = rendered(overlay).pod()["terminationGracePeriodSeconds"]
    assert grace >= settings.drain_timeout_s + SHUTDOWN_MARGIN_S, (
        f"terminationGracePeriodSeconds {grace} leaves no time after the "
        f"{settings.drain_timeout_s} s drain: Kubernetes would kill the relay mid-drain"
    )
