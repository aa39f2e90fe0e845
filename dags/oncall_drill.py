"""
### oncall_drill — fail on purpose: practise the failure alert and `decisionflow retry`

On demand. `fail_on_purpose` fails while the Airflow Variable `oncall_drill_fail` is true (also when it is unset),
with a non-retryable error (so at once, no retries), and `after` ends `upstream_failed`. The failure alert goes to
the `alerts_webhook` connection and the Kafka topic `platform-alerts`, naming layer `drill`, the cause and the
remedy. Then:

```bash
.venv/bin/airflow variables set oncall_drill_fail false     # or Admin -> Variables in the UI
.venv/bin/decisionflow retry oncall_drill                   # the plan: fail_on_purpose and after
.venv/bin/decisionflow retry oncall_drill RUN_ID --yes --wait
```

and both tasks run again and succeed.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from decisionflow.notifications.failure import failure_alerts
from decisionflow.operators.platform import OnCallDrillOperator

with DAG(
    dag_id="oncall_drill",
    description="fails on purpose while Variable oncall_drill_fail is true: the alert, then decisionflow retry",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["decisionflow", "platform", "on-call"],
    default_args=failure_alerts({"retries": 2, "retry_delay": timedelta(seconds=10), "owner": "platform",
                                 "execution_timeout": timedelta(minutes=5)}),
) as dag:
    drill = OnCallDrillOperator(task_id="fail_on_purpose")
    after = OnCallDrillOperator(task_id="after")  # its downstream: upstream_failed, then re-run by the retry

    drill >> after
