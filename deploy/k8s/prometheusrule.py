"""Writes deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/alerts.yaml.

The rule file stays the one source of the alerts (promtool checks and tests it); the Prometheus
Operator's PrometheusRule carries the same ``groups``. ``--check`` exits 1 when the committed
PrometheusRule is out of date instead of writing it (``make k8s-check`` runs it so).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
OUTPUT = ROOT / "deploy" / "k8s" / "base" / "prometheusrule.yaml"
HEADER = """\
# GENERATED from deploy/prometheus/alerts.yaml by `make prometheusrule`: do not edit by hand.
# The alerting rules of chouette-relay for the Prometheus Operator (same groups as the rule file).
"""


def prometheus_rule(alerts_text: str) -> str:
    groups = yaml.safe_load(alerts_text)["groups"]
    rule: dict[str, Any] = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "chouette-relay",
            "labels": {"app.kubernetes.io/name": "chouette-relay"},
        },
        "spec": {"groups": groups},
    }
    body = yaml.safe_dump(rule, sort_keys=False, allow_unicode=True, width=100)
    return HEADER + body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the output is stale")
    args = parser.parse_args()
    wanted = prometheus_rule(ALERTS.read_text(encoding="utf-8"))
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != wanted:
            sys.stderr.write(f"{OUTPUT.relative_to(ROOT)} is stale: run `make prometheusrule`\n")
            return 1
        return 0
    OUTPUT.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
