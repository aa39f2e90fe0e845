"""PLACEHOLDER feature view -- to be replaced by the Delta-backed gold feature views in a later issue.

It exists only so that the feature repo is real end to end (an entity-keyed view over a batch source that
``feast apply`` registers and that gets an online-store table). Its parquet path under the lake root does not
need to exist: the schema is declared in full, so Feast infers nothing from the file at apply time.
Do not build on it: no job writes that file, and it will be deleted when the gold views land.
"""

from datetime import timedelta

from decisionflow import config
from decisionflow_entities import account
from feast import FeatureView, Field, FileSource
from feast.types import Float64, Int64, String

# The lake lives under the data root (DECISIONFLOW_DATA, default <project>/.data).
LAKE_ROOT = config.data_dir() / "lake"

account_activity_placeholder_source = FileSource(
    name="account_activity_placeholder_source",
    path=str(LAKE_ROOT / "placeholder" / "account_activity.parquet"),
    timestamp_field="event_timestamp",
    description="PLACEHOLDER: replaced by a Delta gold table in a later issue.",
)

account_activity_placeholder = FeatureView(
    name="account_activity_placeholder",
    entities=[account],
    ttl=timedelta(days=7),
    schema=[
        Field(name="account_id", dtype=String),
        Field(name="txn_count_7d", dtype=Int64),
        Field(name="amount_sum_7d", dtype=Float64),
    ],
    source=account_activity_placeholder_source,
    online=True,
    description="PLACEHOLDER until the Delta-backed gold views replace it.",
    tags={"placeholder": "true", "owner": "decisionflow"},
)
