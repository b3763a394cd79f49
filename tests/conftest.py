"""Root test configuration: registers the shared fixture modules and the hypothesis profile.

Property tests judge behaviour, never speed: on a loaded machine (the whole suite beside a broker
on two cores) an example may take longer than hypothesis's default deadline of 200 ms.

With ``-n N`` (pytest-xdist) the workers share one broker (``tests.fixtures.kafka``).
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.fixtures.kafka", "tests.fixtures.partner", "tests.fixtures.relay"]

settings.register_profile("relay", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("relay")
