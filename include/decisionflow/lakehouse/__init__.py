"""The decisionflow lakehouse: bronze (raw Kafka records in Delta), silver, gold, quality and maintenance.

Kept import-light on purpose: DAG files and the CLI import from here, so nothing in this package imports
pyspark, Airflow or a Kafka client at module level. Import the layer module you need, e.g.
``from decisionflow.lakehouse.bronze import BRONZE_DDL, bronze_offsets``.
"""
