"""chouette-relay: forwards LSC document publications from Kafka to ChouetteCopro as deltas."""
