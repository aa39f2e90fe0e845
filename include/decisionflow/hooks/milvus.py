"""Milvus hook: the vector store behind the agent's retrieval (similar cases, merchant embeddings).

The connection (``milvus_default``):

* ``conn_type``: ``milvus``
* ``extra.uri``:

  - ``http://127.0.0.1:19530`` (``airflow_settings.yaml``) -> the local stack's Milvus Lite, served as one process
    by ``milvus-lite server`` (:mod:`decisionflow.stack.milvus`), so every task shares one store.
  - a local path ending in ``.db`` (``.data/milvus/decisionflow.db``; relative paths resolve against the project
    home) -> **Milvus Lite**, run *inside* the calling process by ``milvus-lite``. The path is a directory that
    Milvus Lite locks (``<path>/LOCK``): one process at a time owns it, any other gets ``DataDirLockedError``.
  - ``http://host:19530`` / ``https://...`` / ``tcp://...`` / ``unix:...`` -> a Milvus server.

  When ``extra.uri`` is absent and ``host`` is set, ``http://<host>:<port or 19530>`` is used.
* ``password`` (optional): the server token (``user:password`` or an API key); with ``login`` set, the token is
  ``<login>:<password>``. Unused by Milvus Lite.
* ``schema`` or ``extra.db_name`` (optional): the database (server only).

``pymilvus`` is imported inside the methods only: DAG files that import this module must parse fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from decisionflow import config
from decisionflow.hooks.base import CheckableHook, LayerCheckError

if TYPE_CHECKING:
    from airflow.sdk import Connection
    from pymilvus import MilvusClient

DEFAULT_LITE_URI = ".data/milvus/decisionflow.db"
SERVER_SCHEMES = ("http://", "https://", "tcp://", "unix:")
#: Scratch collection of the platform check; dropped at the end of every check.
PLATFORM_CHECK_COLLECTION = "platform_check"
PLATFORM_CHECK_DIM = 8


class MilvusLiteLockedError(LayerCheckError):
    """The Milvus Lite data directory is locked by another process (``milvus_lite.DataDirLockedError``)."""

    def __init__(self, path: str, holder: str | None):
        who = f"process {holder}" if holder else "another process"
        super().__init__(
            "milvus",
            f"Milvus Lite data dir {path} is locked by {who}",
            f"another process holds {path}/LOCK (Milvus Lite allows one process per data dir): stop {who} or let it "
            "finish, or point extra.uri of the connection at a Milvus server (http://host:19530) to share the store",
        )
        self.path = path
        self.holder = holder


class MilvusHook(CheckableHook):
    """Open a ``pymilvus.MilvusClient`` on Milvus Lite (a local ``.db`` path) or a Milvus server.

    :param milvus_conn_id: the Airflow connection id (``conn_type`` ``milvus``); ``milvus_default`` if omitted.
    """

    conn_name_attr = "milvus_conn_id"
    default_conn_name = "milvus_default"
    conn_type = "milvus"
    hook_name = "Milvus"

    layer = "milvus"

    def __init__(self, milvus_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.milvus_conn_id = milvus_conn_id

    # -- connection ---------------------------------------------------------------------------------------
    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """How the Airflow UI connection form shows a ``milvus`` connection."""
        return {
            "hidden_fields": [],
            "relabeling": {"schema": "Database (server only)", "password": "Token (server only)"},
            "placeholders": {
                "host": "leave empty and set extra.uri",
                "port": "19530",
                "extra": json.dumps({"uri": DEFAULT_LITE_URI}),
            },
        }

    @property
    def remedy(self) -> str:  # type: ignore[override]
        if self.is_lite:
            return (
                f"check that {Path(self.uri).parent} is writable and that no other process holds {self.uri}/LOCK; "
                f"or fix extra.uri of connection {self.milvus_conn_id!r}"
            )
        return (
            f"check that the Milvus server at {self.uri} is up and the token is right "
            f"(connection {self.milvus_conn_id!r})"
        )

    @cached_property
    def connection(self) -> Connection:
        """The Airflow connection, fetched once per hook instance."""
        return self.get_connection(self.milvus_conn_id)

    @cached_property
    def uri(self) -> str:
        """The URI handed to ``MilvusClient``: an absolute ``.db`` path (Lite) or a server URL.

        :raises ValueError: a local path that does not end in ``.db`` (pymilvus would reject it less clearly).
        """
        conn = self.connection
        raw = conn.extra_dejson.get("uri")
        if not raw and conn.host:
            host = conn.host.rstrip("/")
            raw = host if host.startswith(SERVER_SCHEMES) else f"http://{host}:{conn.port or 19530}"
        raw = str(raw or DEFAULT_LITE_URI)
        if raw.startswith(SERVER_SCHEMES):
            return raw
        if raw.startswith("file://"):
            raw = raw[len("file://") :]
        path = config.resolve_path(raw)
        if path.suffix != ".db":
            raise ValueError(
                f"connection {self.milvus_conn_id!r}: extra.uri {raw!r} is neither a server URL "
                f"({', '.join(SERVER_SCHEMES)}) nor a Milvus Lite path ending in '.db'"
            )
        return str(path)

    @property
    def is_lite(self) -> bool:
        """True when the URI is a local path, i.e. Milvus Lite runs inside this process."""
        return not self.uri.startswith(SERVER_SCHEMES)

    @property
    def token(self) -> str:
        """Server token: ``login:password`` when both are set, else the password; empty for Milvus Lite."""
        conn = self.connection
        if self.is_lite or not conn.password:
            return ""
        return f"{conn.login}:{conn.password}" if conn.login else conn.password

    @property
    def db_name(self) -> str:
        conn = self.connection
        return "" if self.is_lite else str(conn.extra_dejson.get("db_name") or conn.schema or "")

    # -- clients ------------------------------------------------------------------------------------------
    def get_client(self, **kwargs: Any) -> MilvusClient:
        """A new ``pymilvus.MilvusClient``. The caller must ``close()`` it (or use :meth:`client`).

        For Milvus Lite the parent directory is created, and the in-process Lite server keeps the data dir
        locked until :meth:`release_lite` (or process exit); :meth:`client` does both for you.

        :raises MilvusLiteLockedError: another process owns the Lite data dir.
        """
        from pymilvus import MilvusClient
        from pymilvus.exceptions import ConnectionConfigException

        uri = self.uri
        if self.is_lite:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            return MilvusClient(uri=uri, token=self.token, db_name=self.db_name, **kwargs)
        except ConnectionConfigException:
            # pymilvus/milvus-lite swallow the real cause (logged) and raise "Open local milvus failed".
            if self.is_lite:
                locked, holder = lite_lock_holder(uri)
                if locked:
                    raise MilvusLiteLockedError(uri, holder) from None
            raise

    @contextlib.contextmanager
    def client(self, **kwargs: Any) -> Iterator[MilvusClient]:
        """A client that is closed on exit; for Milvus Lite the data dir lock is released too, unless this
        process had already opened that Lite store before (another user in the process keeps it)."""
        already_open = self.is_lite and _lite_server_running(self.uri)
        client = self.get_client(**kwargs)
        try:
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.close()
            if self.is_lite and not already_open:
                self.release_lite()

    def release_lite(self) -> None:
        """Stop this process's in-process Milvus Lite server for the URI, releasing the data dir lock."""
        if not self.is_lite:
            return
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(self.uri)

    # -- read-only probe ------------------------------------------------------------------------------------
    def probe(self) -> dict[str, Any]:
        """List the collections (nothing created). A Milvus Lite file that does not exist yet is reported, not
        created (opening it would create it and take its lock)."""
        uri = self.uri
        if self.is_lite and not Path(uri).exists():
            return {"uri": uri, "lite": True, "exists": False, "collections": []}
        with self.client() as client:
            collections = sorted(client.list_collections())
        return {"uri": uri, "lite": self.is_lite, "collections": collections}

    # -- self-check -----------------------------------------------------------------------------------------
    def platform_check(self) -> dict[str, Any]:
        """(Re)create the scratch collection ``platform_check`` (dim 8), insert 8 vectors, search, drop it.

        The query lies next to the vector of id 103, so the nearest neighbour must be 103. The client is closed
        (and a Lite data dir unlocked) afterwards, whatever happens.

        :return: mode (lite/server), uri, rows inserted, nearest id and its distance, collections seen.
        :raises LayerCheckError: cannot open the store (a locked Lite dir names the holder), or a wrong answer.
        """
        started = time.monotonic()
        try:
            uri, lite = self.uri, self.is_lite
        except Exception as exc:  # noqa: BLE001 - connection missing or malformed
            raise LayerCheckError(self.layer, f"connection {self.milvus_conn_id!r}: {exc}", "fix the connection "
                                  "(extra.uri: a '.db' path for Milvus Lite or http://host:19530)") from exc
        try:
            import pymilvus  # noqa: F401
        except ImportError as exc:
            raise LayerCheckError(self.layer, f"pymilvus is not installed: {exc}", "run `make install`") from exc

        name, dim, expected = PLATFORM_CHECK_COLLECTION, PLATFORM_CHECK_DIM, 103
        rows = [
            {"id": 100 + i, "vector": [1.0 if j == i else 0.0 for j in range(dim)], "label": f"axis-{i}"}
            for i in range(dim)
        ]
        query = [0.0] * dim
        query[expected - 100] = 0.9
        query[(expected - 100 + 1) % dim] = 0.1
        try:
            with self.client() as client, _quiet_lite_grpc(lite):
                if client.has_collection(name):
                    client.drop_collection(name)
                client.create_collection(name, dimension=dim, metric_type="L2", consistency_level="Strong")
                inserted = client.insert(name, rows)["insert_count"]
                hits = client.search(name, data=[query], limit=3, output_fields=["label"])[0]
                collections = client.list_collections()
                client.drop_collection(name)
                dropped = not client.has_collection(name)
        except LayerCheckError:
            raise
        except Exception as exc:  # noqa: BLE001 - pymilvus raises MilvusException and friends
            raise LayerCheckError(self.layer, f"round trip on {uri} failed: {type(exc).__name__}: {exc}",
                                  self.remedy) from exc

        nearest = hits[0] if hits else None
        if inserted != len(rows) or nearest is None or nearest["id"] != expected:
            raise LayerCheckError(
                self.layer,
                f"inserted {inserted}/{len(rows)} rows and the nearest neighbour is "
                f"{nearest and nearest['id']!r}, expected {expected}",
                self.remedy,
            )
        return {
            "mode": "lite" if lite else "server",
            "uri": uri,
            "collection": name,
            "inserted": inserted,
            "nearest_id": nearest["id"],
            "nearest_label": nearest.get("entity", {}).get("label"),
            "nearest_distance": round(float(nearest["distance"]), 6),
            "collection_seen": name in collections,
            "dropped": dropped,
            "seconds": round(time.monotonic() - started, 2),
        }


@contextlib.contextmanager
def _quiet_lite_grpc(lite: bool) -> Iterator[None]:
    """Milvus Lite 3.2 does not implement ``AllocTimestamp``, which pymilvus 3.0 calls after every index build
    (``create_collection`` builds one); the client copes, but the in-process gRPC server logs an ERROR with a
    traceback that reads like a failure in task logs. Silence ``grpc._server`` while we talk to Lite."""
    if not lite:
        yield
        return
    import logging

    grpc_logger = logging.getLogger("grpc._server")
    previous = grpc_logger.level
    grpc_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        grpc_logger.setLevel(previous)


def _lite_server_running(uri: str) -> bool:
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return False
    return os.path.abspath(uri) in server_manager_instance._servers  # noqa: SLF001 - no public accessor


def lite_lock_holder(data_dir: str) -> tuple[bool, str | None]:
    """Whether ``<data_dir>/LOCK`` is flock-ed by someone, and who (``"<pid> (<cmdline>)"``) when Linux says.

    Probes with a non-blocking ``flock`` that is released at once; the holder comes from ``/proc/locks``.
    """
    lock_path = os.path.join(data_dir, "LOCK")
    if not os.path.exists(lock_path):
        return False, None
    import fcntl

    fd = os.open(lock_path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            locked = True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            locked = False
    finally:
        os.close(fd)
    return locked, (_flock_holder(lock_path) if locked else None)


def _flock_holder(path: str) -> str | None:
    try:
        stat = os.stat(path)
        key = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key:
                    pid = fields[4]
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as handle:
                            cmd = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    except OSError:
                        cmd = "?"
                    return f"{pid} ({cmd[:120]})"
    except OSError:
        return None
    return None
