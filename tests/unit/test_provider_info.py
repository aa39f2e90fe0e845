from __future__ import annotations

import importlib

import decisionflow
from decisionflow.provider_info import get_provider_info


def test_provider_info_via_package_and_entry_point():
    from importlib.metadata import entry_points

    info = decisionflow.get_provider_info()
    assert info["package-name"] == "decisionflow"
    (ep,) = [e for e in entry_points(group="apache_airflow_provider") if e.value.startswith("decisionflow")]
    assert ep.load()() == info


def test_connection_types_point_at_real_hooks():
    info = get_provider_info()
    types = {c["connection-type"] for c in info["connection-types"]}
    assert {"mlflow", "ray", "milvus", "feast", "delta_lake", "llm"} <= types
    for entry in info["connection-types"]:
        module, _, cls = entry["hook-class-name"].rpartition(".")
        hook = getattr(importlib.import_module(module), cls)
        assert hook.conn_type == entry["connection-type"]


def test_every_listed_module_imports():
    info = get_provider_info()
    for section in ("hooks", "operators", "sensors", "triggers"):
        for entry in info[section]:
            for module in entry["python-modules"]:
                importlib.import_module(module)


def test_provider_info_validates_against_airflow_schema():
    import json
    from importlib.resources import files

    import jsonschema

    schema = json.loads(files("airflow").joinpath("provider_info.schema.json").read_text())
    jsonschema.validate(get_provider_info(), schema)
