"""Kafka's own write latency, measured beside a benchmark: how much of a tail is the broker's.

    python -m bench.kafka_probe --bootstrap B --topic T --rate R --seconds S --out FILE
        [--start MONOTONIC]

Writes R small records a second for S seconds, each on its own schedule (open loop),
with the settings that matter to Bigpipe's ingest producer (acks=all, idempotence,
linger.ms 1), and records each one's time from produce() to its acknowledgement.
FILE gets the latencies in ms, as a JSON list. Run beside Bigpipe's latency rounds,
its p99 is what the broker and the shared cores put into any writer's tail at that
moment; run beside the bare handler's, which leave Kafka idle, it is the broker's own.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import orjson
from confluent_kafka import Producer

VALUE = b"x" * 240  # about a call's envelope
POLL_SECONDS = 0.05


def probe(bootstrap: str, topic: str, rate: float, seconds: float, start: float) -> list[float]:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 1,
        }
    )
    latencies: list[float] = []
    stopping = threading.Event()

    def poll_forever() -> None:  # acknowledgements come at once, as in Bigpipe's producer
        while not stopping.is_set():
            producer.poll(POLL_SECONDS)

    def acknowledged(sent: float, error: object, _message: object) -> None:
        if error is None:
            latencies.append((time.monotonic() - sent) * 1000)

    poller = threading.Thread(target=poll_forever, daemon=True)
    poller.start()
    producer.produce(topic, VALUE)  # connected and the producer id known before the start
    producer.flush(30)
    for index in range(int(rate * seconds)):
        if (wait := start + index / rate - time.monotonic()) > 0:
            time.sleep(wait)
        sent = time.monotonic()
        producer.produce(topic, VALUE, on_delivery=lambda e, m, sent=sent: acknowledged(sent, e, m))
    producer.flush(30)
    stopping.set()
    poller.join()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--start", type=float, default=0.0, help="CLOCK_MONOTONIC to begin at")
    args = parser.parse_args()
    start = max(args.start, time.monotonic())
    latencies = probe(args.bootstrap, args.topic, args.rate, args.seconds, start)
    args.out.write_bytes(orjson.dumps(latencies))


if __name__ == "__main__":
    main()
