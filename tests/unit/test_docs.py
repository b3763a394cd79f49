"""The README is what an operator reads first: it must name every setting and every make target."""

from __future__ import annotations

import itertools
import re
import subprocess
from pathlib import Path

import aiohttp
from pydantic import BaseModel

from consumer.core.routing import Reason
from consumer.errors import (
    ContentError,
    ContentUnavailableError,
    PartnerError,
    PartnerParkedError,
    PartnerRejectedError,
    PartnerRetriableError,
    RemoteIdError,
)
from consumer.failures import Disposition, Scope, classify
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


DEPLOY_README = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")


def _parked_reasons_in_code() -> set[str]:
    """Every reason a document can be parked with: the routing's, and whatever ``classify``
    does not stop the relay for, in the scope where nothing is dead-lettered (a document's
    retries spent, a parked document sent again, a withdrawal)."""
    errors: list[Exception] = [
        PartnerParkedError("401"),
        PartnerRetriableError("503"),
        PartnerRejectedError("422"),
        PartnerError("an answer outside the contract"),
        RemoteIdError("../admin"),
        ContentUnavailableError("503", reason="content_unavailable"),
        ContentError("sha256", reason="content_rejected"),
        ContentError("port", reason="bad_url"),
        aiohttp.InvalidURL("http://x:99999"),
        aiohttp.ClientConnectionError(),
        KeyError("a bug"),
    ]
    verdicts = [classify(error, Scope.RELAY) for error in errors]
    # What is retried parks with its reason once the document's attempts are spent.
    parking = (Disposition.PARK, Disposition.RETRY)
    reasons = {v.reason.split(":", 1)[0] for v in verdicts if v.disposition in parking}
    return reasons | {str(Reason.UNMAPPED_BUILDING)}


def _reasons_of_table(text: str, heading: str) -> set[str]:
    """The first column of the first table after ``heading``: `reason` or `unexpected:<T>`."""
    lines = text[text.index(heading) :].splitlines()
    start = next(n for n, line in enumerate(lines) if line.lstrip().startswith("|"))
    table = itertools.takewhile(lambda line: line.lstrip().startswith("|"), lines[start:])
    return {m[1] for line in table if (m := re.match(r"\s*\|\s*`([a-z_]+)(?::<\w+>)?`", line))}


def test_the_readme_the_runbook_and_the_code_name_the_same_parked_reasons() -> None:
    code = _parked_reasons_in_code()
    readme = _reasons_of_table(README, "- **Parked** (needs an operator)")
    runbook = _reasons_of_table(DEPLOY_README, "### ChouetteRelayDocumentsParked")
    assert readme == code, f"README: {sorted(readme)}, code: {sorted(code)}"
    assert runbook == code, f"runbook: {sorted(runbook)}, code: {sorted(code)}"
