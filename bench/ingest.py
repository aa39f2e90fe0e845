"""Benchmark: Kafka -> bronze Delta (the ingest_bronze job) against a plain confluent-kafka consume loop.

In one run, on the same topic of a private broker (its own data dir and free ports, stopped by PID at the end):

1. generate a pool of real generator payloads (transactions topic, a little bad input, no oversized values),
   then produce M messages cycling through it - payload bytes are ready beforehand, so the producer measures
   Kafka, not the generator (production is timed and reported on its own);
2. **raw loop**: a confluent-kafka consumer in a new group reads the topic from the beginning until it has
   seen all M messages, touching each value (``len``) - the ceiling for "reading the topic";
3. **bronze**: ``spark-submit decisionflow/jobs/ingest_bronze.py --topics transactions`` into an empty lake,
   exactly as a DAG runs it. Throughput is rows / the streaming query's own time (``stream_s`` in the job's
   summary: first query started -> availableNow query finished, i.e. without JVM start-up, topic check and
   table creation); the spark-submit wall time is reported too.

Goal (issue): bronze >= 50k events/s and >= 0.5x the raw loop. ``make bench`` runs it with the defaults;
``python bench/ingest.py --help`` lists the knobs (messages, maxOffsetsPerTrigger, minPartitions, Parquet codec,
JIT mode).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from decisionflow import config
from decisionflow.contracts import TRANSACTIONS
from decisionflow.lakehouse.bronze import MAX_PARTITION_FETCH_BYTES

JOB = Path(__file__).resolve().parents[1] / "include" / "decisionflow" / "jobs" / "ingest_bronze.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((config.HOST, 0))
        return sock.getsockname()[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/ingest.py", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=300_000, help="messages to produce (default %(default)s)")
    parser.add_argument("--pool", type=int, default=20_000,
                        help="distinct generated payloads, cycled to --messages (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-offsets-per-trigger", type=int, default=None,
                        help="micro-batch size (default: the job's default)")
    parser.add_argument("--min-partitions", default=None, metavar="N|auto|none",
                        help="Spark tasks per batch (default: the job's, auto = a multiple of the cores)")
    parser.add_argument("--codec", default=None, choices=["snappy", "zstd", "lz4", "uncompressed"],
                        help="Parquet codec (spark.sql.parquet.compression.codec; default Spark's, snappy)")
    parser.add_argument("--fast-start", action=argparse.BooleanOptionalAction, default=True,
                        help="C1-only JIT + serial GC for the driver, as DeltaSparkSubmitOperator runs it "
                             "(default); --no-fast-start: C1+C2 and the parallel GC")
    parser.add_argument("--java-options", default="", help="extra driver JVM options (e.g. a JFR recording)")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--driver-memory", default="1g")
    parser.add_argument("--kafka-option", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to the job's --kafka-option")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Spark property for the job (repeatable)")
    parser.add_argument("--skip-raw", action="store_true", help="only the bronze job")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary broker data and lake")
    return parser.parse_args(argv)


# -- steps ----------------------------------------------------------------------------------------------------
def start_broker(root: Path):
    from decisionflow.stack.base import StackContext
    from decisionflow.stack.kafka import KafkaService

    service = KafkaService(StackContext(data=root, ports={"kafka": _free_port(), "kafka_controller": _free_port()}))
    service.start()
    try:
        service.wait_healthy(timeout=180)
    except Exception:
        service.stop()
        raise
    return service


def payload_pool(size: int, seed: int) -> list[tuple[bytes | None, bytes | None]]:
    """(key, value) of ``size`` generated transactions-topic messages; bad input but no oversized values."""
    from decisionflow.risk.generator import DEFAULT_BAD_WEIGHTS, EventGenerator, GeneratorConfig

    weights = {k: v for k, v in DEFAULT_BAD_WEIGHTS.items() if k != "oversized"}
    cfg = GeneratorConfig(events=size, seed=seed, bad_share=0.05, topics=(TRANSACTIONS,), bad_weights=weights)
    pool = []
    for message in EventGenerator(cfg):
        pool.append((message.key, message.value))
        if len(pool) >= size:
            break
    return pool


def produce(bootstrap: str, pool, count: int) -> dict:
    from confluent_kafka import Producer

    from decisionflow.risk.producer import PRODUCER_CONFIG

    errors = []

    def on_error(err):
        errors.append(str(err))

    producer = Producer({**PRODUCER_CONFIG, "bootstrap.servers": bootstrap, "client.id": "bench-ingest",
                         "linger.ms": 50, "batch.size": 1_000_000, "error_cb": on_error})
    started = time.perf_counter()
    size, nbytes = len(pool), 0
    for i in range(count):
        key, value = pool[i % size]
        nbytes += len(value or b"")
        while True:
            try:
                producer.produce(TRANSACTIONS, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10_000 == 0:
            producer.poll(0)
    remaining = producer.flush(300)
    elapsed = time.perf_counter() - started
    if remaining:
        raise RuntimeError(f"{remaining} messages not acknowledged: {errors[:3]}")
    return {"seconds": elapsed, "events": count, "bytes": nbytes}


def topic_count(bootstrap: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-watermarks"})
    try:
        parts = consumer.list_topics(TRANSACTIONS, timeout=10).topics[TRANSACTIONS].partitions
        total = 0
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(TRANSACTIONS, p), timeout=10)
            total += high - low
        return total
    finally:
        consumer.close()


def raw_consume(bootstrap: str, count: int) -> dict:
    """A plain consume loop: new group, from the beginning, until ``count`` messages were seen."""
    from confluent_kafka import Consumer

    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
        "max.partition.fetch.bytes": MAX_PARTITION_FETCH_BYTES, "fetch.max.bytes": 52_428_800,
    })
    seen = nbytes = 0
    first = None
    cpu0 = time.process_time()  # this process, all threads (librdkafka's included)
    started = time.perf_counter()
    try:
        consumer.subscribe([TRANSACTIONS])
        deadline = time.monotonic() + 600
        while seen < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"raw loop saw only {seen} of {count} messages in 600 s")
            for msg in consumer.consume(num_messages=10_000, timeout=1.0):
                if msg.error() is not None:
                    continue  # e.g. partition EOF
                if first is None:
                    first = time.perf_counter()
                value = msg.value()
                nbytes += len(value) if value is not None else 0
                seen += 1
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu0
    finally:
        consumer.close()
    return {"seconds": elapsed, "events": seen, "bytes": nbytes, "cpu_s": cpu,
            "first_message_s": (first - started) if first else None,
            "after_first_s": (time.perf_counter() - first) if first else None}


def bronze(bootstrap: str, lake: Path, work: Path, args) -> dict:
    from decisionflow.spark.conf import spark_env, spark_submit_argv

    conf = {"spark.sql.warehouse.dir": str(work / "warehouse")}
    if args.codec:
        conf["spark.sql.parquet.compression.codec"] = args.codec
    from decisionflow.spark.conf import FAST_START_JAVA_OPTIONS

    java = FAST_START_JAVA_OPTIONS if args.fast_start else "-XX:+UseParallelGC"
    conf["spark.driver.extraJavaOptions"] = f"{java} {args.java_options}".strip()
    for item in args.conf:
        key, _, value = item.partition("=")
        conf[key.strip()] = value.strip()
    job_args = ["--topics", TRANSACTIONS, "--lake-root", str(lake), "--bootstrap-servers", bootstrap]
    if args.max_offsets_per_trigger:
        job_args += ["--max-offsets-per-trigger", str(args.max_offsets_per_trigger)]
    if args.min_partitions:
        job_args += ["--min-partitions", str(args.min_partitions)]
    for option in args.kafka_option:
        job_args += ["--kafka-option", option]
    argv = spark_submit_argv(JOB, job_args, master=args.master, conf=conf, driver_memory=args.driver_memory,
                             name="bench_ingest_bronze")
    started = time.perf_counter()
    result = subprocess.run(argv, env={**os.environ, **spark_env(lake, bootstrap)}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"ingest_bronze failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-4000:]}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    table = summary["tables"]["transactions"]
    return {"wall_s": wall, "summary": summary, "rows": table["rows_added"], "stream_s": table["stream_s"],
            "batches": table["batches"], "cpu_s": summary.get("stream_cpu_s"),
            "min_partitions": table.get("min_partitions")}


# -- report ---------------------------------------------------------------------------------------------------
def _rate(events: int, seconds: float) -> float:
    return events / seconds if seconds else float("nan")


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def report(args, results: dict) -> str:
    mib = results["produce"]["bytes"] / 2**20
    m = args.messages
    lines = [
        f"bench/ingest.py: {m:,} messages on {TRANSACTIONS!r} (3 partitions), {mib:.1f} MiB of values, "
        f"pool of {args.pool:,} generated payloads",
        f"Spark {args.master}, driver {args.driver_memory}, JIT {'C1 only (fast start)' if args.fast_start else 'C1+C2'}; "
        f"{os.cpu_count()} cores, load average before/after: {results.get('load_before')} | {_load()}",
        "",
        f"{'step':<48}{'seconds':>9}{'events/s':>11}{'MiB/s':>8}{'CPU s':>8}{'events/CPU s':>14}",
        "-" * 98,
    ]

    def row(name, seconds, events=None, nbytes=None, cpu=None):
        rate = f"{_rate(events, seconds):>11,.0f}" if events else f"{'':>11}"
        mbs = f"{nbytes / 2**20 / seconds:>8.1f}" if nbytes and seconds else f"{'':>8}"
        cpus = f"{cpu:>8.2f}" if cpu is not None else f"{'':>8}"
        per_cpu = f"{events / cpu:>14,.0f}" if cpu and events else f"{'':>14}"
        lines.append(f"{name:<48}{seconds:>9.2f}{rate}{mbs}{cpus}{per_cpu}")

    row(f"generate payload pool ({args.pool:,})", results["pool_s"])
    row("produce (confluent-kafka, lz4, acks=all)", results["produce"]["seconds"], m, results["produce"]["bytes"])
    raw = results.get("raw")
    if raw:
        row("(a) raw loop: confluent-kafka, new group", raw["seconds"], raw["events"], raw["bytes"], raw["cpu_s"])
        row("    - after its first message (no group join)", raw["after_first_s"], raw["events"], raw["bytes"])
    b = results["bronze"]
    s = b["summary"]
    row(f"(b) bronze: streaming query, {b['batches']} batch(es)", b["stream_s"], b["rows"],
        results["produce"]["bytes"], b["cpu_s"])
    row("    - spark-submit wall (JVM, setup, report too)", b["wall_s"], b["rows"])
    lines.append(f"      session {s.get('session_s', 0):.1f} s, prepare {s.get('prepare_s', 0):.1f} s, "
                 f"stream {s.get('stream_s', 0):.1f} s, report {s.get('report_s', 0):.1f} s")
    lines.append("-" * 98)
    bronze_rate = _rate(b["rows"], b["stream_s"])
    results["bronze_events_per_s"] = bronze_rate
    lines.append(f"bronze events/s (streaming query): {bronze_rate:>10,.0f}   goal >= 50,000: "
                 f"{'PASS' if bronze_rate >= 50_000 else 'MISS'}")
    if raw:
        ratio = bronze_rate / _rate(raw["events"], raw["seconds"])
        steady = bronze_rate / _rate(raw["events"], raw["after_first_s"])
        results["ratio"], results["ratio_steady"] = ratio, steady
        lines.append(f"ratio bronze / raw loop:            {ratio:>10.2f}x  goal >= 0.5x: "
                     f"{'PASS' if ratio >= 0.5 else 'MISS'}   (vs the raw loop after its group join: {steady:.2f}x)")
        if raw["cpu_s"] and b["cpu_s"]:
            cpu_ratio = (b["rows"] / b["cpu_s"]) / (raw["events"] / raw["cpu_s"])
            results["ratio_cpu"] = cpu_ratio
            lines.append(f"ratio per CPU second:               {cpu_ratio:>10.2f}x")
    lines.append(f"rows in bronze == produced: {b['rows'] == m} ({b['rows']:,} / {m:,}); "
                 f"maxOffsetsPerTrigger {s['max_offsets_per_trigger']:,}, minPartitions {b['min_partitions']} "
                 f"({s['min_partitions']}), "
                 f"Parquet codec {args.codec or 'snappy'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="df-bench-ingest-"))
    service = None
    results: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    try:
        print(f"starting a private Kafka broker in {work} ...", file=sys.stderr, flush=True)
        service = start_broker(work / "stack")
        bootstrap = service.bootstrap_servers()
        from decisionflow.risk.producer import ensure_topics

        ensure_topics(bootstrap, [TRANSACTIONS], with_dlq=False)
        results["load_before"] = _load()
        t0 = time.perf_counter()
        pool = payload_pool(min(args.pool, args.messages), args.seed)
        results["pool_s"] = time.perf_counter() - t0
        print(f"producing {args.messages:,} messages ...", file=sys.stderr, flush=True)
        results["produce"] = produce(bootstrap, pool, args.messages)
        held = topic_count(bootstrap)
        if held != args.messages:
            raise RuntimeError(f"the topic holds {held} messages, {args.messages} were produced")
        if not args.skip_raw:
            print("raw consume loop ...", file=sys.stderr, flush=True)
            results["raw"] = raw_consume(bootstrap, args.messages)
        print("bronze ingest (spark-submit) ...", file=sys.stderr, flush=True)
        results["bronze"] = bronze(bootstrap, work / "lake", work, args)
        text = report(args, results)
        print(text, flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        return 0 if results["bronze"]["rows"] == args.messages else 1
    finally:
        if service is not None:
            service.stop()  # by the PID it recorded, with its process group
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
