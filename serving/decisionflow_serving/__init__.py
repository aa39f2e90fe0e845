"""decisionflow_serving: the FastAPI gateway in front of the risk model (plain uvicorn or Ray Serve).

Importable without Airflow: it uses only the plain-Python ``decisionflow`` domain modules (policy, feature
transforms, the online feature reader, the decision core). ``create_app`` lives in ``decisionflow_serving.app``.
"""

# Importing feast.metrics sets PROMETHEUS_MULTIPROCESS_DIR for the whole process, and prometheus_client picks
# its value storage once, at its own import: imported first, the gateway's metrics stay in-process counters
# (one registry per replica) instead of shared mmap files that every metric of the same name adds up into.
import prometheus_client.values  # noqa: F401,E402  (before anything imports Feast)

__all__ = ["__version__"]

__version__ = "0.1.0"
