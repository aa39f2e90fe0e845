"""The transaction-risk use case: plain-Python domain logic (no Airflow, Kafka or Spark needed to import it).

* :mod:`decisionflow.risk.generator` - seeded synthetic event streams with hidden fraud patterns and bad input.
* :mod:`decisionflow.risk.producer` - writes those streams to Kafka and records the ground truth.
"""
