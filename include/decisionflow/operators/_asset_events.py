"""Reading what an operator's own earlier runs left in an asset's events (its inlets)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.sdk import Asset, Context


def latest_extra(context: Context, asset: Asset, key: str) -> Any:
    """``extra[key]`` of the newest event of ``asset`` that has it (not ``None``); ``None`` if none does.

    ``asset`` must be among the task's inlets (Airflow only gives a task the events of its inlets).
    """
    events = context.get("inlet_events")
    if not events:
        return None
    for event in reversed(list(events[asset])):
        value = (event.extra or {}).get(key)
        if value is not None:
            return value
    return None
