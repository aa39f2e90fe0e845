"""Webhook endpoints from Airflow HTTP connections: the actions webhook of the outbox and the alerts webhook.

One reading of the connection for both: ``host`` a URL, or host/port/schema; extra ``endpoint`` (relative to the
host, as HttpOperator's) and ``headers``; ``password`` a bearer token.
"""

from __future__ import annotations

from typing import Any


def webhook_url(conn_id: str, log: Any, *, endpoint: str = "actions") -> tuple[str | None, dict[str, str]]:
    """The URL and headers of the webhook behind ``conn_id`` (``endpoint`` when the extra names none);
    ``(None, {})`` when the connection does not exist (the channel is off, logged).

    Raises:
        ValueError: the connection exists but its host is empty (the message names the connection).
    """
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - AirflowNotFoundException: the channel is simply not configured
        if log is not None:
            log.info("no %s connection: the webhook channel is off", conn_id)
        return None, {}
    host = conn.host or ""
    if not host:
        raise ValueError(f"connection {conn_id}: host is empty -- set it to the receiver's host or URL")
    url = host if "://" in host else f"{conn.schema or 'http'}://{host}{f':{conn.port}' if conn.port else ''}"
    extra = conn.extra_dejson or {}
    path = str(extra.get("endpoint", endpoint))
    headers = {str(k): str(v) for k, v in (extra.get("headers") or {}).items()}
    if conn.password:
        headers.setdefault("Authorization", f"Bearer {conn.password}")
    return url.rstrip("/") + (path if path.startswith("/") else f"/{path}"), headers
