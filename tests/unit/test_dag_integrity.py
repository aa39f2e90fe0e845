"""Every DAG imports cleanly, is documented and tagged, retries, and parses fast."""

from __future__ import annotations

from pathlib import Path

import pytest

DAGS_DIR = Path(__file__).resolve().parents[2] / "dags"
DAG_FILES = sorted(p for p in DAGS_DIR.glob("*.py") if not p.name.startswith("_"))
MAX_PARSE_SECONDS = 0.5


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_DIR))


def test_there_are_dags():
    assert DAG_FILES, f"no DAG files in {DAGS_DIR}"


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}, "\n".join(f"{k}: {v}" for k, v in dagbag.import_errors.items())


def test_every_file_defines_a_dag(dagbag):
    files_with_dags = {Path(dag.fileloc).name for dag in dagbag.dags.values()}
    assert files_with_dags == {p.name for p in DAG_FILES}


def test_dags_have_tags_docs_and_retries(dagbag):
    problems = []
    for dag_id, dag in dagbag.dags.items():
        if not dag.tags:
            problems.append(f"{dag_id}: no tags")
        if not (dag.doc_md or "").strip():
            problems.append(f"{dag_id}: no doc_md")
        for task in dag.tasks:
            if (task.retries or 0) < 2:
                problems.append(f"{dag_id}.{task.task_id}: retries={task.retries} < 2")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.name)
def test_each_file_parses_fast(dag_file, dagbag):
    """Parse time as the dag-processor sees it (Airflow already imported), measured per file."""
    from airflow.dag_processing.dagbag import DagBag

    DagBag(dag_folder=str(dag_file))  # warm the shared imports once
    bag = DagBag(dag_folder=str(dag_file))
    (stat,) = bag.dagbag_stats  # one file, one stat
    seconds = stat.duration.total_seconds() if hasattr(stat.duration, "total_seconds") else float(stat.duration)
    assert seconds < MAX_PARSE_SECONDS, f"{dag_file.name} took {seconds:.3f}s to parse"
