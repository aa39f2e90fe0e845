"""MilvusHook against real Milvus Lite (in process) on a temporary data dir, including the one-owner lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from airflow.sdk import Connection

from decisionflow.hooks.base import LayerCheckError
from decisionflow.hooks.milvus import PLATFORM_CHECK_COLLECTION, MilvusHook, lite_lock_holder

pytestmark = pytest.mark.integration


@pytest.fixture
def lite_uri(tmp_path):
    return str(tmp_path / "lite" / "decisionflow.db")


@pytest.fixture
def hook(lite_uri, monkeypatch):
    conn = Connection(conn_id="milvus_default", conn_type="milvus", extra=json.dumps({"uri": lite_uri}))
    monkeypatch.setattr(MilvusHook, "get_connection", classmethod(lambda cls, conn_id: conn))
    return MilvusHook()


def other_process(code: str, uri: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, uri], text=True, **kwargs)


OPEN_AND_LIST = (
    "import sys; from pymilvus import MilvusClient; c = MilvusClient(uri=sys.argv[1]); "
    "print(sorted(c.list_collections())); c.close()"
)
HOLD = (
    "import sys, time; from pymilvus import MilvusClient; c = MilvusClient(uri=sys.argv[1]); "
    "print('holding', flush=True); time.sleep(120)"
)


def test_platform_check_round_trip(hook, lite_uri):
    result = hook.platform_check()
    assert result["mode"] == "lite"
    assert result["uri"] == lite_uri
    assert result["inserted"] == 8
    assert result["nearest_id"] == 103
    assert result["nearest_label"] == "axis-3"
    assert result["nearest_distance"] == pytest.approx(0.02, abs=1e-4)
    assert result["collection_seen"] is True
    assert result["dropped"] is True


def test_platform_check_releases_the_lite_lock(hook, lite_uri):
    hook.platform_check()
    assert lite_lock_holder(lite_uri) == (False, None)
    # Another process can open the same store right after, and the scratch collection is gone.
    proc = other_process(OPEN_AND_LIST, lite_uri, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    assert PLATFORM_CHECK_COLLECTION not in out


def test_platform_check_recreates_a_leftover_collection(hook, lite_uri):
    with hook.client() as client:
        client.create_collection(PLATFORM_CHECK_COLLECTION, dimension=16)  # a crashed run's leftover, wrong dim
        client.insert(PLATFORM_CHECK_COLLECTION, [{"id": 1, "vector": [0.5] * 16}])
    assert hook.platform_check()["nearest_id"] == 103
    assert hook.platform_check()["nearest_id"] == 103  # rerunnable


def test_client_keeps_data_between_sessions(hook):
    with hook.client() as client:
        client.create_collection("keep", dimension=4)
        client.insert("keep", [{"id": 7, "vector": [0.1, 0.2, 0.3, 0.4]}])
    with hook.client() as client:
        client.load_collection("keep")  # a reopened Lite store starts with its collections released
        rows = client.get("keep", ids=[7])
        client.drop_collection("keep")
    assert [row["id"] for row in rows] == [7]


def test_locked_store_names_the_other_process(hook, lite_uri):
    os.makedirs(os.path.dirname(lite_uri))
    holder = other_process(HOLD, lite_uri, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(LayerCheckError) as info:
            hook.platform_check()
        assert info.value.layer == "milvus"
        assert str(holder.pid) in info.value.cause
        assert "another process holds" in info.value.remedy
        assert lite_uri in info.value.remedy
    finally:
        holder.kill()
        holder.wait()
    # Once the other process is gone, the store is usable again.
    assert hook.platform_check()["nearest_id"] == 103
