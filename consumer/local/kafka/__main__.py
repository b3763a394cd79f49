"""``python -m consumer.local.kafka fetch|run``: download the jars, or run a broker alone."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import consumer.local.kafka as package
from consumer.local.kafka.broker import LocalKafka
from consumer.local.kafka.jars import KAFKA_VERSION, LocalKafkaError, fetch_kafka


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m consumer.local.kafka", description=package.__doc__
    )
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
    sys.exit(main())
