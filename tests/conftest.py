"""Root test configuration: registers the shared fixture modules and the hypothesis profile.

Property tests judge behaviour, never speed: on a loaded machine (the whole suite beside a broker
on two cores) an example may take longer than hypothesis's default deadline of 200 ms.
"""

from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.fixtures.kafka", "tests.fixtures.partner", "tests.fixtures.relay"]

settings.register_profile("relay", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("relay")
