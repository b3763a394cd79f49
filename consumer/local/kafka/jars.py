"""The Kafka broker's jars: fetched once from Maven Central through ``mvn``, cached on disk.

``fetch_kafka`` resolves Kafka and the log4j binding it needs with the dependency plugin into
``.cache/kafka/<version>/libs``; a marker file and a file lock make it idempotent across processes.
``LocalKafkaError`` is the one error of the local broker, from fetching to stopping.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from pathlib import Path

from consumer.errors import RelayError

KAFKA_VERSION = "4.1.2"
# Kafka logs through slf4j 1.x; the binding must match the log4j-core that Kafka itself pulls in.
LOG4J_VERSION = "2.25.3"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[3] / ".cache" / "kafka"
LOG_TAIL_LINES = 30
_MARKER = ".complete"

_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>chouette-relay.local</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{kafka}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""


class LocalKafkaError(RelayError):
    """The local broker could not be fetched, started or stopped; the message says why."""

    fatal = True


def fetch_kafka(cache_dir: Path | None = None, *, version: str = KAFKA_VERSION) -> Path:
    """Download the Kafka ``version`` jars once and return the directory that holds them.

    Idempotent and safe to call from several processes at once: a marker file written after a
    complete download makes later calls return at once, and a file lock serialises downloads.
    """
    version_dir = (cache_dir or DEFAULT_CACHE_DIR) / version
    libs = version_dir / "libs"
    if (version_dir / _MARKER).is_file():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None or shutil.which("java") is None:
        raise LocalKafkaError(
            "the local Kafka broker needs Java 17+ ('java') and Maven ('mvn') on PATH"
        )
    version_dir.mkdir(parents=True, exist_ok=True)
    with (version_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (version_dir / _MARKER).is_file():
            return libs
        pom = version_dir / "pom.xml"
        pom.write_text(_POM.format(kafka=version, log4j=LOG4J_VERSION), encoding="utf-8")
        staging = version_dir / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(libs, ignore_errors=True)
        command = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            f"{DEPENDENCY_PLUGIN}:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ]
        result = subprocess.run(  # noqa: S603 - fixed argument list, no shell
            command, capture_output=True, text=True, check=False
        )
        if result.returncode != 0 or not (staging / f"kafka_2.13-{version}.jar").is_file():
            output = (result.stdout + result.stderr).strip().splitlines()
            raise LocalKafkaError(
                f"could not download Kafka {version} with Maven (exit {result.returncode}):\n"
                + "\n".join(output[-LOG_TAIL_LINES:])
            )
        staging.rename(libs)
        (version_dir / _MARKER).write_text(version + "\n", encoding="utf-8")
    return libs
