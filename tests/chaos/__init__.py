"""The chaos test's seeded stream: LSC's truth over time, its records, what must come of them."""
