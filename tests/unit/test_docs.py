"""The README is what an operator reads first: it must name every setting and every make target."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from pydantic import BaseModel

from consumer.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _variables() -> list[str]:
    names = []
    for name, field in Settings.model_fields.items():
        group = field.annotation
        if isinstance(group, type) and issubclass(group, BaseModel):
            names += [f"{name.upper()}__{sub.upper()}" for sub in group.model_fields]
        else:
            names.append(name.upper())
    return names


def test_the_readme_documents_every_setting() -> None:
    documented = set(re.findall(r"`([A-Z_]+(?:__[A-Z_]+)?)`", README))
    for pair in re.findall(r"`([A-Z_]+__[A-Z_]+)` / `([A-Z_]+__[A-Z_]+)`", README):
        documented.update(pair)
    missing = [name for name in _variables() if name not in documented]
    assert missing == [], f"README configuration table lacks {missing}"


def test_every_make_target_the_readme_names_is_in_make_help() -> None:
    listed = subprocess.run(
        ["make", "--no-print-directory", "help"],  # noqa: S607 - make from PATH, as the README says
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    targets = set(re.findall(r"^\s+(?:\x1b\[\d+m)?([a-z0-9-]+)", listed, flags=re.MULTILINE))
    named = set(re.findall(r"`make ([a-z0-9-]+)", README))
    assert {"run", "test"} <= named
    assert named - targets == set()
