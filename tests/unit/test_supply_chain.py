"""What gets installed is locked, hash-checked, and only what each place needs.

``requirements/*.txt`` (written by ``make lock``) pin every package with its hashes: the runtime
lock feeds the image and the SBOM, the dev lock (runtime, dev and local extras) the virtualenv of
``make install``. The production path never imports the local stack or its OpenAPI validator.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
LOCAL_ONLY = {"openapi-core"}


def pins(lock: str) -> dict[str, str]:
    """Package -> pinned version of a lock file, checking that every pin carries hashes."""
    found: dict[str, str] = {}
    entries = re.split(r"\n(?=\S)", (REQUIREMENTS / lock).read_text(encoding="utf-8"))
    for entry in entries:
        if not entry.strip() or entry.startswith("#"):
            continue
        match = PIN.match(entry)
        assert match, f"{lock}: not an exact pin: {entry.splitlines()[0]}"
        assert "--hash=sha256:" in entry, f"{lock}: {match[1]} has no hash"
        found[canonicalize_name(match[1])] = match[2]
    return found


def requirements_of(*extras: str) -> list[Requirement]:
    project = PYPROJECT["project"]
    declared = list(project["dependencies"])
    for extra in extras:
        declared += project["optional-dependencies"][extra]
    return [Requirement(text) for text in declared]


@pytest.mark.parametrize(
    ("lock", "extras"),
    [("runtime.txt", ()), ("dev.txt", ("dev", "local"))],
)
def test_the_lock_satisfies_every_requirement_of_pyproject(
    lock: str, extras: tuple[str, ...]
) -> None:
    locked = pins(lock)
    for requirement in requirements_of(*extras):
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is in pyproject.toml but not in {lock}: run make lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{lock} pins {name}=={locked[name]}, pyproject.toml wants {requirement}: run make lock"
        )


def test_development_runs_the_runtime_versions_the_image_ships() -> None:
    runtime, dev = pins("runtime.txt"), pins("dev.txt")
    differing = {n: (v, dev.get(n)) for n, v in runtime.items() if dev.get(n) != v}
    assert not differing, f"dev.txt drifts from runtime.txt: {differing}"


def test_local_only_tools_stay_out_of_the_runtime() -> None:
    runtime = {canonicalize_name(r.name) for r in requirements_of()}
    local = {canonicalize_name(r.name) for r in requirements_of("local")} - runtime
    assert local >= LOCAL_ONLY
    assert not LOCAL_ONLY & runtime
    assert not LOCAL_ONLY & set(pins("runtime.txt"))
    assert set(pins("dev.txt")) >= LOCAL_ONLY


def test_installers_are_locked_too() -> None:
    assert set(pins("uv.txt")) == {"uv"}
    assert {"pip", "setuptools", "wheel"} <= set(pins("build.txt"))
    requires = PYPROJECT["build-system"]["requires"]
    backend = {canonicalize_name(Requirement(r).name) for r in requires}
    assert backend <= set(pins("build.txt"))


def test_production_commands_never_import_the_local_stack() -> None:
    """Every module outside consumer/local imports without it (the image has no local extra)."""
    probe = """
import importlib, json, pkgutil, sys
import consumer
def walk(path, prefix):
    # Not pkgutil.walk_packages: it imports every sub-package, the local stack's included.
    for info in pkgutil.iter_modules(path, prefix):
        if info.name != "consumer.local":
            module = importlib.import_module(info.name)
            if info.ispkg:
                walk(module.__path__, info.name + ".")
walk(consumer.__path__, "consumer.")
print(json.dumps(sorted(sys.modules)))
"""
    result = subprocess.run(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    loaded = json.loads(result.stdout)
    leaked = [m for m in loaded if m.startswith(("consumer.local.", "openapi_core"))]
    assert leaked == []


def test_the_image_installs_the_runtime_lock_on_a_pinned_base() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    base = re.search(r"^ARG PYTHON_BASE=(\S+)$", dockerfile, flags=re.MULTILINE)
    assert base, "Dockerfile: no ARG PYTHON_BASE"
    assert "@sha256:" in base[1], "the base image must be pinned by digest"
    stages = re.findall(r"^FROM (\S+)", dockerfile, flags=re.MULTILINE)
    assert stages == ["${PYTHON_BASE}", "${PYTHON_BASE}"]
    assert "requirements/runtime.txt" in dockerfile
    assert "requirements/dev.txt" not in dockerfile
    assert "RUN sh docker/build-venv.sh" in dockerfile
    # Exec form: the relay is PID 1 and receives SIGTERM itself (it needs no init process).
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", dockerfile, flags=re.MULTILINE)
    assert entrypoint
    assert json.loads(entrypoint[1]) == ["chouette-relay"]


def test_the_sbom_lists_every_runtime_pin_with_its_hashes(tmp_path: Path) -> None:
    """``make sbom``: CycloneDX from the runtime lock, the image's contents and nothing more."""
    output = tmp_path / "sbom.json"
    subprocess.run(  # noqa: S603 - the virtualenv's own cyclonedx-py, fixed arguments
        [
            str(Path(sys.executable).with_name("cyclonedx-py")),
            "requirements",
            "--pyproject",
            str(ROOT / "pyproject.toml"),
            "--output-format",
            "JSON",
            "--output-file",
            str(output),
            str(REQUIREMENTS / "runtime.txt"),
        ],
        capture_output=True,
        check=True,
        env={"PYTHONWARNINGS": "ignore::UserWarning"},
    )
    bom = json.loads(output.read_text(encoding="utf-8"))
    assert bom["bomFormat"] == "CycloneDX"
    assert bom["metadata"]["component"]["name"] == "chouette-relay"
    listed = {canonicalize_name(c["name"]): c["version"] for c in bom["components"]}
    assert listed == pins("runtime.txt")
    for component in bom["components"]:
        hashes = [h for ref in component["externalReferences"] for h in ref.get("hashes", [])]
        assert hashes, f"{component['name']} has no hash in the SBOM"
