"""Benchmark: the build_lakehouse Spark jobs (migrate, silver, gold) with the old settings against the current ones.

Both sides run on fresh copies of the same bronze (the seeded generator's events written as the integration
tests do, or ``--bronze DIR``, copied, never written), each stage a ``spark-submit`` exactly as the
``build_lakehouse`` DAG's operators build it (``spark_conf``, ``local[*]``, the connector jars):

* **old**: whole-stage and expression code generation, no class-data-sharing archive
  (``--conf spark.sql.codegen...`` as Spark's defaults, ``DECISIONFLOW_SPARK_CDS=0``);
* **new**: what ships - interpreted expressions around the silver and gold stages
  (``decisionflow.spark.conf.SMALL_BATCH_SQL_CONF``) and the driver's AppCDS archive
  (``cds_java_options``; a warm-up ``spark-submit --version`` run creates it in the bench's own data dir first,
  as the first job of a fresh data dir would).

Per stage: wall seconds, CPU seconds of the whole process tree (the fairer number on a busy machine) and the
silver per-batch timings the job logs; then old/new ratios. The tables of both sides are compared (timestamps of
the load left out) and must be identical. Speed targets live here, never in timed tests.

    .venv/bin/python bench/lakehouse_build.py [--events 3000] [--bronze DIR] [--rounds 1] [--json out.json]

Measured here (2 cores, machine at load ~2, the system-test lake's bronze: 3,037 transactions, 226 labels,
251 notes), old -> new: migrate 20.1 -> 18.3 s wall (23.0 -> 21.4 s CPU), silver 95.7 -> 93.6 s wall
(123.1 -> 95.5 s CPU, x1.29), gold 73.8 -> 69.3 s wall (99.3 -> 68.0 s CPU, x1.46); tables identical; the
one-off archive dump made the warm-up migrate job take 48.9 s. On an idle machine the wall time barely moves
(the driver's serial planning dominates); under the system test's load the CPU saved is what the jobs wait for
(silver 441 -> 374 s, gold 440 -> 383 s wall with three jobs at once).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "include" / "decisionflow" / "jobs"
TABLES = ("silver/transactions", "silver/labels", "silver/case_notes", "quarantine/transactions",
          "quarantine/labels", "quarantine/case_notes", "gold/account_features", "gold/merchant_features",
          "gold/transactions_enriched")
LOAD_TIMES = {"silver_loaded_at", "quarantined_at", "quarantine_date", "updated_at"}
#: Spark's own defaults for what SMALL_BATCH_SQL_CONF changes: the "old" side.
CODEGEN = {"spark.sql.codegen.wholeStage": "true", "spark.sql.codegen.factoryMode": "FALLBACK"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/lakehouse_build.py", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=3000, help="generated events (default %(default)s)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bronze", type=Path, help="copy this lake's bronze/ instead of generating one")
    parser.add_argument("--rounds", type=int, default=1, help="old/new pairs, run alternately (default 1)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary lakes")
    return parser.parse_args(argv)


def generate_bronze(lake: Path, events: int, seed: int, data: Path) -> None:
    """The seeded generator's messages as bronze, written as the integration tests' lake builder does."""
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from lake_builder import bronze_rows, write_bronze

    from decisionflow.risk.generator import EventGenerator, GeneratorConfig
    from decisionflow.spark.conf import local_spark_session

    os.environ["DECISIONFLOW_DATA"] = str(data)
    messages = list(EventGenerator(GeneratorConfig(events=events, seed=seed, bad_share=0.05)))
    spark = local_spark_session("bench-bronze", conf={"spark.sql.warehouse.dir": str(data / "wh")})
    try:
        write_bronze(spark, str(lake), bronze_rows(messages)[0])
    finally:
        spark.stop()


def submit(app: Path, args: list[str], lake: Path, conf: dict[str, str], env_extra: dict[str, str]) -> dict:
    from decisionflow.spark.conf import connector_jars, spark_conf, spark_env, spark_submit_binary

    env = {**os.environ, **env_extra}
    saved = {k: os.environ.get(k) for k in env_extra}
    os.environ.update(env_extra)  # spark_conf reads DECISIONFLOW_DATA / DECISIONFLOW_SPARK_CDS
    try:
        props = spark_conf(conf)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    argv = [str(spark_submit_binary()), "--master", "local[*]"]
    for key, value in props.items():
        argv += ["--conf", f"{key}={value}"]
    argv += ["--jars", ",".join(str(j) for j in connector_jars()), "--driver-memory", "1g", "--name", app.stem,
             str(app), "--lake-root", str(lake), *args]
    env.update(spark_env(lake))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    summary = next((json.loads(line) for line in done.stdout.splitlines()[::-1] if line.startswith("{")), {})
    if done.returncode != 0 or not summary.get("ok"):
        raise RuntimeError(f"{app.name} {args} failed ({done.returncode}): {summary.get('error')}\n{done.stderr[-3000:]}")
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "job_s": summary.get("total_s"),
            "session_s": summary.get("session_s"), "batches": batch_timings(done.stdout + done.stderr)}


def batch_timings(output: str) -> list[str]:
    """The silver job's per-batch ``timings`` (its INFO lines reach spark-submit's stdout)."""
    return [line.split("silver: ", 1)[-1].split(": {")[0] + " " + line.split("'timings': ")[-1].strip()[:-1]
            for line in output.splitlines() if " batch " in line and "'timings'" in line]


def run_side(name: str, bronze: Path, work: Path, data: Path, new: bool) -> dict:
    lake = work / name
    shutil.rmtree(lake, ignore_errors=True)
    shutil.copytree(bronze / "bronze", lake / "bronze")
    env = {"DECISIONFLOW_DATA": str(data), "DECISIONFLOW_SPARK_CDS": "1" if new else "0"}
    conf = {} if new else dict(CODEGEN)
    out = {}
    out["migrate"] = submit(JOBS / "migrate_lakehouse.py", [], lake, conf, env)
    for stage in ("silver", "gold"):
        args = ["--stage", stage, "--no-migrate"]
        # the old side sets Spark's codegen defaults explicitly: an explicit session setting wins over the stages'
        out[stage] = submit(JOBS / "build_lakehouse.py", args, lake, conf, env)
    out["lake"] = str(lake)
    return out


def tables_equal(a: str, b: str) -> dict[str, bool]:
    from deltalake import DeltaTable

    def norm(path):
        df = DeltaTable(path).to_pandas()
        cols = sorted(c for c in df.columns if c not in LOAD_TIMES)
        df = df[cols].map(lambda v: repr(list(v)) if hasattr(v, "__len__") and not isinstance(v, (str, bytes)) else repr(v))
        return df.sort_values(cols).reset_index(drop=True)

    return {t: norm(f"{a}/{t}").equals(norm(f"{b}/{t}")) for t in TABLES}


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-lakehouse-"))
    data = work / "data"
    data.mkdir()
    os.environ.setdefault("DECISIONFLOW_JARS", str(ROOT / ".data" / "jars"))
    try:
        bronze = work / "src"
        if args.bronze:
            shutil.copytree(args.bronze / "bronze", bronze / "bronze")
        else:
            generate_bronze(bronze, args.events, args.seed, data)
        # warm-up: the first driver of a data dir writes the CDS archive (a one-off cost, reported), the next
        # one puts it in place
        from decisionflow.spark.conf import cds_java_options

        os.environ["DECISIONFLOW_DATA"] = str(data)
        started = time.monotonic()
        dump = cds_java_options()
        warm = {"cds_archive_s": None}
        if "ArchiveClassesAtExit" in dump:
            lake = work / "warmup"
            shutil.copytree(bronze / "bronze", lake / "bronze")
            warm = {"cds_archive_s": submit(JOBS / "migrate_lakehouse.py", [], lake, {}, {"DECISIONFLOW_DATA": str(data)})["wall_s"]}
        warm["archive"] = "SharedArchiveFile" in cds_java_options()
        warm["warmup_s"] = round(time.monotonic() - started, 1)
        print(json.dumps({"warmup": warm}), flush=True)

        results = []
        for i in range(args.rounds):
            for name, new in (("old", False), ("new", True)):
                side = run_side(f"{name}{i}", bronze, work, data, new)
                results.append((name, side))
                print(json.dumps({name: {k: v for k, v in side.items() if k != "lake"}}), flush=True)
        report = {"warmup": warm, "stages": {}}
        for stage in ("migrate", "silver", "gold"):
            row = {}
            for name in ("old", "new"):
                sides = [s[stage] for n, s in results if n == name]
                row[name] = {"wall_s": round(sum(s["wall_s"] for s in sides) / len(sides), 1),
                             "cpu_s": round(sum(s["cpu_s"] for s in sides) / len(sides), 1)}
            row["wall_ratio"] = round(row["old"]["wall_s"] / row["new"]["wall_s"], 2)
            row["cpu_ratio"] = round(row["old"]["cpu_s"] / row["new"]["cpu_s"], 2)
            report["stages"][stage] = row
        old_lake = next(s["lake"] for n, s in results if n == "old")
        new_lake = next(s["lake"] for n, s in results if n == "new")
        report["identical_tables"] = tables_equal(old_lake, new_lake)
        for stage, row in report["stages"].items():
            print(f"{stage:8s} old {row['old']['wall_s']:7.1f}s wall {row['old']['cpu_s']:7.1f}s cpu | "
                  f"new {row['new']['wall_s']:7.1f}s wall {row['new']['cpu_s']:7.1f}s cpu | "
                  f"old/new wall x{row['wall_ratio']}, cpu x{row['cpu_ratio']}")
        print("tables identical:", all(report["identical_tables"].values()), report["identical_tables"])
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0 if all(report["identical_tables"].values()) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
