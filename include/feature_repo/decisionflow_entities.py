"""Feast entities of decisionflow: who a decision is about.

Loaded by ``FeastHook.apply()`` (Feast's own ``parse_repo``), which imports every ``*.py`` file of this directory
by its file name as a top-level module -- hence the ``decisionflow_`` prefix, to never shadow a real package.
The Feast project, registry and stores come from the Airflow connection ``feast_default``, not from a
``feature_store.yaml``.
"""

from feast import Entity, ValueType

account = Entity(
    name="account",
    join_keys=["account_id"],
    value_type=ValueType.STRING,
    description="A customer account: the party a transaction is debited from.",
    tags={"owner": "decisionflow"},
)

merchant = Entity(
    name="merchant",
    join_keys=["merchant_id"],
    value_type=ValueType.STRING,
    description="A merchant: the party a transaction is paid to.",
    tags={"owner": "decisionflow"},
)
