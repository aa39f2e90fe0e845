"""
### platform_check — is every layer of decisionflow working?

The first thing on-call runs when something looks wrong. One task per layer, each a real round trip through
decisionflow's own hook, never a ping:

| task | proves |
|---|---|
| `kafka` | produce + consume on the scratch topic `decisionflow.platform-check` |
| `spark_delta` | a spark-submit job (our Delta + Kafka jars) writes, reads back and time-travels a Delta table and reads the scratch topic |
| `mlflow` | a run is logged (param, metric, artifact) and read back |
| `ray` | a remote task runs on the Ray cluster; the dashboard answers |
| `milvus` | a scratch collection: insert, search, nearest neighbour correct |
| `feast` | Feast imports and the feature repository applies |

Every task is idempotent (clear and rerun freely) and retried twice. A failure logs three lines —
**layer**, **cause**, **remedy** — at the end of the task log. Connections come from `airflow_settings.yaml`
(`make settings` reloads them without a restart).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG

import decisionflow.jobs
from decisionflow.notifications.failure import FailureNotifier, failure_alerts
from decisionflow.operators.platform import LayerCheckOperator, layer_failure_callback
from decisionflow.operators.spark import DeltaSparkSubmitOperator

JOBS_DIR = Path(decisionflow.jobs.__file__).parent
SPARK_REMEDY = ("check the spark-submit output above; `make jars` if a class is missing; the lake root in connection "
                "lake_default must be writable")

with DAG(
    dag_id="platform_check",
    description="End-to-end self-check of every decisionflow layer (run this first when something looks wrong)",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["decisionflow", "platform", "on-call"],
    # A hung layer must fail (and say so), not hold on-call hostage: every check is bounded.
    default_args=failure_alerts({"retries": 2, "retry_delay": timedelta(seconds=15), "owner": "platform",
                                 "execution_timeout": timedelta(minutes=10)}),
) as dag:
    kafka = LayerCheckOperator(task_id="kafka", hook_class="decisionflow.hooks.kafka.KafkaHook",
                               conn_id="kafka_default")
    spark_delta = DeltaSparkSubmitOperator(
        task_id="spark_delta",
        application=str(JOBS_DIR / "platform_check_lakehouse.py"),
        name="platform_check_lakehouse",
        # its own callback overrides default_args': keep the alert beside the three log lines
        on_failure_callback=[layer_failure_callback("spark+delta", SPARK_REMEDY),
                             FailureNotifier(layer="spark+delta", remedy=SPARK_REMEDY)],
    )
    mlflow = LayerCheckOperator(task_id="mlflow", hook_class="decisionflow.hooks.mlflow.MlflowHook",
                                conn_id="mlflow_default")
    ray = LayerCheckOperator(task_id="ray", hook_class="decisionflow.hooks.ray.RayHook", conn_id="ray_default")
    milvus = LayerCheckOperator(task_id="milvus", hook_class="decisionflow.hooks.milvus.MilvusHook",
                                conn_id="milvus_default")
    feast = LayerCheckOperator(task_id="feast", hook_class="decisionflow.hooks.feast.FeastHook",
                               conn_id="feast_default")

    # The Spark job reads the scratch topic, so the Kafka round trip goes first.
    kafka >> spark_delta
