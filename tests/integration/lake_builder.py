"""Build a real lake (Spark + Delta) from the seeded generator, without Kafka: shared by integration tests.

Bronze rows get fake Kafka partitions (by key) and offsets; then the project's own migrate -> silver -> gold.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from datetime import datetime, timezone

from decisionflow.lakehouse.tables import BRONZE_DDL, BRONZE_TABLES, join_path


def bronze_rows(messages, partitions: int = 3):
    """Bronze rows per topic with fake partition (by key) and offsets, and the truth by (topic, partition, offset)."""
    next_offset: dict[tuple[str, int], int] = defaultdict(int)
    rows: dict[str, list] = {topic: [] for topic in BRONZE_TABLES}
    truth = {}
    ingested = datetime.now(timezone.utc).replace(microsecond=0)
    for m in messages:
        partition = zlib.crc32(m.key or b"") % partitions
        offset = next_offset[(m.topic, partition)]
        next_offset[(m.topic, partition)] += 1
        sent = datetime.fromisoformat(m.sent_at.replace("Z", "+00:00"))
        rows[m.topic].append((m.topic, partition, offset, sent, m.key.decode() if m.key is not None else None, m.value,
                              len(m.value) if m.value is not None else None, ingested, ingested.date()))
        truth[(m.topic, partition, offset)] = m
    return rows, truth


def write_bronze(spark, lake: str, rows) -> None:
    for topic, items in rows.items():
        (spark.createDataFrame(items, BRONZE_DDL).write.format("delta").mode("append")
         .partitionBy("ingest_date").save(join_path(lake, BRONZE_TABLES[topic])))


def build_lake(spark, lake: str, messages) -> dict:
    """bronze (from ``messages``) -> migrate -> silver -> gold on ``lake``; the stage results."""
    from decisionflow.lakehouse import gold, maintenance, silver

    rows, truth = bronze_rows(messages)
    write_bronze(spark, lake, rows)
    return {"rows": rows, "truth": truth, "migrations": maintenance.migrate(spark, lake),
            "silver": silver.run_silver(spark, lake), "gold": gold.run_gold(spark, lake)}
