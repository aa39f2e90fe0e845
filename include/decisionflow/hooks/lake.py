"""The Delta lake: where tables live (a local folder or an object store) and how to address them.

Connection type ``delta_lake`` (default id ``lake_default``); its extra::

    {"root": ".data/lake"}                                          # local, relative to the project home
    {"root": "s3://bucket/lake", "storage_options": {"AWS_REGION": "eu-west-1"}}   # object store

The real proof that Delta works (write, append, time travel through Spark) is the
``decisionflow.jobs.platform_check_lakehouse`` Spark job; this hook's self-check only proves the root is
usable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from decisionflow import config
from decisionflow.hooks.base import CheckableHook, LayerCheckError

DEFAULT_ROOT = ".data/lake"


def is_object_store(uri: str) -> bool:
    """True for ``scheme://...`` roots other than ``file://`` (a one-letter scheme is a Windows drive)."""
    scheme = urlparse(uri).scheme
    return len(scheme) > 1 and scheme != "file"


class LakeHook(CheckableHook):
    """
    Locate the Delta lake and its tables.

    :param lake_conn_id: Airflow connection id of type ``delta_lake``. Its extra ``root`` is the lake root:
        a relative path is resolved from the project home (``config.resolve_path``), an absolute path or
        ``file://`` URI is used as is, and an object-store URI (``s3://``, ``gs://``, ``abfss://``...) is passed
        through together with the extra ``storage_options``. Defaults to ``lake_default``.
    """

    conn_name_attr = "lake_conn_id"
    default_conn_name = "lake_default"
    conn_type = "delta_lake"
    hook_name = "Delta Lake (decisionflow)"

    layer = "lake"
    remedy = (
        "check the delta_lake connection's extra 'root' points at a folder this user can write (or an "
        "object-store URI with valid storage_options)"
    )

    def __init__(self, lake_conn_id: str = default_conn_name, **kwargs):
        super().__init__(**kwargs)
        self.lake_conn_id = lake_conn_id

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Connection form: only the extra matters."""
        return {
            "hidden_fields": ["schema", "login", "password", "port", "host"],
            "relabeling": {"extra": "Lake config"},
            "placeholders": {"extra": '{"root": ".data/lake", "storage_options": {}}'},
        }

    @cached_property
    def extra(self) -> dict[str, Any]:
        return dict(self.get_connection(self.lake_conn_id).extra_dejson)

    @cached_property
    def root(self) -> str:
        """Lake root: an absolute local path, or the object-store URI without a trailing slash."""
        value = str(self.extra.get("root") or DEFAULT_ROOT)
        if is_object_store(value):
            return value.rstrip("/")
        if value.startswith("file://"):
            value = urlparse(value).path
        return str(config.resolve_path(value))

    @property
    def is_local(self) -> bool:
        return not is_object_store(self.root)

    @property
    def storage_options(self) -> dict[str, str]:
        """Object-store credentials/options for delta-rs / fsspec (extra ``storage_options``); ``{}`` if local."""
        options = self.extra.get("storage_options") or {}
        if not isinstance(options, dict):
            raise ValueError(f"connection {self.lake_conn_id!r}: extra storage_options must be a JSON object")
        return {str(k): str(v) for k, v in options.items()}

    def table_uri(self, name: str) -> str:
        """
        Location of table ``name`` under the root, e.g. ``table_uri("bronze/transactions")``.

        :param name: Relative, ``/``-separated table path (layer/table); ``..`` and absolute paths are refused
            so that a table can never land outside the lake.
        """
        parts = PurePosixPath(name.strip()).parts
        if not parts or name.startswith("/") or any(p in ("..", ".") for p in parts):
            raise ValueError(f"table name must be a relative path inside the lake, got {name!r}")
        if self.is_local:
            return str(Path(self.root, *parts))
        return f"{self.root}/{'/'.join(parts)}"

    def get_conn(self) -> str:
        """BaseHook's generic accessor: the lake root."""
        return self.root

    def probe(self) -> dict[str, Any]:
        """Read-only: a local root exists and is readable (or, not created yet, its nearest existing parent is
        writable) and which top-level folders it holds; an object-store root is only reported."""
        root = self.root
        if not self.is_local:
            return {"root": root, "kind": "object-store", "probed": False,
                    "storage_options": sorted(self.storage_options)}
        path = Path(root)
        if path.exists():
            if not path.is_dir() or not os.access(path, os.R_OK | os.X_OK):
                raise LayerCheckError(self.layer, f"lake root {root} is not a readable folder", self.remedy)
            layers = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
            return {"root": root, "kind": "local", "exists": True, "writable": os.access(path, os.W_OK),
                    "folders": layers}
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is None or not os.access(parent, os.W_OK):
            raise LayerCheckError(self.layer, f"lake root {root} does not exist and {parent} is not writable",
                                  self.remedy)
        return {"root": root, "kind": "local", "exists": False, "created_by": "the first write (make up / demo)"}

    def platform_check(self) -> dict[str, Any]:
        """
        Prove the root is usable: for a local root, create it if needed and write, read back and delete a
        probe file under ``_platform_check/``. An object-store root is reported, not probed here (the Spark
        lakehouse check writes a real Delta table there).

        :raises LayerCheckError: when the root cannot be created, written or read.
        """
        root = self.root
        if not self.is_local:
            return {"root": root, "kind": "object-store", "probed": False,
                    "storage_options": sorted(self.storage_options)}
        started = time.monotonic()
        probe_dir = Path(root) / "_platform_check"
        probe = probe_dir / f"probe-{uuid.uuid4().hex}"
        token = uuid.uuid4().hex
        try:
            probe_dir.mkdir(parents=True, exist_ok=True)
            probe.write_text(token)
            if probe.read_text() != token:
                raise OSError(f"read back something else than was written to {probe}")
        except OSError as exc:
            raise LayerCheckError(self.layer, f"lake root {root} is not writable: {exc}", self.remedy) from exc
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
        free = shutil.disk_usage(root).free
        return {
            "root": root,
            "kind": "local",
            "probed": True,
            "writable": os.access(root, os.W_OK),
            "free_bytes": free,
            "probe_ms": round((time.monotonic() - started) * 1000, 1),
        }
