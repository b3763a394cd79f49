"""A real single-node Apache Kafka broker (KRaft) for tests and ``make run``, without Docker.

The broker jars come from Maven Central through ``mvn`` and are cached under ``.cache/kafka/``;
``LocalKafka`` formats a fresh data directory, runs ``kafka.Kafka`` with the machine's Java, waits
until the broker answers a metadata request, and stops it (process group, SIGTERM then SIGKILL).
Run ``python -m consumer.local.kafka fetch|run`` to download the jars or to run a broker alone.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import ctypes
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar

from aiokafka import AIOKafkaClient
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from consumer.errors import RelayError
from consumer.kafka.connection import KafkaConnection
from consumer.local.tls import SecuredListeners

KAFKA_VERSION = "4.1.2"
# Kafka logs through slf4j 1.x; the binding must match the log4j-core that Kafka itself pulls in.
LOG4J_VERSION = "2.25.3"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache" / "kafka"
JVM_OPTIONS = (
    "-Xms256m",
    "-Xmx768m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)
# The storage tool is short-lived: a small heap and the quick compiler start it fastest.
TOOL_JVM_OPTIONS = ("-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")
LOG_TAIL_LINES = 30
LOG_CAUSE_LINES = 5
_CAUSE = re.compile(r"\] (ERROR|FATAL) |^Exception in thread|^Caused by: ")
_MARKER = ".complete"
_T = TypeVar("_T")

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

_LOG4J2_PROPERTIES = """status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding, as Kafka makes them."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):  # a leading dash would read as a command-line flag
            return cluster_id


def broker_properties(
    *, data_dir: Path, port: int, controller_port: int, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The ``server.properties`` of a single node acting as broker and controller."""
    properties = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data_dir / "data"),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "auto.create.topics.enable": "false",
        "auto.leader.rebalance.enable": "false",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        # Compacted topics (the relay's changelog) must really compact, and soon.
        "log.cleaner.enable": "true",
        "log.cleaner.threads": "1",
        "log.cleaner.backoff.ms": "500",
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        # Small files and few threads: this broker shares two cores with the tests.
        "log.segment.bytes": str(16 * 1024 * 1024),
        "log.index.size.max.bytes": str(1024 * 1024),
        "log.retention.check.interval.ms": "60000",
        "num.network.threads": "2",
        "num.io.threads": "2",
        "background.threads": "2",
        "num.recovery.threads.per.data.dir": "1",
    }
    properties.update(extra or {})
    return properties


def _run_in_fresh_loop(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    # A private thread keeps asyncio.run away from whatever loop the caller's thread owns.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="local-kafka") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


async def _broker_answers(bootstrap: str) -> bool:
    options = KafkaConnection(bootstrap_servers=bootstrap).options()
    client = AIOKafkaClient(**options, request_timeout_ms=5000)
    try:
        await client.bootstrap()
        return bool(client.cluster.brokers())
    except KafkaError:
        return False
    finally:
        await client.close()


def _die_with_parent() -> None:
    """In the broker's process, before exec: on Linux, get SIGTERM when the relay dies.

    A relay (or test run) killed with SIGKILL cannot stop its broker; the kernel can.
    """
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _port_accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


class LocalKafka:
    """One Kafka process: ``with LocalKafka() as kafka:`` or ``async with``; stopping is idempotent.

    The data directory is a fresh temporary one, removed on stop, unless ``data_dir`` is given or
    ``keep_data`` is set (a given ``data_dir`` that is already formatted is reused as it is). A
    start that fails keeps its data directory so that the log it names can be read.
    """

    def __init__(
        self,
        *,
        version: str = KAFKA_VERSION,
        cache_dir: Path | None = None,
        data_dir: Path | None = None,
        keep_data: bool = False,
        port: int | None = None,
        controller_port: int | None = None,
        extra_properties: Mapping[str, str] | None = None,
        secured: SecuredListeners | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 20.0,
    ) -> None:
        self._version = version
        self._cache_dir = cache_dir
        self._given_data_dir = data_dir
        self._keep_data = keep_data or data_dir is not None
        self._port = port
        self._controller_port = controller_port
        self._extra = dict(extra_properties or {})
        self._secured = secured
        self._secured_ports: dict[str, int] = {}
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._data_dir: Path | None = None
        self._bootstrap: str | None = None

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` of the PLAINTEXT listener; set once the broker has started."""
        if self._bootstrap is None:
            raise LocalKafkaError("the local Kafka broker is not started")
        return self._bootstrap

    def listener(self, name: str) -> str:
        """``host:port`` of a secured listener: ``SASL_SSL`` or ``SSL`` (``consumer.local.tls``)."""
        if self._bootstrap is None or name not in self._secured_ports:
            raise LocalKafkaError(f"the local Kafka broker has no started {name} listener")
        return f"127.0.0.1:{self._secured_ports[name]}"

    @property
    def data_dir(self) -> Path:
        """Where the broker keeps its configuration, log file and partitions."""
        if self._data_dir is None:
            raise LocalKafkaError("the local Kafka broker is not started")
        return self._data_dir

    @property
    def log_path(self) -> Path:
        """The broker's own log (stdout and stderr of the JVM and the storage tool)."""
        return self.data_dir / "broker.log"

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the broker and return once it answers a metadata request; no-op if running."""
        with self._lock:
            if self._process is not None:
                return
            libs = fetch_kafka(self._cache_dir, version=self._version)
            self._data_dir = self._given_data_dir or Path(
                tempfile.mkdtemp(prefix="chouette-relay-kafka-")
            )
            self._data_dir.mkdir(parents=True, exist_ok=True)
            # A picked port can be taken by someone else before Kafka binds it: pick again.
            attempts = 1 if self._port and self._controller_port else 3
            for attempt in range(1, attempts + 1):
                try:
                    self._start_once(libs)
                except LocalKafkaError:
                    self._terminate()
                    if attempt == attempts or not self._bind_failed():
                        raise
                else:
                    return

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL) and remove its temporary data; idempotent."""
        with self._lock:
            self._terminate()
            if self._data_dir is not None and not self._keep_data:
                shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None
            self._bootstrap = None

    def kill(self) -> None:
        """SIGKILL the broker's process group, as a crash would; its data directory stays.

        With a given ``data_dir`` and fixed ports, ``start()`` then brings the same broker back.
        """
        with self._lock:
            process = self._process
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            self._terminate()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    def _start_once(self, libs: Path) -> None:
        data_dir = self.data_dir
        port = self._port or free_port()
        controller_port = self._controller_port or free_port()
        properties = broker_properties(
            data_dir=data_dir, port=port, controller_port=controller_port, extra=self._extra
        )
        if self._secured is not None:
            self._secured_ports = {"SASL_SSL": free_port(), "SSL": free_port()}
            self._secured.add_to(
                properties,
                sasl_port=self._secured_ports["SASL_SSL"],
                ssl_port=self._secured_ports["SSL"],
            )
        config = data_dir / "server.properties"
        config.write_text(
            "".join(f"{key}={value}\n" for key, value in properties.items()), encoding="utf-8"
        )
        log4j = data_dir / "log4j2.properties"
        log4j.write_text(_LOG4J2_PROPERTIES, encoding="utf-8")
        java = shutil.which("java")
        if java is None:
            raise LocalKafkaError("the local Kafka broker needs Java 17+ ('java') on PATH")
        classpath = ["-cp", str(libs / "*"), f"-Dlog4j2.configurationFile={log4j}"]
        self._log = self.log_path.open("ab")
        # A given data directory that is already formatted keeps its cluster id and its topics.
        if not (data_dir / "data" / "meta.properties").is_file():
            self._format_storage(java, classpath, config)
        deadline = time.monotonic() + self._start_timeout
        self._process = subprocess.Popen(  # noqa: S603 - fixed argument list, no shell
            [java, *JVM_OPTIONS, *classpath, "kafka.Kafka", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            start_new_session=True,  # its own process group, so stop() reaches every child
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only calls prctl, safe after fork
        )
        bootstrap = f"127.0.0.1:{port}"
        while True:
            exit_code = self._process.poll()
            if exit_code is not None:
                raise LocalKafkaError(self._failure(f"the broker exited with code {exit_code}"))
            if _port_accepts(port) and _run_in_fresh_loop(lambda: _broker_answers(bootstrap)):
                self._bootstrap = bootstrap
                return
            if time.monotonic() > deadline:
                raise LocalKafkaError(
                    self._failure(f"the broker did not answer within {self._start_timeout:g} s")
                )
            time.sleep(0.2)

    def _format_storage(self, java: str, classpath: list[str], config: Path) -> None:
        formatted = subprocess.run(  # noqa: S603 - fixed argument list, no shell
            [
                java,
                *TOOL_JVM_OPTIONS,
                *classpath,
                "kafka.tools.StorageTool",
                "format",
                "--cluster-id",
                new_cluster_id(),
                "--config",
                str(config),
                *(self._secured.format_arguments() if self._secured else ()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            timeout=self._start_timeout,
            check=False,
        )
        if formatted.returncode != 0:
            raise LocalKafkaError(
                self._failure(f"formatting storage failed (exit {formatted.returncode})")
            )

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(self._stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        self._bootstrap = None

    def _failure(self, what: str) -> str:
        if self._log is not None:
            self._log.flush()
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        # The cause is often far above the last lines, which show the shutdown that followed it.
        causes = [line for line in lines if _CAUSE.search(line)][:LOG_CAUSE_LINES]
        return "\n".join(
            [
                f"local Kafka {self._version}: {what}; broker log: {self.log_path}",
                *(f"cause: {line.strip()}" for line in causes),
                f"last {LOG_TAIL_LINES} lines of the broker log:",
                *lines[-LOG_TAIL_LINES:],
            ]
        )

    def _bind_failed(self) -> bool:
        return "Address already in use" in self.log_path.read_text(errors="replace")


async def create_topics(
    bootstrap: str,
    names: list[str],
    *,
    partitions: int,
    config: dict[str, str] | None = None,
    timeout_ms: int = 30_000,
) -> None:
    """Create ``names`` with ``partitions`` partitions and ``config``; existing topics are kept."""
    options = KafkaConnection(bootstrap_servers=bootstrap).options()
    admin = AIOKafkaAdminClient(**options, request_timeout_ms=timeout_ms)
    try:
        await admin.start()
        topics = [NewTopic(name, partitions, 1, topic_configs=dict(config or {})) for name in names]
        response = await admin.create_topics(topics, timeout_ms=timeout_ms)
    finally:
        await admin.close()
    for topic, code, message in response.topic_errors:
        error = for_code(code)
        if code and error is not TopicAlreadyExistsError:
            raise error(f"cannot create topic {topic!r}: {message}")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m consumer.local.kafka", description=__doc__)
    parser.add_argument("--version", default=KAFKA_VERSION, help="Kafka version (Maven Central)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="download the broker jars into the cache")
    run = commands.add_parser("run", help="run a broker in the foreground until Ctrl-C")
    run.add_argument("--port", type=int, help="broker port (default: a free one)")
    run.add_argument("--controller-port", type=int, help="controller port (default: a free one)")
    run.add_argument("--data-dir", type=Path, help="keep data here (default: temporary)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            sys.stdout.write(f"{fetch_kafka(version=args.version)}\n")
            return 0
        stopping = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stopping.set())
        kafka = LocalKafka(
            version=args.version,
            data_dir=args.data_dir,
            port=args.port,
            controller_port=args.controller_port,
        )
        with kafka:
            sys.stdout.write(f"{kafka.bootstrap_servers}\n")
            sys.stdout.flush()
            sys.stderr.write(f"Kafka {args.version} running, log: {kafka.log_path}\n")
            while not stopping.wait(1.0):
                if not kafka.running:
                    sys.stderr.write(f"the broker stopped on its own; see {kafka.log_path}\n")
                    return 1
    except LocalKafkaError as error:
        sys.stderr.write(f"{error}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
