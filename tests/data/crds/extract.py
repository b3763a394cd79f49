"""Extract the openAPIV3Schema of one served version from a CustomResourceDefinition file.

Usage: ``python tests/data/crds/extract.py CRD.yaml VERSION > GROUP_VERSION_KIND.json``. The
descriptions are dropped (they are documentation, not validation) to keep the test data small;
every other keyword is kept as the project published it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml


def without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        # Only string-valued "description" keys are documentation; a property that happens to be
        # named "description" holds a schema (a mapping) and is kept.
        return {
            key: without_descriptions(value)
            for key, value in node.items()
            if not (key == "description" and isinstance(value, str))
        }
    if isinstance(node, list):
        return [without_descriptions(item) for item in node]
    return node


def main(path: str, version: str) -> None:
    with open(path, encoding="utf-8") as stream:
        crd = next(doc for doc in yaml.safe_load_all(stream) if doc)
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    document = {
        "group": crd["spec"]["group"],
        "version": version,
        "kind": crd["spec"]["names"]["kind"],
        "openAPIV3Schema": without_descriptions(served["schema"]["openAPIV3Schema"]),
    }
    json.dump(document, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
