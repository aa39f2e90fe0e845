"""airflow_settings.yaml: the real file, and every way a hand-edited one can be wrong."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from decisionflow.config import project_home
from decisionflow.settings.airflow_settings import (
    AirflowSettings,
    SettingsError,
    VariableSpec,
    load_settings,
    main,
)

REAL_FILE = project_home() / "airflow_settings.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "airflow_settings.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def errors_for(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert info.value.path == path
    assert str(info.value) == "\n".join(info.value.errors)
    for line in info.value.errors:
        assert line.startswith(str(path)), line  # every message names the file
    return info.value.errors


def single_error(tmp_path: Path, text: str) -> str:
    errors = errors_for(tmp_path, text)
    assert len(errors) == 1, errors
    return errors[0]


# --------------------------------------------------------------------------------------------------
# The real file
# --------------------------------------------------------------------------------------------------


def test_real_file_parses_without_importing_airflow():
    already = "airflow" in sys.modules
    settings = load_settings(REAL_FILE)
    assert isinstance(settings, AirflowSettings)
    if not already:
        assert "airflow" not in sys.modules
    assert [c.conn_id for c in settings.connections] == [
        "kafka_default",
        "spark_default",
        "mlflow_default",
        "ray_default",
        "milvus_default",
        "feast_default",
        "actions_webhook",
        "alerts_webhook",
        "lake_default",
    ]


def test_real_file_connections():
    s = load_settings(REAL_FILE)

    kafka = s.connection("kafka_default")
    assert kafka.conn_type == "kafka"
    assert kafka.extra == {
        "bootstrap.servers": "127.0.0.1:9092",
        "group.id": "decisionflow",
        "security.protocol": "PLAINTEXT",
    }

    spark = s.connection("spark_default")
    assert (spark.conn_type, spark.host) == ("spark", "local[*]")
    assert spark.extra == {"deploy-mode": "client", "spark-binary": "spark-submit"}

    mlflow = s.connection("mlflow_default")
    assert (mlflow.conn_type, mlflow.host, mlflow.port, mlflow.schema) == ("mlflow", "127.0.0.1", 5000, "http")
    assert mlflow.extra is None

    ray = s.connection("ray_default")
    assert (ray.conn_type, ray.host, ray.port) == ("ray", "127.0.0.1", 6380)
    assert ray.extra == {
        "dashboard_url": "http://127.0.0.1:8265",
        "auth_token_path": "${DECISIONFLOW_DATA}/ray/auth_token",
        "namespace": "decisionflow",
    }

    milvus = s.connection("milvus_default")
    assert milvus.conn_type == "milvus"
    assert milvus.extra == {"uri": "http://127.0.0.1:19530"}  # the stack's served Milvus Lite
    webhook = s.connection("actions_webhook")  # the stack's local receiver
    assert (webhook.conn_type, webhook.host, webhook.port, webhook.extra) == ("http", "127.0.0.1", 8090,
                                                                               {"endpoint": "actions"})

    feast = s.connection("feast_default")
    assert feast.conn_type == "feast"
    assert feast.extra == {
        "repo_path": "include/feature_repo",
        "project": "decisionflow",
        "registry": "${DECISIONFLOW_DATA}/feast/registry.db",
        "online_store": {"type": "sqlite", "path": "${DECISIONFLOW_DATA}/feast/online.db"},
    }

    lake = s.connection("lake_default")
    assert (lake.conn_type, lake.extra) == ("delta_lake", {"root": "${DECISIONFLOW_DATA}/lake"})

    # Local stack: nothing listens beyond loopback, and paths stay relative (the hooks resolve them).
    assert all(c.host in (None, "127.0.0.1", "local[*]") for c in s.connections)
    assert not any(str(v).startswith("/") for c in s.connections for v in (c.extra or {}).values())
    # extra is stored as JSON by Airflow: it must round-trip.
    assert json.loads(feast.extra_json()) == feast.extra


def test_real_file_pools_and_variables():
    s = load_settings(REAL_FILE)
    assert {p.name: p.slots for p in s.pools} == {"spark": 1, "ray": 2}
    assert all(p.description for p in s.pools)
    assert [(v.key, v.stored_value) for v in s.variables] == [("decisionflow_environment", "local")]


def test_default_path_is_project_home(monkeypatch, tmp_path):
    write(tmp_path, "airflow:\n  variables:\n    - variable_name: x\n      variable_value: y\n")
    monkeypatch.setenv("DECISIONFLOW_HOME", str(tmp_path))
    assert load_settings().variable("x").value == "y"


# --------------------------------------------------------------------------------------------------
# Accepted forms
# --------------------------------------------------------------------------------------------------


def test_conn_extra_as_json_string(tmp_path):
    path = write(tmp_path, """
        airflow:
          connections:
            - conn_id: a
              conn_type: http
              conn_extra: '{"timeout": 3, "nested": {"k": [1, 2]}}'
    """)
    assert load_settings(path).connection("a").extra == {"timeout": 3, "nested": {"k": [1, 2]}}


def test_empty_sections_and_astro_placeholders_are_fine(tmp_path):
    # What `astro dev init` writes: entries whose every field is empty are skipped, like the Astro CLI does.
    path = write(tmp_path, """
        airflow:
          connections:
            - conn_id:
              conn_type:
              conn_host:
              conn_schema:
              conn_login:
              conn_password:
              conn_port:
              conn_extra:
          pools:
            - pool_name:
              pool_slot:
              pool_description:
          variables:
    """)
    s = load_settings(path)
    assert (s.connections, s.pools, s.variables) == ((), (), ())


def test_conn_uri_instead_of_fields(tmp_path):
    path = write(tmp_path, """
        airflow:
          connections:
            - conn_id: pg
              conn_uri: postgresql://u:p@127.0.0.1:5432/db
    """)
    spec = load_settings(path).connection("pg")
    assert spec.uri == "postgresql://u:p@127.0.0.1:5432/db"
    assert spec.conn_type is None
    assert "p@" not in repr(spec)  # the URI may hold a password: keep it out of reprs


def test_variable_values_non_strings_stored_as_json(tmp_path):
    path = write(tmp_path, """
        airflow:
          variables:
            - variable_name: s
              variable_value: text
            - variable_name: n
              variable_value: 3
            - variable_name: m
              variable_value: {a: [1, true]}
            - variable_name: empty
              variable_value:
    """)
    s = load_settings(path)
    assert s.variable("s").stored_value == "text"
    assert json.loads(s.variable("n").stored_value) == 3
    assert json.loads(s.variable("m").stored_value) == {"a": [1, True]}
    assert s.variable("empty").stored_value == ""
    assert VariableSpec("k", [1]).stored_value == "[\n  1\n]"  # what Variable.set(serialize_json=True) writes


# --------------------------------------------------------------------------------------------------
# File-level problems
# --------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(SettingsError, match="file not found") as info:
        load_settings(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_yaml_syntax_error_has_line(tmp_path):
    msg = single_error(tmp_path, """
        airflow:
          connections:
            - conn_id: a
              conn_type: [http
          pools: []
    """)
    assert "YAML syntax error" in msg
    assert msg.startswith(f"{tmp_path / 'airflow_settings.yaml'}:5:")


def test_empty_file(tmp_path):
    assert "empty" in single_error(tmp_path, "# nothing here\n")


def test_top_level_not_a_mapping(tmp_path):
    assert "top level must be a mapping" in single_error(tmp_path, "- airflow\n")


def test_missing_airflow_key(tmp_path):
    errors = errors_for(tmp_path, "connections: []\n")
    assert any("missing the 'airflow:' key" in e for e in errors)
    assert any("unknown key 'connections'" in e for e in errors)


def test_unknown_section_is_a_typo(tmp_path):
    msg = single_error(tmp_path, "airflow:\n  variabels: []\n")
    assert "unknown key 'variabels'" in msg and "did you mean 'variables'" in msg


def test_section_not_a_list(tmp_path):
    msg = single_error(tmp_path, """
        airflow:
          pools:
            pool_name: spark
            pool_slot: 1
    """)
    assert "airflow.pools: must be a list" in msg and "got a mapping" in msg


def test_entry_not_a_mapping(tmp_path):
    msg = single_error(tmp_path, """
        airflow:
          connections:
            - conn_id: a
              conn_type: http
            - just_a_string
    """)
    assert ":5: connections[1]: must be a mapping" in msg and "got str" in msg


def test_duplicate_yaml_key_in_entry(tmp_path):
    msg = single_error(tmp_path, """
        airflow:
          pools:
            - pool_name: p
              pool_slot: 1
              pool_slot: 2
    """)
    assert ":5: duplicate key 'pool_slot'" in msg


# --------------------------------------------------------------------------------------------------
# Entry-level problems: each names the entry and the field
# --------------------------------------------------------------------------------------------------

CONN_OK = """
    airflow:
      connections:
        - conn_id: kafka_default
          conn_type: kafka
        - conn_id: spark_default
          conn_type: spark
"""


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        pytest.param(
            "- conn_id: mlflow_default\n  conn_type: mlflow\n  conn_port: abc\n",
            "connections[2] (conn_id='mlflow_default'): conn_port: must be an integer (a TCP port, 1-65535), got 'abc'",
            id="port-not-int",
        ),
        pytest.param(
            "- conn_id: mlflow_default\n  conn_type: mlflow\n  conn_port: 70000\n",
            "connections[2] (conn_id='mlflow_default'): conn_port: must be an integer (a TCP port, 1-65535), got 70000",
            id="port-out-of-range",
        ),
        pytest.param(
            "- conn_id: mlflow_default\n  conn_type: mlflow\n  conn_port: true\n",
            "connections[2] (conn_id='mlflow_default'): conn_port: must be an integer",
            id="port-bool",
        ),
        pytest.param(
            "- conn_type: mlflow\n",
            "connections[2]: conn_id: required field is missing",
            id="missing-conn-id",
        ),
        pytest.param(
            "- conn_id: mlflow_default\n  conn_host: 127.0.0.1\n",
            "connections[2] (conn_id='mlflow_default'): conn_type: required field is missing",
            id="missing-conn-type",
        ),
        pytest.param(
            "- conn_id: mlflow_default\n  conn_type: ''\n",
            "connections[2] (conn_id='mlflow_default'): conn_type: must not be empty",
            id="empty-conn-type",
        ),
        pytest.param(
            "- conn_id: 'bad id <script>'\n  conn_type: http\n",
            "connections[2] (conn_id='bad id <script>'): conn_id: 'bad id <script>' may only contain",
            id="conn-id-charset",
        ),
        pytest.param(
            "- conn_id: mlflow_default\n  conn_type: mlflow\n  conn_password: 1234\n",
            "connections[2] (conn_id='mlflow_default'): conn_password: must be a string, got 1234 (int)",
            id="password-not-string",
        ),
        pytest.param(
            "- conn_id: mlflow_default\n  conn_type: mlflow\n  conn_extra: [a, b]\n",
            "connections[2] (conn_id='mlflow_default'): conn_extra: must be a mapping or a JSON-object string, got a list",
            id="extra-list",
        ),
        pytest.param(
            "- conn_id: mlflow_default\n  conn_type: mlflow\n  conn_extra: '{not json'\n",
            "connections[2] (conn_id='mlflow_default'): conn_extra: is a string but not valid JSON",
            id="extra-bad-json",
        ),
        pytest.param(
            "- conn_id: mlflow_default\n  conn_type: mlflow\n  conn_extra: '[1, 2]'\n",
            "connections[2] (conn_id='mlflow_default'): conn_extra: a JSON string must hold a JSON object, got a list",
            id="extra-json-not-object",
        ),
        pytest.param(
            "- conn_id: mlflow_default\n  conn_type: mlflow\n  conn_extra: {when: 2024-01-01}\n",
            "connections[2] (conn_id='mlflow_default'): conn_extra: must be JSON-serialisable",
            id="extra-not-json-serialisable",
        ),
        pytest.param(
            "- conn_id: mlflow_default\n  conn_type: mlflow\n  conn_hots: 127.0.0.1\n",
            "connections[2] (conn_id='mlflow_default'): conn_hots: unknown field (did you mean 'conn_host'? "
            "allowed: conn_id, conn_type, conn_host, conn_schema, conn_login, conn_password, conn_port, conn_uri, "
            "conn_extra)",
            id="unknown-field",
        ),
        pytest.param(
            "- conn_id: mlflow_default\n  conn_uri: 'http://127.0.0.1:5000'\n  conn_port: 5000\n",
            "connections[2] (conn_id='mlflow_default'): conn_uri: cannot be combined with conn_port",
            id="uri-and-fields",
        ),
        pytest.param(
            "- conn_id: kafka_default\n  conn_type: kafka\n",
            "connections[2] (conn_id='kafka_default'): conn_id: duplicate of connections[0]",
            id="duplicate-conn-id",
        ),
    ],
)
def test_connection_errors_name_entry_and_field(tmp_path, entry, expected):
    text = textwrap.dedent(CONN_OK).lstrip("\n") + textwrap.indent(entry, "    ")
    msg = single_error(tmp_path, text)
    assert expected in msg, msg


def test_error_points_at_the_fields_line(tmp_path):
    text = textwrap.dedent(CONN_OK).lstrip("\n") + textwrap.indent(
        "- conn_id: mlflow_default\n  conn_type: mlflow\n  conn_port: abc\n", "    "
    )
    msg = single_error(tmp_path, text)
    assert msg == (
        f"{tmp_path / 'airflow_settings.yaml'}:9: connections[2] (conn_id='mlflow_default'): "
        "conn_port: must be an integer (a TCP port, 1-65535), got 'abc'"
    )


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("- pool_slot: 1\n", "pools[1]: pool_name: required field is missing"),
        ("- pool_name: ray\n", "pools[1] (pool_name='ray'): pool_slot: required field is missing"),
        ("- pool_name: ray\n  pool_slot: -1\n", "pools[1] (pool_name='ray'): pool_slot: must be a non-negative integer, got -1"),
        ("- pool_name: ray\n  pool_slot: two\n", "pools[1] (pool_name='ray'): pool_slot: must be a non-negative integer, got 'two'"),
        ("- pool_name: ray\n  pool_slot: 1.5\n", "pools[1] (pool_name='ray'): pool_slot: must be a non-negative integer, got 1.5"),
        ("- pool_name: ray\n  pool_slots: 2\n", "pools[1] (pool_name='ray'): pool_slots: unknown field (did you mean 'pool_slot'?"),
        ("- pool_name: ray\n  pool_slot: 2\n  pool_description: 7\n", "pools[1] (pool_name='ray'): pool_description: must be a string"),
        ("- pool_name: spark\n  pool_slot: 2\n", "pools[1] (pool_name='spark'): pool_name: duplicate of pools[0]"),
    ],
)
def test_pool_errors_name_entry_and_field(tmp_path, entry, expected):
    text = "airflow:\n  pools:\n    - pool_name: spark\n      pool_slot: 1\n" + textwrap.indent(entry, "    ")
    errors = errors_for(tmp_path, text)  # a misspelled pool_slot also leaves pool_slot missing: 2 errors
    assert any(expected in e for e in errors), errors
    assert all("pools[1]" in e for e in errors), errors


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("- variable_value: x\n", "variables[1]: variable_name: required field is missing"),
        ("- variable_name: 12\n  variable_value: x\n", "variables[1]: variable_name: must be a string, got 12 (int)"),
        ("- variable_name: b\n  value: x\n", "variables[1] (variable_name='b'): value: unknown field (did you mean 'variable_value'?"),
        ("- variable_name: b\n  variable_value: 2024-01-01\n", "variables[1] (variable_name='b'): variable_value: must be JSON-serialisable"),
        ("- variable_name: a\n  variable_value: y\n", "variables[1] (variable_name='a'): variable_name: duplicate of variables[0]"),
    ],
)
def test_variable_errors_name_entry_and_field(tmp_path, entry, expected):
    text = "airflow:\n  variables:\n    - variable_name: a\n      variable_value: x\n" + textwrap.indent(entry, "    ")
    errors = errors_for(tmp_path, text)
    assert any(expected in e for e in errors), errors
    assert all("variables[1]" in e for e in errors), errors


def test_all_errors_reported_together_in_file_order(tmp_path):
    errors = errors_for(tmp_path, """
        airflow:
          connections:
            - conn_id: mlflow_default
              conn_type: mlflow
              conn_port: abc
              conn_hots: x
            - conn_type: http
          pools:
            - pool_name: spark
              pool_slot: -2
          variables:
            - variable_value: 1
          varibles: []
    """)
    assert len(errors) == 6, errors
    expected_fragments = [
        ":5: connections[0] (conn_id='mlflow_default'): conn_port:",
        ":6: connections[0] (conn_id='mlflow_default'): conn_hots: unknown field",
        ":7: connections[1]: conn_id: required field is missing",
        ":10: pools[0] (pool_name='spark'): pool_slot:",
        ":12: variables[0]: variable_name: required field is missing",
        ":13: airflow: unknown key 'varibles'",
    ]
    for line, fragment in zip(errors, expected_fragments, strict=True):
        assert fragment in line, (fragment, line)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def test_cli_validate_ok(capsys):
    assert main(["validate", "--file", str(REAL_FILE)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "9 connections, 2 pools, 1 variable" in out


def test_cli_validate_default_file(monkeypatch, tmp_path, capsys):
    write(tmp_path, "airflow:\n  pools:\n    - pool_name: p\n      pool_slot: 1\n")
    monkeypatch.setenv("DECISIONFLOW_HOME", str(tmp_path))
    assert main(["validate"]) == 0
    assert "1 pool" in capsys.readouterr().out


def test_cli_bad_file_exits_nonzero_with_message(tmp_path, capsys):
    path = write(tmp_path, "airflow:\n  connections:\n    - conn_id: a\n      conn_type: http\n      conn_port: abc\n")
    assert main(["validate", "--file", str(path)]) == 1
    err = capsys.readouterr().err
    assert "1 problem" in err
    assert "connections[0] (conn_id='a'): conn_port: must be an integer" in err


def test_cli_load_bad_file_fails_before_touching_airflow(tmp_path, capsys):
    assert main(["load", "--file", str(tmp_path / "missing.yaml")]) == 1
    assert "file not found" in capsys.readouterr().err


def test_cli_usage_error_returns_2(capsys):
    assert main(["frobnicate"]) == 2
    assert main([]) == 2
