"""decisionflow_serving: the FastAPI gateway in front of the risk model (plain uvicorn or Ray Serve).

Importable without Airflow: it uses only the plain-Python ``decisionflow`` domain modules (policy, feature
transforms, the online feature reader, the decision core). ``create_app`` lives in ``decisionflow_serving.app``.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
