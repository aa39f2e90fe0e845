"""Gateway settings: where the model registry, the feature store, Kafka and the policy are; from env or args.

Only paths and URIs, never a secret: API tokens live hashed in the token store file
(:mod:`decisionflow_serving.auth`), and the settings only say where that file is. Every field can be set from the
environment as ``DECISIONFLOW_GATEWAY_<FIELD>`` (upper case), e.g. ``DECISIONFLOW_GATEWAY_MLFLOW_URI``;
``feast_online_store`` is JSON there. :meth:`GatewaySettings.from_env` reads them, the ``python -m
decisionflow_serving`` command line overrides them, and Ray Serve's ``build_app(args)`` passes them as a dict
(:meth:`GatewaySettings.from_dict`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decisionflow import config, constants

ENV_PREFIX = "DECISIONFLOW_GATEWAY_"


def _default_policy() -> str:
    # The shipped policy, the same file the decision operators use (operators/decisions.py DEFAULT_POLICY);
    # resolved here without importing the Airflow operators.
    import decisionflow

    return str(Path(decisionflow.__file__).resolve().parent / "policies" / "transaction_risk.yaml")


def _data(*parts: str) -> str:
    return str(config.data_dir().joinpath(*parts))


def _default_online_store() -> dict[str, Any]:
    return {"type": "sqlite", "path": _data("feast", "online.db")}


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway connects to.

    Attributes:
        mlflow_uri: MLflow tracking URI (the registry the model versions come from).
        model_name: Registered model name.
        model_version: Version the plain-uvicorn mode loads (``LocalModelBackend``); ``None`` = the version
            behind ``model_alias``.
        model_alias: Alias resolved when ``model_version`` is ``None`` (``champion``).
        feature_service: Feast feature service read online (``risk_v1``).
        feast_project: Feast project.
        feast_registry: Feast registry: a file path (or a SQL registry URI).
        feast_online_store: Feast ``online_store`` settings (as in the ``feast_default`` connection's extra).
        feature_repo: The feature definitions (``include/feature_repo``): only to say where they are in errors.
        kafka_bootstrap: Kafka bootstrap servers for publishing online decisions; ``None`` = no publishing
            (``/v1/decisions`` without ``dry_run`` answers 503 naming Kafka).
        decisions_topic: Topic online decisions are published to (``decisions``).
        milvus_uri: Milvus server URI for similar cases (``http://127.0.0.1:19530``); ``None`` = decide without
            the similar-case rule (the audit row says so).
        policy_path: The decision policy file (default: the shipped policy).
        token_store: The hashed API token store (``<data>/serving/api_tokens.json``).
        max_body_bytes: Request bodies over this are refused with 413 (default 2 MiB).
        max_feature_age_seconds: Per feature view, an online row older than this (event time) is reported
            ``stale``; default: each view's Feast TTL (Feast 0.67 does not apply it online).
        kafka_timeout_seconds: How long a publish may take before ``/v1/decisions`` answers 503.
    """

    mlflow_uri: str = "http://127.0.0.1:5000"
    model_name: str = constants.MODEL_NAME
    model_version: str | None = None
    model_alias: str = constants.CHAMPION_ALIAS
    feature_service: str = constants.FEATURE_SERVICE
    feast_project: str = "decisionflow"
    feast_registry: str = field(default_factory=lambda: _data("feast", "registry.db"))
    feast_online_store: Mapping[str, Any] = field(default_factory=_default_online_store)
    feature_repo: str = field(default_factory=lambda: str(config.project_home() / "include" / "feature_repo"))
    kafka_bootstrap: str | None = None
    decisions_topic: str = constants.DECISIONS_TOPIC
    milvus_uri: str | None = None
    policy_path: str = field(default_factory=_default_policy)
    token_store: str = field(default_factory=lambda: _data("serving", "api_tokens.json"))
    max_body_bytes: int = 2 * 1024 * 1024
    max_feature_age_seconds: float | None = None
    kafka_timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, got {self.max_body_bytes}")
        if self.max_feature_age_seconds is not None and self.max_feature_age_seconds <= 0:
            raise ValueError(f"max_feature_age_seconds must be positive, got {self.max_feature_age_seconds}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GatewaySettings:
        """Settings from a mapping (Ray Serve ``args``); unknown keys are refused by name."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown gateway setting(s) {unknown}; known: {list(cls.field_names())}")
        return cls(**{k: _coerce(k, v) for k, v in values.items()})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> GatewaySettings:
        """Settings from ``DECISIONFLOW_GATEWAY_*`` variables, then ``overrides`` (``None`` values ignored)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.field_names():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    def as_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dataclasses.asdict(self).items()}

    def feast_repo_config(self) -> dict[str, Any]:
        """Keyword arguments of ``feast.RepoConfig`` (the feature store the gateway reads online)."""
        return {"project": self.feast_project, "provider": "local", "registry": self.feast_registry,
                "online_store": dict(self.feast_online_store), "entity_key_serialization_version": 3,
                "repo_path": self.feature_repo}


_INTS = {"max_body_bytes"}
_FLOATS = {"max_feature_age_seconds", "kafka_timeout_seconds"}


def _coerce(name: str, value: Any) -> Any:
    if value is None or not isinstance(value, str):
        return value
    try:
        if name in _INTS:
            return int(value)
        if name in _FLOATS:
            return float(value)
    except ValueError:
        raise ValueError(f"gateway setting {name}: expected a number, got {value!r}") from None
    if name == "feast_online_store":
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"gateway setting feast_online_store: not JSON ({exc}): {value[:200]!r}") from None
        if not isinstance(parsed, dict):
            raise ValueError("gateway setting feast_online_store: expected a JSON object like "
                             '{"type": "sqlite", "path": ".data/feast/online.db"}')
        return parsed
    return value
