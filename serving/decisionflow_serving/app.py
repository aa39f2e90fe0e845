"""The gateway: FastAPI app over a :class:`~decisionflow_serving.backends.ScoringBackend`.

Routes (``/v1/*`` need ``Authorization: Bearer <token>``; probes and the scrape do not):

* ``POST /v1/score`` - 1..1,000 transactions -> one score and band each, all from ONE model version.
* ``POST /v1/decisions`` - one transaction -> the decision the batch run would make (same policy, similar-case
  and decision code: :func:`decisionflow.decisions.graph.retrieve_similar` / ``decide_frame``), published with
  its full audit to the ``decisions`` topic (``?dry_run=true``: decided, not published).
* ``GET /health`` (live), ``GET /ready`` (a model version loaded: 200, else 503), ``GET /metrics``
  (Prometheus), ``/docs`` and ``/openapi.json``.

Errors say which component failed and what to do: 401 (token), 413 (body over ``max_body_bytes``), 422 (the
field, from the transactions contract), 503 (no model loaded / feature store / Kafka unavailable).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from decisionflow_serving import metrics
from decisionflow_serving.auth import TokenVerifier
from decisionflow_serving.backends import Scored, ScoringBackend
from decisionflow_serving.features import FeatureStoreUnavailable, FeatureVector, OnlineFeatures
from decisionflow_serving.schemas import (
    CONTRACT,
    DecisionResponse,
    Problem,
    ScoreRequest,
    ScoreResponse,
    Transaction,
    contract_violations,
)
from decisionflow_serving.settings import GatewaySettings

log = logging.getLogger("decisionflow_serving")

ONLINE_RUN_ID = "online"
ORIGIN_HEADER = ("origin", b"online")


class FeatureSource(Protocol):
    def vectors(self, transactions: Sequence[dict[str, Any]]) -> list[FeatureVector]: ...


class PublishError(RuntimeError):
    """A decision could not be published; the message names Kafka and the remedy."""


class Publisher(Protocol):
    def publish(self, key: str, value: str) -> None:
        """Publish one decision (key = decision_id) and wait for the broker's ack; raise :class:`PublishError`."""


# -- decisions ------------------------------------------------------------------------------------------------
class OnlineDecider:
    """The batch decision code on one transaction: similar cases where the policy wants them, then the policy.

    Args:
        policy: the loaded :class:`~decisionflow.decisions.policy.Policy`.
        similar: similar-case search (:class:`~decisionflow.decisions.graph.MilvusSimilarCases`) or ``None``.
        similar_k: similar cases per transaction (the batch run's default, 5).
    """

    def __init__(self, policy: Any, similar: Any = None, similar_k: int = 5):
        self.policy, self.similar, self.similar_k = policy, similar, similar_k

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> OnlineDecider:
        from decisionflow.decisions.policy import Policy

        similar = None
        if settings.milvus_uri:
            from decisionflow import config
            from decisionflow.decisions.graph import MilvusSimilarCases
            from decisionflow.vectors.embedders import embedder_from_config

            embedder: list[Any] = []

            def embedder_factory():
                if not embedder:
                    embedder.append(embedder_from_config(cache_dir=config.data_dir() / "embeddings"))
                return embedder[0]

            def client_factory():
                from pymilvus import MilvusClient

                return MilvusClient(uri=settings.milvus_uri)

            similar = MilvusSimilarCases(client_factory, embedder_factory)
        return cls(Policy.load(settings.policy_path), similar)

    def decide(self, row: dict[str, Any], scored: Scored, decided_at: datetime):
        """The audit row (a one-row frame, ``band`` included) of ``row`` scored as ``scored``."""
        import numpy as np
        import pandas as pd

        from decisionflow.decisions.graph import PinnedModel, decide_frame, retrieve_similar
        from decisionflow_serving.features import parse_event_time

        pinned = PinnedModel(scored.model_name, scored.model_version, scored.run_id, tuple(scored.feature_columns),
                             float(scored.review), float(scored.decline))
        frame = pd.DataFrame([row])
        for column in (*self.policy.columns(), *scored.feature_columns):
            if column not in frame.columns:  # a feature the store did not return: null (FEATURES_MISSING)
                frame[column] = np.nan
        frame["event_time"] = pd.to_datetime([parse_event_time(row["event_time"])], utc=True)
        for column in frame.columns:  # null features: NaN in a float column, as gold gives them to the batch
            if frame[column].isna().all() and column not in ("device_id", "ip", "memo"):
                frame[column] = np.nan
        scores = np.asarray(scored.scores, dtype="float64")
        similar_cases, searched, _summary = retrieve_similar(self.similar, self.policy, frame, scores,
                                                             pinned.thresholds(), self.similar_k,
                                                             run_id=ONLINE_RUN_ID)
        out = decide_frame(self.policy, frame, scores, pinned, similar_cases, searched, ONLINE_RUN_ID, decided_at)
        out["brain"] = "policy"  # no escalation agent online: the policy's decision, as a batch PolicyBrain
        out["escalation"] = None
        return out


class KafkaPublisher:
    """An idempotent ``acks=all`` producer (the project's defaults, :mod:`decisionflow.hooks.kafka`); one
    flush per request with a timeout, header ``origin: online``."""

    def __init__(self, bootstrap: str, topic: str, timeout: float = 5.0, **config: Any):
        from confluent_kafka import Producer

        self.topic, self.timeout, self.bootstrap = topic, timeout, bootstrap
        self._errors: list[str] = []
        self._producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                                   "linger.ms": 0, "message.timeout.ms": int(max(timeout, 1) * 1000),
                                   "client.id": "decisionflow-gateway", **config})

    def publish(self, key: str, value: str) -> None:
        from confluent_kafka import KafkaException

        outcome: dict[str, Any] = {}

        def on_delivery(err, msg):
            outcome["error"] = err

        try:
            self._producer.produce(self.topic, key=key.encode(), value=value.encode(), headers=[ORIGIN_HEADER],
                                   on_delivery=on_delivery)
        except (KafkaException, BufferError) as exc:
            raise PublishError(f"[kafka] publish to {self.topic} at {self.bootstrap} refused: {exc}") from exc
        remaining = self._producer.flush(self.timeout)
        if "error" not in outcome:
            raise PublishError(f"[kafka] no acknowledgement from {self.bootstrap} for topic {self.topic} within "
                               f"{self.timeout:.1f}s ({remaining} message(s) still queued)")
        if outcome["error"] is not None:
            raise PublishError(f"[kafka] topic {self.topic} at {self.bootstrap}: {outcome['error']}")


# -- body limit, metrics --------------------------------------------------------------------------------------
def _route_label(scope: dict) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if path else "unmatched"


class GatewayMiddleware:
    """Pure ASGI: refuses bodies over ``max_body_bytes`` (by Content-Length and by streamed size) with 413, and
    counts every answer in the gateway metrics (route template, status, model version)."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        status_holder = {"status": 500, "started": False}
        limit = self.max_body_bytes

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
            await send(message)

        def too_large_response():
            return JSONResponse({"detail": _too_large_detail(limit)}, status_code=413)

        length = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
        try:
            if length is not None and length > limit:
                await too_large_response()(scope, receive, send_wrapper)
                return
            received = 0
            too_large = False

            async def limited_receive():
                nonlocal received, too_large
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        too_large = True
                        raise _BodyTooLarge(limit)
                return message

            try:
                await self.app(scope, limited_receive, send_wrapper)
            except _BodyTooLarge:
                if not status_holder["started"]:
                    await too_large_response()(scope, receive, send_wrapper)
        finally:
            metrics.observe(_route_label(scope), status_holder["status"], state.get("model_version"),
                            time.perf_counter() - started)


class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` once a streamed body passes the limit; FastAPI re-raises HTTP exceptions
    from body reading, so the app answers 413 (anything else would become a 400)."""

    def __init__(self, limit: int):
        super().__init__(413, _too_large_detail(limit))


def _too_large_detail(limit: int) -> str:
    return (f"request body over the gateway's limit of {limit} bytes (413) -- remedy: send fewer transactions "
            "per request (at most 1,000)")


# -- the app --------------------------------------------------------------------------------------------------
def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=detail, headers=headers)


def _band(score: float, review: float, decline: float) -> str:
    if math.isnan(score):
        return "review"
    return "decline" if score >= decline else "review" if score >= review else "approve"


#: Event times the gateway decides: the range of the lake's timestamps (pandas nanoseconds), 1970 on.
_EARLIEST, _LATEST = datetime(1970, 1, 1, tzinfo=timezone.utc), datetime(2262, 4, 11, tzinfo=timezone.utc)


def _event_time_problem(value: str) -> str | None:
    from decisionflow_serving.features import parse_event_time

    try:
        moment = parse_event_time(value)
    except (ValueError, OverflowError) as exc:
        return f"{value!r} is not a valid date-time ({exc})"
    if not _EARLIEST <= moment < _LATEST:
        return (f"{value!r} is outside the range the gateway decides ({_EARLIEST:%Y-%m-%d} to "
                f"{_LATEST:%Y-%m-%d})")
    return None


def _field_path(loc: Sequence[Any]) -> str:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def create_app(settings: GatewaySettings, backend: ScoringBackend, *, decider: Any = None,
               publisher: Publisher | None = None, features: FeatureSource | None = None,
               verifier: TokenVerifier | None = None) -> FastAPI:
    """The gateway app.

    Args:
        settings: where things are (:class:`GatewaySettings`).
        backend: who scores (``LocalModelBackend`` in-process, ``RoutedBackend`` on Ray Serve).
        decider: decides one scored transaction (default: :class:`OnlineDecider` from ``settings``, built on
            first use).
        publisher: publishes decisions (default: :class:`KafkaPublisher` on ``settings.kafka_bootstrap``;
            none configured -> a non-dry-run decision answers 503 naming Kafka).
        features: feature vectors (default: :class:`OnlineFeatures` over ``settings``' feature store, opened on
            first use).
        verifier: bearer token check (default: the token store at ``settings.token_store``).
    """
    verifier = verifier if verifier is not None else TokenVerifier(settings.token_store)
    lazy: dict[str, Any] = {"features": features, "decider": decider, "publisher": publisher}

    def get_features() -> FeatureSource:
        if lazy["features"] is None:
            lazy["features"] = OnlineFeatures.from_settings(settings)
        return lazy["features"]

    def get_decider():
        if lazy["decider"] is None:
            lazy["decider"] = OnlineDecider.from_settings(settings)
        return lazy["decider"]

    def get_publisher() -> Publisher:
        if lazy["publisher"] is None:
            if not settings.kafka_bootstrap:
                raise PublishError("[kafka] no Kafka configured for the gateway (kafka_bootstrap) -- remedy: "
                                   "set DECISIONFLOW_GATEWAY_KAFKA_BOOTSTRAP, or call with dry_run=true")
            lazy["publisher"] = KafkaPublisher(settings.kafka_bootstrap, settings.decisions_topic,
                                               settings.kafka_timeout_seconds)
        return lazy["publisher"]

    app = FastAPI(
        title="decisionflow gateway",
        version="1",
        description="Scores and decides transactions (contract transactions v1) with the model version it "
                    "serves; `/v1/*` need `Authorization: Bearer <token>` (first token: `.data/serving/api_token`).",
    )
    app.state.settings = settings
    app.state.backend = backend
    app.add_middleware(GatewayMiddleware, max_body_bytes=settings.max_body_bytes)

    bearer = HTTPBearer(auto_error=False, description="An API token from the gateway's token store.")

    def token_ok(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and verifier.verify(token.strip())

    def unauthorized() -> HTTPException:
        return _problem(401, "missing or invalid API token -- remedy: send Authorization: Bearer <token> "
                             "(the first token is in .data/serving/api_token)", {"WWW-Authenticate": "Bearer"})

    async def require_token(request: Request,
                            _credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not token_ok(request):
            raise unauthorized()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        # Authentication first: a caller without a valid token learns nothing about the body.
        if request.url.path.startswith("/v1/") and not token_ok(request):
            e = unauthorized()
            return JSONResponse({"detail": e.detail}, status_code=401, headers=e.headers)
        errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: b.decode(errors="replace")})
        for error in errors:
            if isinstance(error.get("input"), (dict, list)):
                error.pop("input")  # the whole record or batch: not worth echoing back
            error.pop("url", None)
        fields = [f"{_field_path(e.get('loc', ()))}: {e.get('msg', '')}" for e in errors]
        return JSONResponse({"detail": errors, "message": "invalid request: " + "; ".join(fields)[:2000]},
                            status_code=422)

    def check_contract(records: list[dict[str, Any]], prefix: tuple) -> None:
        errors = []
        for i, record in enumerate(records):
            where = ("body", *prefix, *((i,) if prefix else ()))
            violations = contract_violations(record)
            for name, message in violations:
                errors.append({"type": "contract", "loc": (*where, name), "msg": message})
            if not violations:
                problem = _event_time_problem(record["event_time"])
                if problem:
                    errors.append({"type": "value_error", "loc": (*where, "event_time"), "msg": problem})
        if errors:
            raise RequestValidationError(errors)

    def known_fields(record: dict[str, Any]) -> dict[str, Any]:
        # Unknown fields are allowed by the contract and ignored: they never reach features or the policy.
        return {name: record.get(name) for name in CONTRACT.field_names}

    async def vectors_for(records: list[dict[str, Any]]) -> list[FeatureVector]:
        try:
            source = get_features()
            return await run_in_threadpool(source.vectors, records)
        except FeatureStoreUnavailable as exc:
            raise _problem(503, str(exc)) from exc

    async def score_with(request: Request, rows: list[dict[str, Any]]) -> Scored:
        if not backend.ready():
            raise _problem(503, "[models] no model version loaded yet -- remedy: wait for /ready, or deploy a "
                                "version (rollout_model / --model-version)")
        scored = await backend.score(rows)
        request.state.model_version = scored.model_version
        if len(scored.scores) != len(rows):
            raise _problem(500, f"[models] {scored.model_name} v{scored.model_version} returned "
                                f"{len(scored.scores)} scores for {len(rows)} rows")
        return scored

    def policy_thresholds(scored: Scored) -> tuple[float, float]:
        from decisionflow.decisions.policy import Thresholds

        eff = get_decider().policy.thresholds(Thresholds(review=scored.review, decline=scored.decline))
        return eff.review, eff.decline

    responses = {401: {"model": Problem}, 413: {"model": Problem}, 503: {"model": Problem}}

    @app.post("/v1/score", response_model=ScoreResponse, dependencies=[Depends(require_token)],
              responses=responses, summary="Score 1..1,000 transactions with one model version")
    async def score(request: Request, body: ScoreRequest) -> ScoreResponse:
        records = [t.model_dump() for t in body.transactions]
        check_contract(records, ("transactions",))
        records = [known_fields(r) for r in records]
        vectors = await vectors_for(records)
        scored = await score_with(request, [v.row for v in vectors])
        review, decline = policy_thresholds(scored)
        items = [{"event_id": r["event_id"], "score": s, "band": _band(s, review, decline), **v.state()}
                 for r, s, v in zip(records, scored.scores, vectors)]
        return ScoreResponse.model_validate(
            {"model": {"name": scored.model_name, "version": scored.model_version}, "scores": items})

    @app.post("/v1/decisions", response_model=DecisionResponse, dependencies=[Depends(require_token)],
              responses=responses, summary="Decide one transaction (and publish the decision)")
    async def decisions(request: Request, body: Transaction,  # type: ignore[valid-type]
                        dry_run: bool = Query(False, description="Decide, do not publish.")) -> JSONResponse:
        record = body.model_dump()
        check_contract([record], ())
        record = known_fields(record)
        vector = (await vectors_for([record]))[0]
        scored = await score_with(request, [vector.row])
        decider = get_decider()
        decided_at = datetime.now(timezone.utc)
        frame = await run_in_threadpool(decider.decide, vector.row, scored, decided_at)
        from decisionflow.decisions.outbox import kafka_payloads

        payload = kafka_payloads(frame.drop(columns=["band"]), run_id=ONLINE_RUN_ID)[0]
        published = False
        if not dry_run:
            try:
                publisher = get_publisher()
                await run_in_threadpool(publisher.publish, str(frame["decision_id"].iloc[0]), payload)
            except PublishError as exc:
                raise _problem(503, f"{exc} -- the decision was NOT recorded; nothing was published: retry the "
                                    "request (the decision id is deterministic, a retry cannot duplicate it)"
                               ) from exc
            published = True
        audit = json.loads(payload)
        audit.pop("idempotency_key", None)
        audit["band"] = str(frame["band"].iloc[0])
        out = {**audit, "model": {"name": scored.model_name, "version": scored.model_version},
               "published": published, **vector.state()}
        return JSONResponse(jsonable_encoder(out))

    @app.get("/health", summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="A model version is loaded", responses={503: {"model": Problem}})
    async def ready() -> JSONResponse:
        if backend.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready", "detail": "[models] no model version loaded"},
                            status_code=503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_endpoint() -> Response:
        body, content_type = metrics.exposition()
        return Response(content=body, media_type=content_type)

    return app
