"""The audit's pace: at most its share of the agency's rate, and a setting that says how much."""

from __future__ import annotations

import pytest

from consumer.errors import ConfigError
from consumer.ops.audit import AuditPace
from consumer.partner.ratelimit import RateLimit
from consumer.settings import load_settings


class FakeTime:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


async def test_an_audit_never_sends_more_than_its_share_in_any_window() -> None:
    time = FakeTime()
    pace = AuditPace(
        "agence-a",
        RateLimit(rate_per_second=10, burst=10).share(0.2),
        scheduler=None,
        clock=time.clock,
        sleep=time.sleep,
    )
    sent_at = []
    for _ in range(41):
        await pace()
        sent_at.append(time.now)

    assert pace.taken == 41
    # Two requests a second, the first at once: 41 requests span 20 seconds, never fewer.
    assert sent_at[-1] == pytest.approx(20.0)
    for start, first in enumerate(sent_at):
        in_one_second = [t for t in sent_at[start:] if t < first + 1.0 - 1e-6]
        assert len(in_one_second) <= 2


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "lots"])
def test_an_audit_share_that_cannot_work_stops_start_up_naming_it(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CHOUETTE_RELAY_AUDIT__RATE_SHARE", value)
    with pytest.raises(ConfigError, match="CHOUETTE_RELAY_AUDIT__RATE_SHARE"):
        load_settings()


def test_the_audit_share_defaults_to_a_fifth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHOUETTE_RELAY_AUDIT__RATE_SHARE", raising=False)
    assert load_settings().audit.rate_share == 0.2
