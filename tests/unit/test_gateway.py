"""The gateway app under FastAPI's TestClient, with a fake scoring backend and a fixed feature table.

The policy, the decision code (retrieve_similar / decide_frame), the contract validation, the auth store and
the metrics are the real ones; only the model (a fixed score per account) and the feature store are fakes.
"""

from __future__ import annotations

import json
import uuid

import pytest
from fastapi.testclient import TestClient

from decisionflow_serving import auth
from decisionflow_serving.app import OnlineDecider, PublishError, create_app
from decisionflow_serving.backends import Scored, ScoringBackend
from decisionflow_serving.features import StaticFeatures
from decisionflow_serving.settings import GatewaySettings

REVIEW, DECLINE = 0.3, 0.8
FEATURES = {"txn_count_1h": 1, "txn_count_24h": 2, "txn_count_7d": 5, "amount_sum_1h": 10.0,
            "amount_sum_24h": 40.0, "amount_sum_7d": 120.0, "distinct_devices_24h": 1, "distinct_devices_7d": 1,
            "distinct_countries_24h": 1, "distinct_countries_7d": 1, "seconds_since_prev_txn": 3600.0,
            "amount_to_avg_7d": 1.0, "merchant_txn_count_24h": 10, "merchant_txn_count_7d": 50,
            "merchant_labels_known": 2, "merchant_fraud_labels": 0, "merchant_fraud_rate": 0.0,
            "amount_to_avg_24h": 1.0, "share_of_24h_spend": 0.5}
SCORES = {"acc-low": 0.05, "acc-mid": 0.5, "acc-high": 0.95}


class FakeBackend:
    """Scores by account id; ``loaded=False`` = no model yet."""

    def __init__(self, loaded: bool = True, version: str = "3"):
        self.loaded, self.version, self.calls = loaded, version, []

    def ready(self) -> bool:
        return self.loaded

    async def score(self, rows):
        self.calls.append(rows)
        return Scored(scores=[SCORES.get(r["account_id"], 0.1) for r in rows], model_name="decisionflow-risk",
                      model_version=self.version, review=REVIEW, decline=DECLINE, run_id="run-1",
                      feature_columns=tuple(FEATURES) + ("amount",))


class FakePublisher:
    def __init__(self, fail: bool = False):
        self.fail, self.sent = fail, []

    def publish(self, key: str, value: str) -> None:
        if self.fail:
            raise PublishError("[kafka] no acknowledgement from 127.0.0.1:1 for topic decisions within 1.0s")
        self.sent.append((key, value))


def transaction(account: str = "acc-low", **changes) -> dict:
    record = {"event_id": str(uuid.uuid4()), "event_time": "2026-11-30T12:00:00Z", "account_id": account,
              "merchant_id": "m-1", "amount": 42.5, "currency": "EUR", "mcc": "5411", "channel": "card_present",
              "country": "DE", "device_id": None, "ip": None, "memo": None, "schema_version": 1}
    record.update(changes)
    return record


@pytest.fixture()
def gateway(tmp_path):
    token_file = auth.ensure_first_token(tmp_path)
    settings = GatewaySettings(token_store=str(tmp_path / "serving" / "api_tokens.json"), max_body_bytes=64 * 1024,
                               mlflow_uri="http://127.0.0.1:1")
    backend, publisher = FakeBackend(), FakePublisher()
    features = StaticFeatures(lambda t: None if t["account_id"] == "acc-unknown" else dict(FEATURES))
    app = create_app(settings, backend, publisher=publisher, features=features)
    client = TestClient(app)
    client.headers["Authorization"] = f"Bearer {token_file.read_text().strip()}"
    client.backend, client.publisher, client.settings = backend, publisher, settings
    return client


def test_the_fake_is_a_scoring_backend():
    assert isinstance(FakeBackend(), ScoringBackend)


def test_v1_needs_a_valid_token(gateway):
    body = {"transactions": [transaction()]}
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        response = gateway.post("/v1/score", json=body, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
    # an invalid body without a token is a 401 too: nothing is said about the body
    assert gateway.post("/v1/decisions", json={"amount": "x"}, headers={"Authorization": ""}).status_code == 401
    assert gateway.backend.calls == []
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        assert gateway.get(path, headers={"Authorization": ""}).status_code == 200, path


def test_a_token_added_to_the_store_is_accepted(gateway):
    token = auth.add_token(gateway.settings.token_store, "second")
    stored = json.loads(open(gateway.settings.token_store).read())
    assert token not in json.dumps(stored) and len(stored["tokens"]) == 2  # hashes only
    import time

    time.sleep(2.1)  # the verifier re-reads the store at most every 2 s
    response = gateway.post("/v1/score", json={"transactions": [transaction()]},
                            headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200


@pytest.mark.parametrize(("change", "field"), [
    ({"amount": "12"}, "amount"), ({"amount": -1}, "amount"), ({"channel": "fax"}, "channel"),
    ({"event_id": "not-a-uuid"}, "event_id"), ({"currency": "eur"}, "currency"), ({"schema_version": 2}, "schema_version"),
    ({"event_time": "2026-13-45T99:00:00Z"}, "event_time"),  # matches the pattern; not a date-time
    ({"ip": "1.2.3.999"}, "ip"),  # matches the pattern; not an IPv4/IPv6 address
    ({"event_time": "0001-01-01T00:00:00Z"}, "event_time"),  # valid RFC 3339, outside what the lake stores
    ({"amount": 1e300}, "amount"),
])
def test_422_names_the_field(gateway, change, field):
    response = gateway.post("/v1/score", json={"transactions": [transaction(), transaction(**change)]})
    assert response.status_code == 422, response.text
    body = response.json()
    assert any(e["loc"][-1] == field and e["loc"][:3] == ["body", "transactions", 1] for e in body["detail"]), body
    assert f"transactions[1].{field}" in body["message"]
    response = gateway.post("/v1/decisions", json=transaction(**change), params={"dry_run": "true"})
    assert response.status_code == 422 and field in response.json()["message"]


def test_a_missing_field_and_a_wrong_batch_size_are_422(gateway):
    record = transaction()
    del record["merchant_id"]
    response = gateway.post("/v1/score", json={"transactions": [record]})
    assert response.status_code == 422 and "transactions[0].merchant_id" in response.json()["message"]
    assert gateway.post("/v1/score", json={"transactions": []}).status_code == 422
    assert gateway.post("/v1/score", content=b"{not json", headers={"Content-Type": "application/json"}
                        ).status_code == 422


def test_over_the_body_limit_is_413(gateway):
    big = {"transactions": [transaction(memo="x" * 400) for _ in range(200)]}  # ~100 KiB > 64 KiB
    response = gateway.post("/v1/score", json=big)
    assert response.status_code == 413 and "limit" in response.json()["detail"]

    # a streamed body (no Content-Length) is counted as it arrives
    def chunks():
        text = json.dumps(big).encode()
        for i in range(0, len(text), 8192):
            yield text[i:i + 8192]

    response = gateway.post("/v1/score", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_score_response_shape_and_bands_from_the_versions_thresholds(gateway):
    records = [transaction("acc-low"), transaction("acc-mid"), transaction("acc-high"), transaction("acc-unknown")]
    response = gateway.post("/v1/score", json={"transactions": records})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "decisionflow-risk", "version": "3"}
    assert [s["event_id"] for s in body["scores"]] == [r["event_id"] for r in records]
    assert [s["band"] for s in body["scores"]] == ["approve", "review", "decline", "approve"]
    assert body["scores"][0]["score"] == 0.05 and body["scores"][3]["missing"] == ["all"]
    assert set(body["scores"][0]) == {"event_id", "score", "band", "features_as_of", "stale", "missing"}
    # the backend got full feature rows: the request fields and every feature
    row = gateway.backend.calls[-1][0]
    assert row["amount"] == 42.5 and row["channel"] == "card_present" and row["txn_count_7d"] == 5


def test_ready_is_503_without_a_model(tmp_path):
    settings = GatewaySettings(token_store=str(tmp_path / "tokens.json"))
    client = TestClient(create_app(settings, FakeBackend(loaded=False), features=StaticFeatures(lambda t: {})))
    assert client.get("/ready").status_code == 503
    assert client.get("/health").status_code == 200
    assert TestClient(create_app(settings, FakeBackend())).get("/ready").status_code == 200


def test_a_decision_uses_the_policy_and_is_published_with_its_audit(gateway):
    record = transaction("acc-high")
    response = gateway.post("/v1/decisions", json=record)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["decision"] == "decline" and body["band"] == "decline" and body["published"] is True
    assert body["model"] == {"name": "decisionflow-risk", "version": "3"} and body["model_version"] == "3"
    assert body["run_id"] == "online" and body["event_id"] == record["event_id"]
    assert "SCORE_HIGH" in body["reason_codes"] and body["actions"] == ["decline_transaction", "notify_customer"]
    assert body["features"]["txn_count_7d"] == 5 and body["policy_name"] == "transaction_risk"
    [(key, value)] = gateway.publisher.sent
    assert key == body["decision_id"]
    published = json.loads(value)
    assert published["decision"] == "decline" and published["run_id"] == "online"
    assert published["decision_id"] == body["decision_id"] and "band" not in published

    # dry run: the same decision (the decision id is deterministic), nothing published
    again = gateway.post("/v1/decisions", json=record, params={"dry_run": "true"}).json()
    assert again["published"] is False and again["decision_id"] == body["decision_id"]
    assert len(gateway.publisher.sent) == 1


def test_missing_features_go_to_review_never_a_silent_approve(gateway):
    body = gateway.post("/v1/decisions", json=transaction("acc-unknown"), params={"dry_run": "true"}).json()
    assert body["decision"] == "review" and "FEATURES_MISSING" in body["reason_codes"]
    assert body["missing"] == ["all"]


def test_a_failed_publish_is_503_naming_kafka(gateway):
    gateway.publisher.fail = True
    response = gateway.post("/v1/decisions", json=transaction("acc-mid"))
    assert response.status_code == 503
    assert "[kafka]" in response.json()["detail"] and "NOT recorded" in response.json()["detail"]


def test_no_kafka_configured_is_503_but_a_dry_run_works(tmp_path):
    token = auth.ensure_first_token(tmp_path).read_text().strip()
    settings = GatewaySettings(token_store=str(tmp_path / "serving" / "api_tokens.json"))
    client = TestClient(create_app(settings, FakeBackend(), features=StaticFeatures(lambda t: dict(FEATURES))))
    client.headers["Authorization"] = f"Bearer {token}"
    response = client.post("/v1/decisions", json=transaction())
    assert response.status_code == 503 and "kafka_bootstrap" in response.json()["detail"]
    assert client.post("/v1/decisions", json=transaction(), params={"dry_run": "true"}).status_code == 200


def test_metrics_count_requests_by_route_status_and_version(gateway):
    gateway.post("/v1/score", json={"transactions": [transaction()]})
    gateway.post("/v1/score", json={"transactions": [transaction()]}, headers={"Authorization": "Bearer no"})
    gateway.get("/no/such/path")
    text = gateway.get("/metrics").text
    assert 'decisionflow_gateway_requests_total{model_version="3",route="/v1/score",status="200"}' in text
    assert 'decisionflow_gateway_requests_total{model_version="none",route="/v1/score",status="401"}' in text
    assert 'route="unmatched",status="404"' in text
    assert 'decisionflow_gateway_request_seconds_bucket{le="0.0025",model_version="3",route="/v1/score"}' in text


def test_openapi_shows_the_contract(gateway):
    spec = gateway.get("/openapi.json").json()
    transaction_schema = spec["components"]["schemas"]["Transaction"]
    assert transaction_schema["properties"]["channel"]["enum"] == ["card_present", "ecommerce", "mobile", "atm"]
    assert transaction_schema["properties"]["amount"]["exclusiveMinimum"] == 0
    assert set(transaction_schema["required"]) >= {"event_id", "amount", "schema_version"}
    assert "/v1/score" in spec["paths"] and "/v1/decisions" in spec["paths"]
    assert gateway.get("/docs").status_code == 200


def test_online_decider_is_the_batch_decision_code():
    from decisionflow.decisions.policy import Policy

    decider = OnlineDecider(Policy.load(GatewaySettings().policy_path))
    scored = Scored([0.5], "decisionflow-risk", "3", REVIEW, DECLINE, "run-1", tuple(FEATURES) + ("amount",))
    frame = decider.decide({**transaction("acc-mid"), **FEATURES}, scored, __import__("datetime").datetime.now())
    assert frame["decision"].iloc[0] == "review" and frame["band"].iloc[0] == "review"
    # no vector store configured: the row that wanted a search says so (never a silent skip)
    assert "unavailable" in frame["similar_cases"].iloc[0]


def test_settings_from_env_and_dict():
    settings = GatewaySettings.from_env({"DECISIONFLOW_GATEWAY_MAX_BODY_BYTES": "1000",
                                         "DECISIONFLOW_GATEWAY_FEAST_ONLINE_STORE": '{"type": "redis"}'},
                                        model_version="4")
    assert settings.max_body_bytes == 1000 and settings.feast_online_store == {"type": "redis"}
    assert settings.model_version == "4"
    with pytest.raises(ValueError, match="unknown gateway setting"):
        GatewaySettings.from_dict({"mlflow_url": "x"})
    assert GatewaySettings.from_dict(settings.as_dict()) == settings


def test_ensure_first_token_is_idempotent_and_private(tmp_path):
    path = auth.ensure_first_token(tmp_path)
    token = path.read_text().strip()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert auth.ensure_first_token(tmp_path) == path and path.read_text().strip() == token
    verifier = auth.TokenVerifier(tmp_path / "serving" / "api_tokens.json")
    assert verifier.verify(token) and not verifier.verify(token + "x") and not verifier.verify(None)
