"""The embedded local default: Kafka, the ChouetteCopro sandbox, the LSC document store, a demo."""
