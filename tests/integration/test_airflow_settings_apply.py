"""Apply the real airflow_settings.yaml to a throwaway Airflow metadata DB (SQLite), twice, then once changed.

Airflow reads its configuration (AIRFLOW_HOME, the DB URL) when ``airflow`` is first imported, so
everything that touches the DB runs in subprocesses with their own environment; this test process
never imports Airflow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from decisionflow.config import project_home
from decisionflow.settings.airflow_settings import load_settings

pytestmark = pytest.mark.integration

REAL_FILE = project_home() / "airflow_settings.yaml"
VENV_BIN = Path(sys.executable).parent


def _airflow_env(home: Path) -> dict[str, str]:
    # Drop any ambient Airflow configuration (a developer's AIRFLOW_HOME, AIRFLOW_CONN_* secrets, a
    # Postgres URL...) so the subprocesses only ever see the throwaway DB.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__FERNET_KEY="",
        PYTHONWARNINGS="ignore",
    )
    return env


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("airflow_home")
    env = _airflow_env(home)
    _run([str(VENV_BIN / "airflow"), "db", "migrate"], env, timeout=180)
    return env


# Runs in the subprocess: apply the real file, re-apply it, then apply a copy with one value changed,
# reporting the counts and what the DB holds after each step as one JSON document on the last line.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    from airflow.models import Connection, Pool, Variable
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from decisionflow.settings.airflow_settings import apply_settings, load_settings

    real, changed = Path(sys.argv[1]), Path(sys.argv[2])

    def snapshot():
        with create_session() as session:
            return {
                "connections": {
                    c.conn_id: {
                        "conn_type": c.conn_type, "host": c.host, "schema": c.schema, "login": c.login,
                        "password": c.password, "port": c.port, "extra": c.extra_dejson,
                    }
                    for c in session.scalars(select(Connection))
                },
                "pools": {p.pool: {"slots": p.slots, "description": p.description}
                          for p in session.scalars(select(Pool))},
                "variables": {v.key: v.val for v in session.scalars(select(Variable))},
            }

    out = {}
    out["first"] = apply_settings(load_settings(real))
    out["after_first"] = snapshot()
    out["second"] = apply_settings(load_settings(real))
    changes = []
    out["changed"] = apply_settings(load_settings(changed), on_change=lambda *c: changes.append(list(c)))
    out["changes"] = changes
    out["after_changed"] = snapshot()
    # Explicit session: flushed, not committed, by apply_settings; the caller owns the transaction.
    with create_session() as session:
        out["with_session"] = apply_settings(load_settings(changed), session=session)
    print(json.dumps(out))
    """
)


def test_apply_real_settings_is_idempotent(airflow_env, tmp_path):
    expected = load_settings(REAL_FILE)
    changed_file = tmp_path / "airflow_settings.yaml"
    text = REAL_FILE.read_text()
    assert text.count("conn_port: 5000") == 1
    changed_file.write_text(text.replace("conn_port: 5000", "conn_port: 5001"))
    script = tmp_path / "apply.py"
    script.write_text(SCRIPT)

    proc = _run([sys.executable, str(script), str(REAL_FILE), str(changed_file)], airflow_env, timeout=120)
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    n_conn, n_pool, n_var = len(expected.connections), len(expected.pools), len(expected.variables)
    assert out["first"] == {
        "connections": {"created": n_conn, "updated": 0, "unchanged": 0},
        "pools": {"created": n_pool, "updated": 0, "unchanged": 0},
        "variables": {"created": n_var, "updated": 0, "unchanged": 0},
    }

    db = out["after_first"]
    for spec in expected.connections:
        row = db["connections"][spec.conn_id]
        assert row["conn_type"] == spec.conn_type
        assert row["host"] == spec.host
        assert row["schema"] == spec.schema
        assert row["port"] == spec.port
        assert row["extra"] == (spec.extra or {})
    assert db["connections"]["kafka_default"]["extra"]["bootstrap.servers"] == "127.0.0.1:9092"
    assert db["connections"]["mlflow_default"]["port"] == 5000
    assert db["pools"]["spark"] == {"slots": 1, "description": expected.pool("spark").description}
    assert db["pools"]["ray"]["slots"] == 2
    assert "default_pool" in db["pools"]  # created by `db migrate`, untouched by us
    assert db["variables"]["decisionflow_environment"] == "local"

    assert out["second"] == {
        "connections": {"created": 0, "updated": 0, "unchanged": n_conn},
        "pools": {"created": 0, "updated": 0, "unchanged": n_pool},
        "variables": {"created": 0, "updated": 0, "unchanged": n_var},
    }

    assert out["changed"] == {
        "connections": {"created": 0, "updated": 1, "unchanged": n_conn - 1},
        "pools": {"created": 0, "updated": 0, "unchanged": n_pool},
        "variables": {"created": 0, "updated": 0, "unchanged": n_var},
    }
    assert out["changes"] == [["connection", "updated", "mlflow_default"]]
    assert out["after_changed"]["connections"]["mlflow_default"]["port"] == 5001
    before = {k: v for k, v in db["connections"].items() if k != "mlflow_default"}
    after = {k: v for k, v in out["after_changed"]["connections"].items() if k != "mlflow_default"}
    assert before == after

    assert out["with_session"]["connections"] == {"created": 0, "updated": 0, "unchanged": n_conn}


def test_cli_load_against_migrated_db(airflow_env):
    # Same DB as the test above (module-scoped fixture), so what the CLI finds there depends on whether
    # that test ran; idempotency is proven above. Here: exit 0 and a complete per-kind summary.
    expected = load_settings(REAL_FILE)
    cmd = [sys.executable, "-m", "decisionflow.settings.airflow_settings", "load", "--file", str(REAL_FILE)]
    proc = _run(cmd, airflow_env, timeout=120)
    totals = {}
    for line in proc.stdout.splitlines():
        m = re.fullmatch(r"(connections|pools|variables): (\d+) created, (\d+) updated, (\d+) unchanged", line)
        if m:
            totals[m.group(1)] = sum(int(g) for g in m.groups()[1:])
    assert totals == {
        "connections": len(expected.connections),
        "pools": len(expected.pools),
        "variables": len(expected.variables),
    }, proc.stdout
