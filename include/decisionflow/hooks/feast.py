"""Feast hook: the feature store. The Airflow connection decides the project, registry and stores.

The connection (``feast_default``), ``conn_type`` ``feast``, keeps everything in ``extra``::

    {
      "repo_path": "include/feature_repo",             # the definitions (*.py) to apply
      "project": "decisionflow",
      "registry": ".data/feast/registry.db",           # or {"registry_type": "sql", "path": "postgresql://..."}
      "online_store": {"type": "sqlite", "path": ".data/feast/online.db"},
      "offline_store": {"type": "decisionflow.features.offline_store.DeltaLakeOfflineStore"}   # the default
    }

The default offline store reads the gold Delta tables at their current snapshot (Feast's own ``file`` store would
read files a MERGE removed: stale features). The feature repo finds the lake under ``DECISIONFLOW_LAKE_ROOT``,
which :meth:`FeastHook.apply` sets from the ``lake_default`` connection (``lake_conn_id``).

Every other key of ``extra`` that ``feast.RepoConfig`` knows (``provider``, ``batch_engine``,
``entity_key_serialization_version``, ``feature_server``, ``auth``, ...) is passed through unchanged, so switching
the online store to Redis is a connection edit, not a code edit::

    "online_store": {"type": "redis", "connection_string": "127.0.0.1:6379"}

Relative *local file* paths (``repo_path``, a file registry, a sqlite online store) resolve against the project
home (:func:`decisionflow.config.resolve_path`), not against the repo or the worker's cwd. No
``feature_store.yaml`` is read or written: :meth:`FeastHook.get_repo_config` builds the ``RepoConfig``.

``feast`` is imported inside the methods only: DAG files that import this module must parse fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from decisionflow import config
from decisionflow.hooks.base import CheckableHook, LayerCheckError
from decisionflow.exceptions import NonRetryableError

if TYPE_CHECKING:
    from airflow.sdk import Connection
    from feast import FeatureStore, RepoConfig

    from decisionflow.hooks.lake import LakeHook

DEFAULT_REPO_PATH = "include/feature_repo"
DEFAULT_PROJECT = "decisionflow"
DEFAULT_REGISTRY = ".data/feast/registry.db"
DEFAULT_ONLINE_PATH = ".data/feast/online.db"
DEFAULT_OFFLINE_STORE = "decisionflow.features.offline_store.DeltaLakeOfflineStore"
#: ``extra`` keys that belong to the hook, not to ``feast.RepoConfig``.
HOOK_KEYS = frozenset({"repo_path"})


class FeastConfigError(NonRetryableError, ValueError):
    """The connection cannot be turned into a Feast ``RepoConfig`` (unknown key, bad store, missing extra)."""


class FeastRepoError(RuntimeError):
    """The feature repo cannot be applied (definitions fail to import, project mismatch, invalid objects)."""


class FeastHook(CheckableHook):
    """Build a Feast ``RepoConfig``/``FeatureStore`` from an Airflow connection and apply the feature repo.

    :param feast_conn_id: the Airflow connection id (``conn_type`` ``feast``); ``feast_default`` if omitted.
    :param lake_conn_id: the ``delta_lake`` connection whose root the feature repo's Delta sources live under
        (``lake_default``); when it does not exist, the repo's own default (``<data dir>/lake``) applies.
    """

    conn_name_attr = "feast_conn_id"
    default_conn_name = "feast_default"
    conn_type = "feast"
    hook_name = "Feast"

    layer = "feast"

    def __init__(self, feast_conn_id: str = default_conn_name, lake_conn_id: str = "lake_default",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.feast_conn_id = feast_conn_id
        self.lake_conn_id = lake_conn_id

    # -- connection ---------------------------------------------------------------------------------------
    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """How the Airflow UI connection form shows a ``feast`` connection: everything lives in ``extra``."""
        return {
            "hidden_fields": ["host", "port", "schema", "login", "password"],
            "relabeling": {},
            "placeholders": {
                "extra": json.dumps(
                    {
                        "repo_path": DEFAULT_REPO_PATH,
                        "project": DEFAULT_PROJECT,
                        "registry": DEFAULT_REGISTRY,
                        "online_store": {"type": "sqlite", "path": DEFAULT_ONLINE_PATH},
                    }
                ),
            },
        }

    @property
    def remedy(self) -> str:  # type: ignore[override]
        return (
            f"fix the definitions under {self._describe_repo()} or extra of connection {self.feast_conn_id!r} "
            "(project, registry, online_store); for a server-backed online store (redis, postgres) start it and "
            "install its Feast extra"
        )

    @cached_property
    def connection(self) -> Connection:
        """The Airflow connection, fetched once per hook instance."""
        return self.get_connection(self.feast_conn_id)

    @cached_property
    def extra(self) -> dict[str, Any]:
        return self.connection.extra_dejson

    @property
    def repo_path(self) -> Path:
        """Absolute path of the feature repo (``extra.repo_path``, default ``include/feature_repo``)."""
        return config.resolve_path(self.extra.get("repo_path") or DEFAULT_REPO_PATH)

    @property
    def project(self) -> str:
        return str(self.extra.get("project") or DEFAULT_PROJECT)

    def _describe_repo(self) -> str:
        try:
            return str(self.repo_path)
        except Exception:  # noqa: BLE001 - only used inside an error message
            return DEFAULT_REPO_PATH

    def repo_config_dict(self) -> dict[str, Any]:
        """The keyword arguments of ``feast.RepoConfig`` for this connection, local paths made absolute.

        Defaults: provider ``local``, file registry ``.data/feast/registry.db``, sqlite online store
        ``.data/feast/online.db``, ``entity_key_serialization_version`` 3.

        :raises FeastConfigError: ``extra`` has a key ``RepoConfig`` does not know (typos are not ignored).
        """
        extra = dict(self.extra)
        unknown = sorted(set(extra) - HOOK_KEYS - _repo_config_keys())
        if unknown:
            raise FeastConfigError(
                f"connection {self.feast_conn_id!r}: unknown extra key(s) {unknown}; expected {sorted(HOOK_KEYS)} "
                f"or feast RepoConfig keys {sorted(_repo_config_keys())}"
            )
        settings: dict[str, Any] = {key: value for key, value in extra.items() if key not in HOOK_KEYS}
        settings["project"] = self.project
        settings.setdefault("provider", "local")
        settings.setdefault("entity_key_serialization_version", 3)
        settings["registry"] = _resolve_registry(settings.get("registry") or DEFAULT_REGISTRY)
        settings["online_store"] = _resolve_online_store(settings.get("online_store"))
        settings.setdefault("offline_store", {"type": DEFAULT_OFFLINE_STORE})
        settings["repo_path"] = str(self.repo_path)
        return settings

    def get_repo_config(self) -> RepoConfig:
        """A ``feast.RepoConfig`` built from the connection (no ``feature_store.yaml`` involved).

        :raises FeastConfigError: invalid settings, or a store whose Python extra is not installed
            (e.g. ``redis`` for ``online_store.type: redis`` -> ``pip install 'feast[redis]'``).
        """
        from feast.errors import FeastExtrasDependencyImportError, FeastModuleImportError
        from feast.repo_config import RepoConfig
        from pydantic import ValidationError

        settings = self.repo_config_dict()
        try:
            return RepoConfig(**settings)
        except (FeastModuleImportError, FeastExtrasDependencyImportError, ImportError) as exc:
            store = _store_types(settings)
            raise FeastConfigError(
                f"connection {self.feast_conn_id!r}: a Feast plugin for {store} cannot be imported ({exc}); "
                f"install its extra, e.g. pip install 'feast[{_extra_hint(settings)}]'"
            ) from exc
        except ValidationError as exc:
            raise FeastConfigError(f"connection {self.feast_conn_id!r}: invalid Feast settings: {exc}") from exc
        except Exception as exc:  # feast raises its own errors for unknown store types, missing registry, ...
            raise FeastConfigError(f"connection {self.feast_conn_id!r}: {type(exc).__name__}: {exc}") from exc

    def get_store(self) -> FeatureStore:
        """A ``feast.FeatureStore`` for the connection (local directories of file stores are created)."""
        from feast import FeatureStore

        repo_config = self.get_repo_config()
        self._make_local_dirs()
        return FeatureStore(config=repo_config)

    def _make_local_dirs(self) -> None:
        settings = self.repo_config_dict()
        registry = settings["registry"]
        registry_path = registry if isinstance(registry, str) else registry.get("path", "")
        candidates = [registry_path]
        online = settings["online_store"]
        if isinstance(online, dict) and online.get("type") == "sqlite":
            candidates.append(online.get("path", ""))
        for candidate in candidates:
            if candidate and "://" not in str(candidate) and os.path.isabs(candidate):
                Path(candidate).parent.mkdir(parents=True, exist_ok=True)

    # -- apply ----------------------------------------------------------------------------------------------
    def apply(self, skip_source_validation: bool = False) -> dict[str, Any]:
        """Apply the definitions found in ``repo_path`` -- what ``feast apply`` does, without a yaml file.

        Uses Feast's own path (``feast.repo_operations``: ``_get_repo_contents`` to import every ``*.py`` of the
        repo, ``apply_total_with_repo_instance`` to diff against the registry and update the infrastructure), so
        objects removed from the repo are removed from the registry too. Idempotent.

        Feast imports the repo files relative to the current directory: for the duration, the process cwd is the
        repo and the repo is on ``sys.path`` (both restored afterwards); modules already imported from the repo
        are dropped first so edits are picked up in long-lived processes.

        :return: project, registry, and the names of the entities, feature views, services and sources applied.
        :raises FeastConfigError: see :meth:`get_repo_config`.
        :raises FeastRepoError: the repo is missing or a definition fails to import or apply.
        """
        from feast.repo_operations import (
            _get_repo_contents,
            _get_store_and_registry,
            apply_total_with_repo_instance,
            is_valid_name,
        )

        repo_config = self.get_repo_config()
        repo_path = self.repo_path
        if not repo_path.is_dir():
            raise FeastRepoError(f"feature repo {repo_path} (extra.repo_path of {self.feast_conn_id!r}) does not exist")
        if not is_valid_name(repo_config.project):
            raise FeastRepoError(
                f"project {repo_config.project!r} is not a valid Feast name (letters, digits, '_' and '-', "
                "not starting with '_' or '-')"
            )
        self._make_local_dirs()
        with _inside_repo(repo_path), _lake_root_env(self.lake_root()):
            try:
                repo = _get_repo_contents(repo_path, repo_config.project, repo_config)
            except SystemExit as exc:  # feast prints the reason and calls sys.exit(1)
                raise FeastRepoError(
                    f"feast rejected the repo {repo_path}: its Project definition(s) do not match project "
                    f"{repo_config.project!r} of connection {self.feast_conn_id!r} (see the output above)"
                ) from exc
            except Exception as exc:
                raise FeastRepoError(
                    f"importing the definitions in {repo_path} failed: {type(exc).__name__}: {exc}"
                ) from exc
            try:
                for project in repo.projects:
                    repo_config.project = project.name
                    store, registry = _get_store_and_registry(repo_config)
                    apply_total_with_repo_instance(store, project.name, registry, repo, skip_source_validation)
            except SystemExit as exc:
                raise FeastRepoError(f"feast apply of {repo_path} exited with {exc.code}") from exc
            except Exception as exc:
                raise FeastRepoError(f"feast apply of {repo_path} failed: {type(exc).__name__}: {exc}") from exc

        def names(objects: list) -> list[str]:
            return sorted(obj.name for obj in objects if not obj.name.startswith("__"))

        return {
            "project": repo_config.project,
            "repo_path": str(repo_path),
            "registry": str(repo_config.registry.path),
            "entities": names(repo.entities),
            "feature_views": names(repo.feature_views),
            "on_demand_feature_views": names(repo.on_demand_feature_views),
            "stream_feature_views": names(repo.stream_feature_views),
            "feature_services": names(repo.feature_services),
            "data_sources": names(repo.data_sources),
        }

    def lake(self) -> LakeHook | None:
        """The ``lake_conn_id`` lake hook, or None when that connection does not exist."""
        from airflow.exceptions import AirflowNotFoundException

        from decisionflow.hooks.lake import LakeHook

        lake = LakeHook(self.lake_conn_id)
        try:
            lake.extra  # noqa: B018 - fetch the connection now, so a missing one is known here
        except AirflowNotFoundException:
            return None
        return lake

    def lake_root(self) -> str | None:
        """Root of the ``lake_conn_id`` connection, or None when that connection does not exist."""
        lake = self.lake()
        return lake.root if lake else None

    # -- self-check -----------------------------------------------------------------------------------------
    def probe(self) -> dict[str, Any]:
        """Read-only: the connection makes a valid Feast config, the repo folder exists, and -- when the registry
        exists -- what it lists. Never ``feast apply``, never a folder or registry created."""
        repo_config = self.get_repo_config()
        if not self.repo_path.is_dir():
            raise FeastRepoError(f"feature repo {self.repo_path} (extra.repo_path of {self.feast_conn_id!r}) does "
                                 "not exist")
        registry = self.repo_config_dict()["registry"]
        registry_path = registry if isinstance(registry, str) else registry.get("path", "")
        summary: dict[str, Any] = {"project": self.project, "repo_path": str(self.repo_path),
                                   "registry": str(registry_path), "online_store": repo_config.online_store.type}
        local = registry_path and "://" not in str(registry_path)
        if local and not Path(registry_path).exists():
            summary["registry_exists"] = False  # created by the first `feast apply` (materialize_features)
            return summary
        from feast import FeatureStore

        store = FeatureStore(config=repo_config)
        summary["feature_views"] = sorted(view.name for view in store.list_feature_views())
        summary["feature_services"] = sorted(service.name for service in store.list_feature_services())
        return summary

    def platform_check(self) -> dict[str, Any]:
        """Import feast, apply the repo, list what the registry holds and read once from the online store.

        The online read asks for a key that does not exist (``__platform_check__``) of the first online feature
        view, so it proves the store is reachable and its table exists without writing anything.

        :return: feast version, project, online store type, entities / feature views listed from the registry.
        :raises LayerCheckError: feast missing, bad connection, apply failure, or the registry lacks what was applied.
        """
        started = time.monotonic()
        try:
            import feast
        except ImportError as exc:
            raise LayerCheckError(self.layer, f"feast is not installed: {exc}", "run `make install`") from exc
        try:
            applied = self.apply()
            store = self.get_store()
            entities = sorted(e.name for e in store.list_entities() if not e.name.startswith("__"))
            views = store.list_feature_views()
        except (FeastConfigError, FeastRepoError) as exc:
            raise LayerCheckError(self.layer, str(exc), self.remedy) from exc
        except Exception as exc:  # noqa: BLE001 - a registry or store failure
            raise LayerCheckError(self.layer, f"{type(exc).__name__}: {exc}", self.remedy) from exc

        view_names = sorted(view.name for view in views)
        missing = sorted((set(applied["entities"]) - set(entities)) | (set(applied["feature_views"]) - set(view_names)))
        if missing:
            raise LayerCheckError(self.layer, f"registry lacks {missing} right after apply", self.remedy)

        online_read = self._probe_online(store, views)
        return {
            "feast_version": feast.__version__,
            "project": applied["project"],
            "registry": applied["registry"],
            "online_store": store.config.online_store.type,
            "entities": entities,
            "feature_views": view_names,
            "online_read": online_read,
            "seconds": round(time.monotonic() - started, 2),
        }

    def _probe_online(self, store: FeatureStore, views: list) -> str:
        """Read a non-existent key from the first online view; ``"skipped"`` when no view is online."""
        from feast.value_type import ValueType

        for view in sorted(views, key=lambda v: v.name):  # registry order varies; probe the same view each time
            if not view.online or not view.features or not view.entity_columns:
                continue
            column = view.entity_columns[0]
            value: Any = "__platform_check__"
            if column.dtype.to_value_type() in (ValueType.INT64, ValueType.INT32):
                value = -1
            feature = f"{view.name}:{view.features[0].name}"
            try:
                result = store.get_online_features(features=[feature], entity_rows=[{column.name: value}]).to_dict()
            except Exception as exc:  # noqa: BLE001 - connection refused, missing table, ...
                raise LayerCheckError(
                    self.layer,
                    f"online store {store.config.online_store.type} read of {feature} failed: "
                    f"{type(exc).__name__}: {exc}",
                    self.remedy,
                ) from exc
            if result.get(view.features[0].name) != [None]:
                raise LayerCheckError(
                    self.layer,
                    f"online store returned {result} for the non-existent key {value!r} of {feature}",
                    self.remedy,
                )
            return f"ok ({feature})"
        return "skipped (no online feature view)"


# -- helpers ------------------------------------------------------------------------------------------------
def _repo_config_keys() -> set[str]:
    from feast.repo_config import RepoConfig

    keys: set[str] = set()
    for name, field in RepoConfig.model_fields.items():
        keys.add(name)
        if field.alias:
            keys.add(field.alias)
    return keys


def _is_local(path: Any) -> bool:
    return isinstance(path, str | os.PathLike) and "://" not in str(path)


def _resolve_registry(registry: Any) -> Any:
    """A file registry's path made absolute; SQL/remote registries (``path`` is a URL) stay as they are."""
    if isinstance(registry, str | os.PathLike):
        return str(config.resolve_path(registry)) if _is_local(registry) else str(registry)
    if isinstance(registry, dict):
        resolved = dict(registry)
        path = resolved.get("path")
        if resolved.get("registry_type", "file") == "file" and path and _is_local(path):
            resolved["path"] = str(config.resolve_path(resolved["path"]))
        return resolved
    raise FeastConfigError(f"extra.registry must be a path or a mapping, got {type(registry).__name__}")


def _resolve_online_store(online: Any) -> Any:
    """Default sqlite at ``.data/feast/online.db``; a sqlite ``path`` made absolute; other stores untouched."""
    if online is None or online == "sqlite":
        online = {"type": "sqlite"}
    if isinstance(online, str):
        return {"type": online}
    if not isinstance(online, dict) or "type" not in online:
        raise FeastConfigError(f"extra.online_store must be a mapping with a 'type', got {online!r}")
    resolved = dict(online)
    if resolved["type"] == "sqlite":
        resolved["path"] = str(config.resolve_path(resolved.get("path") or DEFAULT_ONLINE_PATH))
    return resolved


def _store_types(settings: dict[str, Any]) -> str:
    parts = []
    for key in ("online_store", "offline_store", "registry", "batch_engine"):
        value = settings.get(key)
        kind = value.get("type") or value.get("registry_type") if isinstance(value, dict) else None
        if kind:
            parts.append(f"{key} {kind!r}")
    return ", ".join(parts) or "a store"


def _extra_hint(settings: dict[str, Any]) -> str:
    online = settings.get("online_store")
    kind = online.get("type") if isinstance(online, dict) else None
    return str(kind or "<store>").split(".")[0]


@contextlib.contextmanager
def _lake_root_env(root: str | None) -> Iterator[None]:
    """``DECISIONFLOW_LAKE_ROOT`` = root while the repo is imported (unchanged when root is None)."""
    previous = os.environ.get("DECISIONFLOW_LAKE_ROOT")
    if root:
        os.environ["DECISIONFLOW_LAKE_ROOT"] = root
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DECISIONFLOW_LAKE_ROOT", None)
        else:
            os.environ["DECISIONFLOW_LAKE_ROOT"] = previous


@contextlib.contextmanager
def _inside_repo(repo_path: Path) -> Iterator[None]:
    """cwd = repo and repo on sys.path (Feast imports repo files as top-level modules); restore both after."""
    previous_cwd = os.getcwd()
    repo = str(repo_path)
    # Drop modules imported earlier from this repo (edited since) or under the same names from another repo.
    repo_modules = {
        ".".join(path.relative_to(repo_path).with_suffix("").parts) for path in repo_path.rglob("*.py")
    }
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        if name in repo_modules or (origin and os.path.abspath(origin).startswith(repo + os.sep)):
            del sys.modules[name]
    sys.path.insert(0, repo)
    os.chdir(repo)
    try:
        yield
    finally:
        os.chdir(previous_cwd)
        with contextlib.suppress(ValueError):
            sys.path.remove(repo)
