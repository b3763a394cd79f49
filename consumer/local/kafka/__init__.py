"""A real single-node Apache Kafka broker (KRaft) for tests and ``make run``, without Docker.

The broker jars come from Maven Central through ``mvn`` and are cached under ``.cache/kafka/``;
``LocalKafka`` formats a fresh data directory, runs ``kafka.Kafka`` with the machine's Java, waits
until the broker answers a metadata request, and stops it (process group, SIGTERM then SIGKILL).
Run ``python -m consumer.local.kafka fetch|run`` to download the jars or to run a broker alone.
The package's modules: ``jars`` (download), ``config`` (properties), ``broker`` (the process),
``client`` (start-up check, topics); secured listeners are ``consumer.local.tls``.
"""

from consumer.local.kafka.broker import LocalKafka
from consumer.local.kafka.client import create_topics
from consumer.local.kafka.config import broker_properties, free_port, new_cluster_id
from consumer.local.kafka.jars import KAFKA_VERSION, LocalKafkaError, fetch_kafka

__all__ = [
    "KAFKA_VERSION",
    "LocalKafka",
    "LocalKafkaError",
    "broker_properties",
    "create_topics",
    "fetch_kafka",
    "free_port",
    "new_cluster_id",
]
