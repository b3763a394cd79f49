"""Root test configuration: registers the shared fixture modules."""

pytest_plugins = ["tests.fixtures.kafka", "tests.fixtures.partner", "tests.fixtures.relay"]
