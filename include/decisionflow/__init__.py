"""decisionflow: an Airflow provider and local platform for data -> model -> decision loops.

Kept import-light on purpose: DAG files import operators from here and must parse fast.
"""

__version__ = "0.1.0"


def get_provider_info() -> dict:
    """Airflow provider metadata (also reachable through the ``apache_airflow_provider`` entry point)."""
    from decisionflow.provider_info import get_provider_info as _info

    return _info()
