"""A small local receiver for the actions webhook: each ``Idempotency-Key``'s effect is applied once.

For tests and the demo (the ``actions_webhook`` connection points at it); stdlib only::

    python -m decisionflow.decisions.webhook --host 127.0.0.1 --port 8099 --store /tmp/effects.sqlite

Routes:

* ``POST /actions`` - JSON body, header ``Idempotency-Key`` required (400 without it or with a body that is not
  JSON). The first request with a key *applies* its effect (a row in the SQLite store, key = primary key) and
  answers ``200 {"ok": true, "duplicate": false, "key": ...}``; a repeated key answers
  ``200 {"ok": true, "duplicate": true, ...}``, only counts the delivery and applies nothing again.
* ``GET /effects`` - ``{"keys": n, "deliveries": n, "duplicates": n, "effects": [{"key", "decision_id",
  "actions", "deliveries", "applied_at"}, ...]}`` (``?limit=N``, default 1000 listed; the counts cover all).
* ``POST /alerts`` - a failure alert (JSON object; :mod:`decisionflow.notifications.failure`), kept once per
  ``Idempotency-Key`` (the alert id; optional); ``200 {"ok": true, "duplicate": bool, "key": ...}``.
* ``GET /alerts`` - ``{"alerts": n, "items": [<alert>, ...]}``, oldest first (``?limit=N``, default 1000).
* ``GET /health`` - ``{"ok": true, "keys": n}``.
* ``POST /control`` - ``{"delay_ms": N}`` makes every later action answer N ms late (a slow downstream, for
  failure tests); ``0`` restores.

In-process (tests): :class:`WebhookReceiver` (``start()`` / ``stop()`` / context manager, ``.url`` of
``/actions``), with fault injection: :meth:`WebhookReceiver.fail_next` answers the next requests with an error
status without applying them; :meth:`WebhookReceiver.drop_next` applies the next requests and then closes the
connection without answering (a lost response: the sender retries, the receiver dedupes).
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["EffectStore", "WebhookReceiver", "main"]

log = logging.getLogger(__name__)

ACTIONS_PATH = "/actions"
ALERTS_PATH = "/alerts"
CONTROL_PATH = "/control"
_MAX_BODY = 1 << 20


class EffectStore:
    """The applied effects, one SQLite row per idempotency key (thread-safe; one connection, one lock)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("""CREATE TABLE IF NOT EXISTS effects (
            key TEXT PRIMARY KEY, decision_id TEXT, actions TEXT, body TEXT NOT NULL,
            applied_at TEXT NOT NULL, deliveries INTEGER NOT NULL DEFAULT 1)""")
        self._db.execute("""CREATE TABLE IF NOT EXISTS alerts (
            key TEXT PRIMARY KEY, body TEXT NOT NULL, received_at TEXT NOT NULL,
            deliveries INTEGER NOT NULL DEFAULT 1)""")

    def add_alert(self, key: str, body: Any) -> bool:
        """Keep ``key``'s alert unless already kept; True when kept now, False for a duplicate."""
        with self._lock:
            cursor = self._db.execute("INSERT OR IGNORE INTO alerts (key, body, received_at) VALUES (?, ?, ?)",
                                      (key, json.dumps(body), datetime.now(timezone.utc).isoformat()))
            if cursor.rowcount == 1:
                return True
            self._db.execute("UPDATE alerts SET deliveries = deliveries + 1 WHERE key = ?", (key,))
            return False

    def alerts(self, limit: int | None = 1000) -> dict[str, Any]:
        """The kept alerts, oldest first (up to ``limit``; None: all) and their count."""
        with self._lock:
            count = self._db.execute("SELECT count(*) FROM alerts").fetchone()[0]
            sql = "SELECT body FROM alerts ORDER BY received_at, rowid"
            rows = self._db.execute(sql + (f" LIMIT {int(limit)}" if limit is not None else "")).fetchall()
        return {"alerts": int(count), "items": [json.loads(body) for (body,) in rows]}

    def apply(self, key: str, body: dict[str, Any]) -> bool:
        """Apply ``key``'s effect unless already applied; True when applied now, False for a duplicate."""
        actions = body.get("actions") if isinstance(body, dict) else None
        decision = body.get("decision_id") if isinstance(body, dict) else None
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO effects (key, decision_id, actions, body, applied_at) VALUES (?, ?, ?, ?, ?)",
                (key, decision, json.dumps(actions), json.dumps(body), datetime.now(timezone.utc).isoformat()))
            if cursor.rowcount == 1:
                return True
            self._db.execute("UPDATE effects SET deliveries = deliveries + 1 WHERE key = ?", (key,))
            return False

    def summary(self, limit: int | None = 1000) -> dict[str, Any]:
        """Counts over every key, and up to ``limit`` effects (None: all)."""
        with self._lock:
            keys, deliveries = self._db.execute("SELECT count(*), coalesce(sum(deliveries), 0) FROM effects").fetchone()
            sql = "SELECT key, decision_id, actions, deliveries, applied_at FROM effects ORDER BY applied_at, key"
            rows = self._db.execute(sql + (f" LIMIT {int(limit)}" if limit is not None else "")).fetchall()
        effects = [{"key": k, "decision_id": d, "actions": json.loads(a) if a else None, "deliveries": n,
                    "applied_at": t} for k, d, a, n, t in rows]
        return {"keys": int(keys), "deliveries": int(deliveries), "duplicates": int(deliveries) - int(keys),
                "effects": effects}

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a sender reuses one connection for many POSTs
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle + delayed ACK would cost 40 ms each
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        log.debug("webhook %s - %s", self.address_string(), format % args)

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        parts = urlsplit(self.path)
        if parts.path == "/health":
            self._answer(200, {"ok": True, "keys": self.server.store.summary(limit=0)["keys"]})
        elif parts.path == ALERTS_PATH:
            limit = parse_qs(parts.query).get("limit", ["1000"])[0]
            self._answer(200, self.server.store.alerts(limit=None if limit == "all" else int(limit)))
        elif parts.path == "/effects":
            limit = parse_qs(parts.query).get("limit", ["1000"])[0]
            self._answer(200, self.server.store.summary(limit=None if limit == "all" else int(limit)))
        else:
            self._answer(404, {"ok": False, "error": f"no route GET {parts.path}"})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(min(length, _MAX_BODY)) if length else b""
        if urlsplit(self.path).path == CONTROL_PATH:
            self._control(raw)
            return
        if urlsplit(self.path).path == ALERTS_PATH:
            self._alert(raw)
            return
        if urlsplit(self.path).path != ACTIONS_PATH:
            self._answer(404, {"ok": False, "error": f"no route POST {self.path}"})
            return
        fault = self.server.take_fault()
        if fault is not None and fault != "drop":
            self._answer(fault, {"ok": False, "error": f"injected failure {fault}"})
            return
        key = self.headers.get("Idempotency-Key")
        if not key:
            self._answer(400, {"ok": False, "error": "missing Idempotency-Key header"})
            return
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            self._answer(400, {"ok": False, "error": f"body is not JSON: {exc}"})
            return
        if self.server.delay_s:
            time.sleep(self.server.delay_s)  # a slow receiver (tests: a kill that lands mid-send)
        applied = self.server.store.apply(key, body)
        if fault == "drop":  # applied, but the answer is lost: the sender must retry, we must dedupe
            self.close_connection = True  # the server closes the socket with no response written
            return
        self._answer(200, {"ok": True, "duplicate": not applied, "key": key})


    def _alert(self, raw: bytes) -> None:
        """``POST /alerts``: keep a failure alert once per ``Idempotency-Key`` (its alert id)."""
        import uuid

        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            self._answer(400, {"ok": False, "error": f"body is not JSON: {exc}"})
            return
        if not isinstance(body, dict):
            self._answer(400, {"ok": False, "error": "body must be a JSON object (the alert)"})
            return
        key = self.headers.get("Idempotency-Key") or str(body.get("alert_id") or uuid.uuid4().hex)
        kept = self.server.store.add_alert(key, body)
        self._answer(200, {"ok": True, "duplicate": not kept, "key": key})

    def _control(self, raw: bytes) -> None:
        """``POST /control {"delay_ms": N}``: answer every action N ms late (0: at once). Loopback only."""
        try:
            delay = float(json.loads(raw or b"{}").get("delay_ms", 0))
        except (ValueError, AttributeError, TypeError) as exc:
            self._answer(400, {"ok": False, "error": f"body must be {{\"delay_ms\": N}}: {exc}"})
            return
        if not 0 <= delay <= 10_000:
            self._answer(400, {"ok": False, "error": f"delay_ms must be within 0..10000, got {delay}"})
            return
        self.server.delay_s = delay / 1000
        self._answer(200, {"ok": True, "delay_ms": delay})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], store: EffectStore):
        super().__init__(address, _Handler)
        self.store = store
        self.delay_s = 0.0
        self._faults: list[int | str | None] = []  # None: answer this one normally
        self._faults_lock = threading.Lock()

    def take_fault(self) -> int | str | None:
        with self._faults_lock:
            return self._faults.pop(0) if self._faults else None

    def add_faults(self, faults: list[int | str | None]) -> None:
        with self._faults_lock:
            self._faults.extend(faults)


class WebhookReceiver:
    """
    The receiver in a background thread.

    :param store: SQLite file of the applied effects (``":memory:"`` for a throwaway one).
    :param host: interface to listen on (loopback by default).
    :param port: port; 0 picks a free one (see :attr:`port` after :meth:`start`).
    """

    def __init__(self, store: str | Path, host: str = "127.0.0.1", port: int = 0):
        self.store = EffectStore(store)
        self.host, self._port = host, port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The ``POST`` endpoint (``http://host:port/actions``)."""
        return self.base_url + ACTIONS_PATH

    def start(self) -> WebhookReceiver:
        self._server = _Server((self.host, self._port), self.store)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="webhook-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def close(self) -> None:
        self.stop()
        self.store.close()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def fail_next(self, count: int = 1, status: int = 503, *, after: int = 0) -> None:
        """Answer ``count`` POSTs with ``status`` and apply nothing, once ``after`` more have passed normally."""
        self._require().add_faults([None] * after + [status] * count)

    def drop_next(self, count: int = 1) -> None:
        """Apply the next ``count`` POSTs, then close their connection without an answer."""
        self._require().add_faults(["drop"] * count)

    @property
    def alerts_url(self) -> str:
        """The alerts endpoint (``http://host:port/alerts``)."""
        return self.base_url + ALERTS_PATH

    def alerts(self, limit: int | None = None) -> dict[str, Any]:
        """What ``GET /alerts`` answers (every alert by default)."""
        return self.store.alerts(limit=limit)

    def effects(self, limit: int | None = None) -> dict[str, Any]:
        """What ``GET /effects`` answers (every effect by default)."""
        return self.store.summary(limit=limit)

    def _require(self) -> _Server:
        if self._server is None:
            raise RuntimeError("the webhook receiver is not started")
        return self._server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m decisionflow.decisions.webhook",
                                     description="Local actions-webhook receiver: applies each Idempotency-Key once.")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8099, help="port (default 8099)")
    parser.add_argument("--store", required=True, help="SQLite file of applied effects")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = _Server((args.host, args.port), EffectStore(args.store))
    log.info("webhook receiver on http://%s:%d%s, store %s", args.host, server.server_address[1], ACTIONS_PATH,
             args.store)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
