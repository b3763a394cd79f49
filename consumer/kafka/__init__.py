"""The Kafka edge: ingest, changelog, dead letters, commands. Imports core and shared only."""
