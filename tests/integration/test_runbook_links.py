"""The alerts' runbook links can point at the repository's web page, set once in the prod overlay.

``overlays/prod/runbook-links.yaml`` names the page; every alert's ``runbook_url`` keeps its own
section. Rendered from a copy of ``deploy/`` whose page is set, as an SRE would set it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.fixtures.manifests import ROOT, rendered_from

pytestmark = pytest.mark.integration

PAGE = "https://git.example/ops/chouette-relay/blob/main/deploy/README.md"


def test_every_runbook_link_points_at_the_page_set_in_the_prod_overlay(tmp_path: Path) -> None:
    deploy = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", deploy)
    links = deploy / "k8s" / "overlays" / "prod" / "runbook-links.yaml"
    links.write_text(
        links.read_text(encoding="utf-8").replace("page: deploy/README.md", f"page: {PAGE}"),
        encoding="utf-8",
    )
    prod = rendered_from(deploy / "k8s" / "overlays" / "prod")

    [rule] = prod.of_kind("PrometheusRule")
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text("utf-8"))
    expected = {
        r["alert"]: r["annotations"]["runbook_url"].replace("deploy/README.md", PAGE, 1)
        for group in alerts["groups"]
        for r in group["rules"]
    }
    shown = {
        r["alert"]: r["annotations"]["runbook_url"]
        for group in rule["spec"]["groups"]
        for r in group["rules"]
    }
    assert shown == expected
    assert not [d for d in prod.documents if d["metadata"]["name"].endswith("runbook-links")]
