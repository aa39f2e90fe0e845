"""The real thing: DeltaSparkSubmitOperator spark-submits the lakehouse platform check (Delta + Kafka).

Runs the operator's ``execute`` (the provider's SparkSubmitHook underneath, connection ``spark_default`` =
``local[*]`` client mode) against the private Kafka broker and a temporary lake root, and measures the
wall time and the peak resident memory of the whole spark-submit process tree.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

try:  # tests/integration is a package (has __init__.py)
    from .fixtures_kafka import kafka_broker, kafka_connection  # noqa: F401 - pytest fixtures
except ImportError:  # collected as a plain directory (rootdir-relative import mode)
    from fixtures_kafka import kafka_broker, kafka_connection  # noqa: F401

import decisionflow.jobs
from decisionflow.hooks.kafka import KafkaHook

pytestmark = pytest.mark.integration

JOB = Path(decisionflow.jobs.__file__).parent / "platform_check_lakehouse.py"


class TreeMemorySampler:
    """Peak summed RSS of a process and all its descendants, sampled every ``interval`` seconds."""

    def __init__(self, find_root, interval: float = 0.2):
        self._find_root = find_root
        self._interval = interval
        self._stop = threading.Event()
        self.peak_bytes = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree_rss(root: int) -> int:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
        total, stack, page = 0, [root], os.sysconf("SC_PAGE_SIZE")
        while stack:
            pid = stack.pop()
            try:
                with open(f"/proc/{pid}/statm") as statm:
                    total += int(statm.read().split()[1]) * page
            except (OSError, ValueError, IndexError):
                pass
            stack.extend(children.get(pid, []))
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            root = self._find_root()
            if root is not None:
                self.peak_bytes = max(self.peak_bytes, self._tree_rss(root))
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.fixture
def lakehouse(kafka_connection, tmp_path, monkeypatch):
    """Connections for the operator: the private broker, a tmp lake root, Spark local[*] in client mode."""
    lake = tmp_path / "lake"
    monkeypatch.setenv("AIRFLOW_CONN_LAKE_DEFAULT", json.dumps({"conn_type": "delta_lake", "extra": {"root": str(lake)}}))
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({
        "conn_type": "spark", "host": "local[*]", "extra": {"deploy-mode": "client", "spark-binary": "spark-submit"},
    }))
    # the scratch topic the job reads must exist and hold at least one message
    KafkaHook().platform_check()
    return {"lake": lake, "bootstrap": kafka_connection, "tmp": tmp_path}


def _submit(lakehouse, run: str, *extra_args: str):
    """Run the operator once; returns (summary dict, seconds, peak bytes, exception or None)."""
    from decisionflow.operators.spark import DeltaSparkSubmitOperator

    summary_path = lakehouse["tmp"] / f"summary-{run}.json"
    op = DeltaSparkSubmitOperator(
        task_id=f"spark_delta_{run}",
        application=str(JOB),
        name=f"platform_check_lakehouse_{run}",
        application_args=["--summary-path", str(summary_path), *extra_args],
        conf={"spark.sql.warehouse.dir": str(lakehouse["tmp"] / "warehouse")},
    )

    def spark_submit_pid():
        process = getattr(op._hook, "_submit_sp", None) if op._hook is not None else None
        return process.pid if process is not None else None

    error = None
    started = time.monotonic()
    with TreeMemorySampler(spark_submit_pid) as sampler:
        try:
            op.execute(context={})
        except Exception as exc:  # noqa: BLE001 - the failure test inspects it
            error = exc
    seconds = time.monotonic() - started
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    print(f"\n[spark-submit {run}] {seconds:.1f}s wall, peak RSS {sampler.peak_bytes / 2**20:.0f} MiB "
          f"(spark-submit JVM + Python driver); job timings: "
          f"{ {k: v for k, v in (summary or {}).items() if k.endswith('_s')} }")
    return op, summary, seconds, sampler.peak_bytes, error


def test_lakehouse_platform_check_spark_submit_and_rerun(lakehouse):
    op, first, seconds, peak, error = _submit(lakehouse, "first")
    assert error is None, error
    assert op.pool == "spark"
    assert op.env_vars["DECISIONFLOW_LAKE_ROOT"] == str(lakehouse["lake"])
    assert op.env_vars["DECISIONFLOW_KAFKA_BOOTSTRAP_SERVERS"] == lakehouse["bootstrap"]

    assert first["ok"] is True, first
    assert first["spark_version"] == "4.2.0"
    assert first["delta"] == {
        "table": f"{lakehouse['lake']}/_platform_check/delta",
        "base_version": 0, "latest_version": 1, "latest_rows": 15, "time_travel_rows": 10,
    }
    assert first["kafka"]["topic"] == KafkaHook.PLATFORM_CHECK_TOPIC
    assert first["kafka"]["rows"] >= 1
    assert (lakehouse["lake"] / "_platform_check" / "delta" / "_delta_log").is_dir()

    # idempotent: a rerun overwrites the table and time-travels to its own base version
    _, second, _, _, error = _submit(lakehouse, "rerun")
    assert error is None, error
    assert second["ok"] is True, second
    assert (second["delta"]["base_version"], second["delta"]["latest_version"]) == (2, 3)
    assert (second["delta"]["latest_rows"], second["delta"]["time_travel_rows"]) == (15, 10)
    assert second["kafka"]["rows"] >= first["kafka"]["rows"]


def test_lakehouse_check_fails_clearly(lakehouse):
    _, summary, _, _, error = _submit(lakehouse, "missing-topic", "--topic", "decisionflow.no-such-topic")
    assert error is not None, "spark-submit should exit non-zero when a check fails"
    # the task fails with the job's own error line (naming the topic), not spark-submit's command line
    assert "decisionflow.no-such-topic" in str(error) and "spark-submit" not in str(error).split(":")[0], error
    assert summary["ok"] is False
    assert "decisionflow.no-such-topic" in summary["error"]
    assert summary["delta"]["latest_rows"] == 15  # the Delta half still ran and passed
