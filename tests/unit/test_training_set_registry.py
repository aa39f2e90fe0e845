"""build_training_set before the feature repo is applied (a fresh platform: skip) vs a wrong service name (fail)."""

from __future__ import annotations

import pandas as pd
import pytest

from decisionflow.exceptions import NotReadyError
from decisionflow.features import training_set


class FakeStore:
    def __init__(self, services):
        self.services = services

    def get_feature_service(self, name):
        raise LookupError(f"Feature service {name} does not exist in project decisionflow")

    def list_feature_services(self):
        return self.services


@pytest.fixture(autouse=True)
def some_labelled_rows(monkeypatch):
    rows = pd.DataFrame({"event_id": ["e1"], "event_timestamp": [pd.Timestamp("2026-11-01", tz="UTC")]})
    monkeypatch.setattr(training_set, "labelled_entity_rows", lambda *a, **k: (rows, {}, {"labelled": 1}))


def test_nothing_applied_yet_is_not_ready():
    with pytest.raises(training_set.TrainingSourceMissingError, match="apply the feature repo first") as raised:
        training_set.build_training_set(FakeStore([]), "/lake", feature_service="risk_v1")
    assert isinstance(raised.value, NotReadyError)


def test_a_service_name_the_registry_does_not_know_fails():
    with pytest.raises(training_set.TrainingSetError, match="'risk_v9' is not in the Feast registry") as raised:
        training_set.build_training_set(FakeStore(["risk_v1"]), "/lake", feature_service="risk_v9")
    assert not isinstance(raised.value, NotReadyError)
