"""Project settings: the Astro-format ``airflow_settings.yaml`` and its loader.

Names are re-exported lazily so that ``python -m decisionflow.settings.airflow_settings`` does not
import the module twice; nothing here imports Airflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "AirflowSettings",
    "ConnectionSpec",
    "PoolSpec",
    "SettingsError",
    "VariableSpec",
    "apply_settings",
    "default_settings_path",
    "load_settings",
]

if TYPE_CHECKING:
    from decisionflow.settings.airflow_settings import (
        AirflowSettings,
        ConnectionSpec,
        PoolSpec,
        SettingsError,
        VariableSpec,
        apply_settings,
        default_settings_path,
        load_settings,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        from decisionflow.settings import airflow_settings

        return getattr(airflow_settings, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
