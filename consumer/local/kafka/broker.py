"""One local Kafka process: ``LocalKafka`` starts, waits for, kills and stops a KRaft broker.

It formats a fresh data directory (or reuses a given one), runs ``kafka.Kafka`` with the machine's
Java in its own process group, waits until the broker answers a metadata request, and stops it
(SIGTERM, then SIGKILL). Kept whole: the start, its retries and the stop share the process state.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
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
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from consumer.local.kafka.client import broker_answers, run_in_fresh_loop
from consumer.local.kafka.config import (
    JVM_OPTIONS,
    LOG4J2_PROPERTIES,
    TOOL_JVM_OPTIONS,
    broker_properties,
    free_port,
    new_cluster_id,
)
from consumer.local.kafka.jars import KAFKA_VERSION, LOG_TAIL_LINES, LocalKafkaError, fetch_kafka
from consumer.local.tls import SecuredListeners

LOG_CAUSE_LINES = 5
_CAUSE = re.compile(r"\] (ERROR|FATAL) |^Exception in thread|^Caused by: ")


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
        log4j.write_text(LOG4J2_PROPERTIES, encoding="utf-8")
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
            if _port_accepts(port) and run_in_fresh_loop(lambda: broker_answers(bootstrap)):
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
