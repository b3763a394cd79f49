"""The image's virtualenv, built as the Dockerfile builds it, holds exactly what ``run`` needs.

There is no container engine here, so the test runs the Dockerfile's own install script
(``docker/build-venv.sh``) into a temporary directory and looks at the result: the runtime lock
and the relay, no dev or local tools, no installer; the CLI starts; and without the settings of a
real cluster it says plainly that the local default is not part of this installation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tests.unit.test_supply_chain import ROOT, pins


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("image") / "venv"
    subprocess.run(  # noqa: S603 - the repository's script, fixed arguments
        ["sh", str(ROOT / "docker" / "build-venv.sh"), str(ROOT), str(venv)],  # noqa: S607
        env={**os.environ, "PYTHON": sys.executable},
        check=True,
        capture_output=True,
        timeout=600,
    )
    return venv


def run_in(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CHOUETTE_RELAY_")}
    return subprocess.run(  # noqa: S603 - the built virtualenv's own programs
        [str(venv / "bin" / args[0]), *args[1:]],
        env=environment,
        cwd=venv,  # not the checkout: only what is installed may be imported
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_the_image_holds_the_runtime_lock_and_the_relay_only(image_venv: Path) -> None:
    listing = run_in(
        image_venv,
        "python",
        "-c",
        "import importlib.metadata as m, json;"
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))",
    )
    installed: dict[str, str] = {
        canonicalize_name(n): v for n, v in json.loads(listing.stdout).items()
    }
    assert installed.pop("chouette-relay") == "0.1.0"
    assert installed == pins("runtime.txt")
    assert not {"openapi-core", "pytest", "mypy", "pip", "setuptools"} & set(installed)


def test_the_cli_and_every_production_module_load(image_venv: Path) -> None:
    assert run_in(image_venv, "chouette-relay", "--help").returncode == 0
    probe = run_in(
        image_venv,
        "python",
        "-c",
        # Not pkgutil.walk_packages: it imports every sub-package, the local stack's included.
        "import importlib, pkgutil, consumer\n"
        "def walk(path, prefix):\n"
        "    for m in pkgutil.iter_modules(path, prefix):\n"
        "        if m.name != 'consumer.local':\n"
        "            module = importlib.import_module(m.name)\n"
        "            if m.ispkg:\n"
        "                walk(module.__path__, m.name + '.')\n"
        "walk(consumer.__path__, 'consumer.')\n",
    )
    assert probe.returncode == 0, probe.stderr


def test_run_without_a_cluster_names_the_missing_local_extra(image_venv: Path) -> None:
    result = run_in(image_venv, "chouette-relay", "run")
    assert result.returncode == 2
    assert "needs the 'local' extra" in result.stderr
    assert "CHOUETTE_RELAY_KAFKA__BOOTSTRAP_SERVERS" in result.stderr
    assert "Traceback" not in result.stderr
