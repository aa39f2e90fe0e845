"""Subprocess side of tests/integration/test_outbox_kafka.py: a sender the test SIGKILLs by PID.

    python _outbox_sender.py commit-then-hang LAKE BOOTSTRAP TOPIC MARKER BATCH_SIZE HANG_AFTER
        deliver_kafka; after batch HANG_AFTER is committed (and before it is marked sent) write MARKER and hang.
    python _outbox_sender.py open-transaction LAKE BOOTSTRAP TOPIC MARKER
        with the outbox's transactional.id: begin a transaction, produce every pending row, flush, write
        MARKER and hang with the transaction open (a sender killed mid-transaction).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from decisionflow.decisions.outbox import KAFKA, Outbox, deliver_kafka


def _hang(marker: str) -> None:
    Path(marker).write_text("ready")
    while True:
        time.sleep(60)


def main(argv: list[str]) -> int:
    mode, lake, bootstrap, topic, marker = argv[:5]
    outbox = Outbox(lake)
    if mode == "commit-then-hang":
        batch_size, hang_after = int(argv[5]), int(argv[6])

        def on_batch(number: int, records: int) -> None:
            if number == hang_after:
                _hang(marker)

        deliver_kafka(outbox, {"bootstrap.servers": bootstrap}, topic, batch_size=batch_size, on_batch=on_batch)
        return 1  # not reached: the test kills us
    if mode == "open-transaction":
        from confluent_kafka import Producer

        rows = outbox.pending(channel=KAFKA)
        producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": outbox.transactional_id(topic),
                             "transaction.timeout.ms": 600000})
        producer.init_transactions(30)
        producer.begin_transaction()
        for key, payload in zip(rows["decision_id"], rows["payload"]):
            producer.produce(topic, key=key.encode(), value=payload.encode())
        producer.flush(30)
        _hang(marker)
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
