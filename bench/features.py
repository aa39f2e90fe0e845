"""Benchmark: online feature reads (Feast ``get_online_features``) of the ``risk_v1`` service vs. its plain views.

In one run, against a private lake, registries and online stores (temporary directories, removed at the end),
for each online store of ``--online-store`` -- SQLite (the default store) and Redis (a private ``redis-server``
on a free loopback port, started and stopped by this run; ``make system-deps`` installs it), measured side by
side:

1. write realistic gold rows with ``deltalake`` (no Spark): ``gold/account_features`` (N accounts, a few
   transactions each over the last 3 days: windowed counts/sums, distinct devices/countries, NULL
   ``seconds_since_prev_txn`` for a first transaction) and ``gold/merchant_features`` (the same transactions
   over M merchants, skewed; NULL fraud rate while no label is known), typed as ``lakehouse/tables.py``
   declares them;
2. apply the project's feature repo with ``FeastHook`` -- connections ``feast_default`` / ``lake_default`` come
   from ``AIRFLOW_CONN_*`` JSON environment variables (what a user sets; Airflow resolves them before the
   metastore, and ``AIRFLOW_HOME`` is a throwaway dir so no real Airflow DB is touched) -- into a file registry
   per store and that online store (only the connection differs: ``online_store: {type: sqlite, path: ...}``
   or ``{type: redis, connection_string: 127.0.0.1:PORT}``), and materialize both views into it;
3. check once that the online values of sampled entities equal the latest gold row of each (read back from
   Delta, independently of Feast), on-demand features included, so the timings cannot be of empty reads;
4. time ``store.get_online_features(...).to_dict()`` (what a caller needs to use the values) after a warm-up,
   for 1 and 100 entities per request, for (a) the feature service ``risk_v1`` (account + merchant views + the
   on-demand view ``transaction_context``, request field ``amount``; the ``FeatureService`` object is fetched
   once, as a serving process would) and (b) the two plain views by feature reference (no on-demand transform).
   (c) the same service through ``decisionflow.features.online.OnlineFeatureReader`` (one ``online_read`` per view
   for the batch, Feast's values without Feast's response building; checked equal to (a)'s dict first).
   The cases and the online stores are interleaved in blocks (the same requests for every store), so a
   change in machine load hits all alike.

Goal (issue): p99 <= 5 ms for 1 entity and <= 20 ms for 100 entities. Exit code 0 even on MISS (a benchmark,
not a test) unless ``--check``. ``make bench`` runs it with the defaults (both stores under 3 minutes on 2 cores);
``python bench/features.py --help`` lists the knobs. ``--profile`` adds a cProfile of one request per case.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from decisionflow import config
from decisionflow.lakehouse import tables

SERVICE = "risk_v1"
VIEWS = ("account_features", "merchant_features")
ODFV = "transaction_context"
#: entities per request -> p99 goal in ms
GOALS = {1: 5.0, 100: 20.0}
CASES = (("(a) risk_v1 service (+ on-demand)", "service"), ("(b) the 2 plain views ({n} features)", "views"),
         ("(c) risk_v1 via OnlineFeatureReader", "reader"))
DAY_US = 86_400_000_000
HOUR_US = 3_600_000_000
STORES = ("sqlite", "redis")
WIDTH = 125
REDIS_HOST = "127.0.0.1"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/features.py", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--accounts", type=int, default=20_000, help="accounts in gold (default %(default)s)")
    parser.add_argument("--merchants", type=int, default=2_000, help="merchants in gold (default %(default)s)")
    parser.add_argument("--txns-per-account", type=float, default=4.0,
                        help="mean transactions per account (1 + Poisson; default %(default)s)")
    parser.add_argument("--requests", type=int, default=300,
                        help="timed requests per case and entity count (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests per case first (default %(default)s)")
    parser.add_argument("--entities", type=int, nargs="+", default=sorted(GOALS), metavar="N",
                        help="entities per request (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile one request per case and entity count (top functions, to stderr)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary lake, registry and online store")
    parser.add_argument("--online-store", choices=(*STORES, "both"), default=None,
                        help="online store(s) to measure (default: both when redis-server is on PATH, else sqlite)")
    args = parser.parse_args(argv)
    args.store_note = ""
    if args.online_store is None:
        if shutil.which("redis-server"):
            args.online_store = "both"
        else:
            args.online_store = "sqlite"
            args.store_note = "redis-server is not on PATH: measuring sqlite only (`make system-deps` installs it)"
    elif args.online_store != "sqlite" and not shutil.which("redis-server"):
        parser.error(f"--online-store {args.online_store} needs redis-server on PATH: run `make system-deps`")
    args.stores = list(STORES) if args.online_store == "both" else [args.online_store]
    if min(args.accounts, args.merchants, args.requests) < 1 or args.warmup < 0:
        parser.error("--accounts, --merchants and --requests must be >= 1, --warmup >= 0")
    if max(args.entities) > args.accounts:
        parser.error("--entities cannot exceed --accounts")
    return args


# -- environment ----------------------------------------------------------------------------------------------
def isolate_airflow(work: Path, lake: Path) -> None:
    """Throwaway ``AIRFLOW_HOME`` and the lake connection as ``AIRFLOW_CONN_*`` JSON. Before importing airflow."""
    home = work / "airflow"
    home.mkdir()
    os.environ.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_LAKE_DEFAULT": json.dumps({"conn_type": "delta_lake", "extra": {"root": str(lake)}}),
    })


def use_online_store(work: Path, store: str, redis_address: str | None) -> dict:
    """Point ``feast_default`` (``AIRFLOW_CONN_FEAST_DEFAULT``) at ``store``, with a registry of its own.

    Only the connection changes between the stores -- what a user edits to switch to Redis.
    """
    online = ({"type": "sqlite", "path": str(work / "sqlite" / "online.db")} if store == "sqlite"
              else {"type": "redis", "connection_string": redis_address})
    feast_extra = {
        "repo_path": str(config.project_home() / "include" / "feature_repo"),
        "project": "decisionflow",
        "registry": str(work / store / "registry.db"),
        "online_store": online,
    }
    os.environ["AIRFLOW_CONN_FEAST_DEFAULT"] = json.dumps({"conn_type": "feast", "extra": feast_extra})
    return feast_extra


# -- redis ------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((REDIS_HOST, 0))
        return sock.getsockname()[1]


def start_redis(root: Path, timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    """A private ``redis-server`` (no persistence, loopback, free port) in its own session; (process, host:port).

    Same flags as ``tests/integration/fixtures_redis.py``. Stopped with :func:`stop_redis` (by its PID).
    """
    import redis

    root.mkdir(parents=True)
    port = _free_port()
    argv = [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", REDIS_HOST,
            "--save", "", "--appendonly", "no", "--dir", str(root), "--daemonize", "no", "--protected-mode", "yes"]
    log = root / "redis.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            error = f"redis-server exited with {process.returncode} during start-up"
        else:
            try:
                if redis.Redis(host=REDIS_HOST, port=port, socket_timeout=1, socket_connect_timeout=1).ping():
                    return process, f"{REDIS_HOST}:{port}"
            except (redis.exceptions.RedisError, OSError):
                pass
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            error = f"redis-server not answering PING after {timeout:.0f}s"
        stop_redis(process)
        raise RuntimeError(f"{error}:\n{log.read_text(errors='replace')[-3000:]}")


def stop_redis(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the server this run started (by its PID), SIGKILL it after ``grace`` seconds."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# -- gold data ------------------------------------------------------------------------------------------------
def _arrow_schema(name: str):
    import pyarrow as pa

    types = {"string": pa.string(), "bigint": pa.int64(), "int": pa.int32(), "double": pa.float64(),
             "timestamp": pa.timestamp("us", tz="UTC")}
    return pa.schema([pa.field(c.name, types[tables.normalize_type(c.type)], nullable=c.nullable)
                      for c in tables.table(name).columns])


def _window_counts(group, t_us, values, window_us):
    """Per row: (rows, sum of values) of the same group in (t - window, t], rows sorted by (group, t)."""
    import numpy as np

    key = group.astype(np.int64) * (t_us.max() - t_us.min() + 2 * window_us + 1) + (t_us - t_us.min())
    first = np.searchsorted(key, key - window_us, side="right")
    idx = np.arange(len(key))
    csum = np.concatenate([[0.0], np.cumsum(values)])
    return idx - first + 1, csum[idx + 1] - csum[first]


def _window_distinct(group, t_us, bits, window_us, max_lag):
    """Per row: distinct bit values (popcount of the OR) of the same group in (t - window, t]."""
    import numpy as np

    acc = bits.copy()
    for lag in range(1, max_lag + 1):
        prev = np.arange(len(bits)) - lag
        ok = prev >= 0
        ok[ok] &= (group[prev[ok]] == group[ok]) & (t_us[ok] - t_us[prev[ok]] < window_us)
        acc[ok] |= bits[prev[ok]]
    return np.array([bin(int(x)).count("1") for x in acc], dtype=np.int32)


def gold_tables(args, now: datetime):
    """(account table, merchant table) as pyarrow tables with the declared gold schemas."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(args.seed)
    n_acc, n_mer = args.accounts, args.merchants
    per_account = 1 + rng.poisson(max(args.txns_per_account - 1, 0), n_acc)
    account = np.repeat(np.arange(n_acc), per_account)
    n = len(account)
    now_us = int(now.timestamp() * 1_000_000)
    t_us = now_us - rng.integers(60_000_000, 3 * DAY_US, n)  # the last 3 days, none in the last minute
    order = np.lexsort((t_us, account))
    account, t_us = account[order], t_us[order]
    amount = np.round(rng.lognormal(3.5, 1.0, n), 2)
    # each account uses 1-3 devices and mostly one country
    n_dev = rng.integers(1, 4, n_acc)
    device_bit = 1 << (rng.integers(0, 1 << 16, n) % n_dev[account])
    country_bit = np.where(rng.random(n) < 0.9, 1, 2)
    event_id = np.array([f"e{i:09d}" for i in range(n)], dtype=object)
    updated = t_us + rng.integers(1_000_000, 300_000_000, n)  # gold batch latency

    cols = {"event_id": event_id, "account_id": np.array([f"acct-{a:06d}" for a in account], dtype=object),
            "event_time": t_us}
    for label, window in (("1h", HOUR_US), ("24h", DAY_US), ("7d", 7 * DAY_US)):
        count, total = _window_counts(account, t_us, amount, window)
        cols[f"txn_count_{label}"], cols[f"amount_sum_{label}"] = count.astype(np.int64), np.round(total, 2)
    max_lag = int(per_account.max())
    for label, window in (("24h", DAY_US), ("7d", 7 * DAY_US)):
        cols[f"distinct_devices_{label}"] = _window_distinct(account, t_us, device_bit, window, max_lag)
        cols[f"distinct_countries_{label}"] = _window_distinct(account, t_us, country_bit, window, max_lag)
    first = np.r_[True, account[1:] != account[:-1]]
    cols["seconds_since_prev_txn"] = np.where(first, np.nan, np.diff(t_us, prepend=t_us[0]) / 1e6)
    cols["amount_to_avg_7d"] = amount / (cols["amount_sum_7d"] / cols["txn_count_7d"])
    cols["updated_at"] = updated

    # the same transactions over merchants (Zipf-like popularity)
    weights = 1.0 / np.arange(1, n_mer + 1) ** 0.8
    merchant = rng.choice(n_mer, n, p=weights / weights.sum())
    m_order = np.lexsort((t_us, merchant))
    m, mt = merchant[m_order], t_us[m_order]
    mcols = {"event_id": event_id[m_order], "merchant_id": np.array([f"merch-{x:05d}" for x in m], dtype=object),
             "event_time": mt}
    for label, window in (("24h", DAY_US), ("7d", 7 * DAY_US)):
        mcols[f"merchant_txn_count_{label}"] = _window_counts(m, mt, np.zeros(n), window)[0].astype(np.int64)
    fraud_p = rng.beta(1, 40, n_mer)
    known = rng.binomial(mcols["merchant_txn_count_7d"], 0.3)
    mcols["merchant_labels_known"] = known.astype(np.int64)
    mcols["merchant_fraud_labels"] = rng.binomial(known, fraud_p[m]).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mcols["merchant_fraud_rate"] = np.where(known > 0, mcols["merchant_fraud_labels"] / known, np.nan)
    mcols["updated_at"] = updated[m_order]

    def to_arrow(name, columns):
        schema = _arrow_schema(name)
        arrays = []
        for f in schema:
            values = columns[f.name]
            if pa.types.is_timestamp(f.type):
                arrays.append(pa.array(values, type=pa.int64()).cast(f.type))
            else:
                arrays.append(pa.array(values, type=f.type, from_pandas=True))  # NaN -> NULL
        return pa.Table.from_arrays(arrays, schema=schema)

    return to_arrow("gold/account_features", cols), to_arrow("gold/merchant_features", mcols)


def write_gold(lake: Path, account, merchant) -> None:
    from deltalake import write_deltalake

    for name, data in (("gold/account_features", account), ("gold/merchant_features", merchant)):
        write_deltalake(tables.table_path(str(lake), name), data, mode="error")


# -- feast ------------------------------------------------------------------------------------------------------
def apply_and_materialize(now: datetime) -> dict:
    from decisionflow.hooks.feast import FeastHook

    hook = FeastHook()
    out = {}
    t0 = time.perf_counter()
    out["applied"] = hook.apply()
    out["apply_s"] = time.perf_counter() - t0
    store = hook.get_store()
    t0 = time.perf_counter()
    store.materialize(now - timedelta(days=8), now + timedelta(seconds=1), feature_views=list(VIEWS))
    out["materialize_s"] = time.perf_counter() - t0
    out["store"] = store
    return out


def latest_gold_rows(lake: Path, name: str, key: str, ids: list[str]) -> dict[str, dict]:
    """The latest row (event_time, then updated_at) per id, read from the Delta table (current snapshot)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    data = DeltaTable(tables.table_path(str(lake), name)).to_pyarrow_table()
    frame = data.filter(pc.is_in(data[key], value_set=pa.array(sorted(set(ids))))).to_pandas()
    frame = frame.sort_values(["event_time", "updated_at"]).groupby(key).tail(1)
    return {row[key]: row for row in frame.to_dict("records")}


def _same(online, expected) -> bool:
    if expected is None or (isinstance(expected, float) and math.isnan(expected)):
        return online is None
    if online is None:
        return False
    if isinstance(expected, float):
        return math.isclose(online, expected, rel_tol=1e-12, abs_tol=0.0)
    return online == expected


def verify(store, lake: Path, service, rows: list[dict]) -> dict:
    """Online values of ``rows`` (one request) == latest gold rows, on-demand features recomputed by hand.

    An unknown account/merchant pair is appended: it must come back all NULL, so a store that answers
    anything at all cannot pass.
    """
    unknown = {"account_id": "acct-unknown", "merchant_id": "merch-unknown", "amount": 1.0}
    online = store.get_online_features(features=service, entity_rows=[*rows, unknown]).to_dict()
    accounts = latest_gold_rows(lake, "gold/account_features", "account_id", [r["account_id"] for r in rows])
    merchants = latest_gold_rows(lake, "gold/merchant_features", "merchant_id", [r["merchant_id"] for r in rows])
    account_cols = [c.name for c in tables.table("gold/account_features").columns][3:-1]
    merchant_cols = [c.name for c in tables.table("gold/merchant_features").columns][3:-1]
    served = {f.name for projection in service.feature_view_projections for f in projection.features}
    on_demand = {"amount_to_avg_24h", "share_of_24h_spend"}
    if served != set(account_cols) | set(merchant_cols) | on_demand:
        raise RuntimeError(f"{SERVICE} serves {sorted(served)}, not the gold columns + {sorted(on_demand)}")
    if set(online) != served | {"account_id", "merchant_id"}:
        raise RuntimeError(f"the response has {sorted(online)}, the service serves {sorted(served)}")
    problems, checked = [], 0
    for i, row in enumerate(rows):
        acc, mer = accounts[row["account_id"]], merchants[row["merchant_id"]]
        expected = {c: acc[c] for c in account_cols} | {c: mer[c] for c in merchant_cols}
        # transaction_context, recomputed: amount against the account's last-24h spending
        count, total, amount = float(acc["txn_count_24h"]), float(acc["amount_sum_24h"]), row["amount"]
        average = total / count if count > 0 else None
        expected["amount_to_avg_24h"] = amount / average if average and average > 0 else None
        expected["share_of_24h_spend"] = amount / total if total > 0 else None
        for name, value in expected.items():
            checked += 1
            if name not in online:
                problems.append(f"{name} missing from the response")
            elif not _same(online[name][i], value.item() if hasattr(value, "item") else value):
                problems.append(f"{row['account_id']}/{row['merchant_id']} {name}: online {online[name][i]!r}, "
                                f"gold {value!r}")
    nulls = sum(online["seconds_since_prev_txn"][i] is None for i in range(len(rows)))
    leaked = sorted(name for name in served if online[name][len(rows)] is not None)
    if leaked:
        problems.append(f"the unknown entity got values for {leaked}")
    if problems:
        raise RuntimeError(f"online values differ from gold ({len(problems)} of {checked}): {problems[:5]}")
    return {"entities": len(rows), "values": checked, "null_values_expected_and_seen": nulls}


# -- timing -----------------------------------------------------------------------------------------------------
def requests_for(ids, rng, size: int, count: int) -> list[list[dict]]:
    """``count`` requests of ``size`` distinct known accounts, each with a random merchant and amount."""
    accounts, merchants = ids
    out = []
    for _ in range(count):
        acc = rng.choice(len(accounts), size, replace=False)
        mer = rng.integers(0, len(merchants), size)
        amount = rng.lognormal(3.5, 1.0, size).round(2)
        out.append([{"account_id": accounts[a], "merchant_id": merchants[m], "amount": float(x)}
                    for a, m, x in zip(acc, mer, amount)])
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def run_cases(targets: dict, payloads: list[list[dict]], warmup: int, block: int = 50) -> dict:
    """Per (online store, case): wall ns of each request (call + ``to_dict``), of its ``to_dict`` alone, and its
    thread CPU ns. ``targets``: store name -> (FeatureStore, feature service, view feature refs).

    The first ``warmup`` payloads are untimed; then the stores and cases alternate in blocks of ``block``
    requests, every store getting the same requests.
    """
    # The plain views get entity rows without the request field ``amount`` (built before timing).
    inputs = {"service": payloads, "views": [[_view_row(r) for r in rows] for rows in payloads], "reader": payloads}
    runs = {(name, case): (store.get_online_features, feats)
            for name, (store, service, view_refs, _) in targets.items()
            for case, feats in (("service", service), ("views", view_refs))}
    runs |= {(name, "reader"): (_reader_call(reader), None) for name, (_, _, _, reader) in targets.items()}
    for (_, case), (get, feats) in runs.items():
        for rows in inputs[case][:max(warmup, 1)]:
            get(features=feats, entity_rows=rows).to_dict()
    samples = {key: {"total": [], "to_dict": [], "cpu": []} for key in runs}
    gc.collect()
    clock, cpu = time.perf_counter_ns, time.thread_time_ns
    for start in range(warmup, len(payloads), block):
        for (name, case), (get, feats) in runs.items():
            total, convert, cpus = (samples[name, case][k] for k in ("total", "to_dict", "cpu"))
            for rows in inputs[case][start:start + block]:
                c0 = cpu()
                t0 = clock()
                response = get(features=feats, entity_rows=rows)
                t1 = clock()
                response.to_dict()
                t2 = clock()
                c2 = cpu()
                total.append(t2 - t0)
                convert.append(t2 - t1)
                cpus.append(c2 - c0)
    return samples


class _Answer:
    """The reader's dict behind the ``to_dict()`` the timing loop calls (nothing to convert: ~0)."""

    __slots__ = ("values",)

    def __init__(self, values: dict):
        self.values = values

    def to_dict(self) -> dict:
        return self.values


def _reader_call(reader):
    return lambda features, entity_rows: _Answer(reader.read(entity_rows))


def _view_row(row: dict) -> dict:
    return {"account_id": row["account_id"], "merchant_id": row["merchant_id"]}


def summarize(samples: dict[str, list[int]]) -> dict:
    ms = sorted(x / 1e6 for x in samples["total"])
    return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "mean_ms": sum(ms) / len(ms),
            "max_ms": ms[-1], "requests": len(ms),
            "cpu_p50_ms": percentile(sorted(x / 1e6 for x in samples["cpu"]), 50),
            "to_dict_p50_ms": percentile(sorted(x / 1e6 for x in samples["to_dict"]), 50)}


def profile_one(store, service, view_refs, rows: list[dict], top: int = 18) -> str:
    out = io.StringIO()
    view_rows = [_view_row(r) for r in rows]
    for case, features, entity_rows in (("service", service, rows), ("views", view_refs, view_rows)):
        profiler = cProfile.Profile()
        for _ in range(20):  # 20 calls: enough samples, still one request's shape
            profiler.enable()
            store.get_online_features(features=features, entity_rows=entity_rows).to_dict()
            profiler.disable()
        out.write(f"\n=== cProfile {case}, {len(rows)} entities, 20 calls (cumulative) ===\n")
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# -- report -----------------------------------------------------------------------------------------------------
def online_store_text(store) -> str:
    """The online store ``store`` really uses, with its version (read from the store's config)."""
    online = store.config.online_store
    if online.type == "sqlite":
        import sqlite3

        return f"sqlite (SQLite {sqlite3.sqlite_version})"
    if online.type == "redis":
        import redis

        host, port = online.connection_string.split(",")[0].rsplit(":", 1)
        server = redis.Redis(host=host, port=int(port)).info("server")["redis_version"]
        return f"redis (server {server} on {host}:{port}, redis-py {redis.__version__})"
    return online.type


def environment(stores: dict) -> dict:
    import feast
    import pandas

    store = next(iter(stores.values()))
    registry = store.config.registry
    odfv = store.get_on_demand_feature_view(ODFV)
    return {
        "feast": feast.__version__, "pandas": pandas.__version__, "python": platform.python_version(),
        "online_stores": {name: online_store_text(s) for name, s in stores.items()},
        "registry": f"{registry.registry_type} (cache_ttl_seconds {registry.cache_ttl_seconds}, "
                    f"cache_mode {getattr(registry, 'cache_mode', '?')})",
        "odfv_mode": odfv.mode, "cpus": os.cpu_count(), "machine": platform.machine(),
    }


def report(args, results: dict) -> str:
    env, data, per_store = results["environment"], results["data"], results["stores"]
    loads = ", ".join(f"{name} {r['apply_s']:.1f} s + {r['materialize_s']:.1f} s" for name, r in per_store.items())
    lines = [
        f"bench/features.py: {data['accounts']:,} accounts / {data['account_rows']:,} gold rows, "
        f"{data['merchants']:,} merchants / {data['merchant_rows']:,} gold rows; apply + materialize: {loads}"
        + (" (the first apply includes the one-time imports)" if len(per_store) > 1 else ""),
        f"feast {env['feast']} (pandas {env['pandas']}, Python {env['python']}), online stores: "
        + "; ".join(env["online_stores"].values()),
        f"registry {env['registry']}, {ODFV} mode {env['odfv_mode']!r}",
        f"{env['cpus']} CPUs ({env['machine']}), load average before/after: {results['load_before']} | "
        f"{results['load_after']}",
        *(f"verified ({name}): {r['verify']['values']} online values of {r['verify']['entities']} sampled "
          f"entities == latest gold rows ({r['verify']['null_values_expected_and_seen']} NULL "
          f"seconds_since_prev_txn among them); an unknown entity reads all NULL" for name, r in per_store.items()),
        *([f"note: {args.store_note}"] if args.store_note else []),
        "latency = get_online_features(...).to_dict() ((c): OnlineFeatureReader.read(...)) wall time after a warm-up, the cases and stores interleaved in "
        "blocks of 50 (same requests per store); CPU p50 = this thread's CPU time (lower than wall when other jobs "
        "take the cores, and than Redis's network round trip); to_dict = its p50",
        "",
        f"{'store':<8}{'case':<38}{'entities':>9}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'max ms':>9}{'CPU p50':>9}"
        f"{'to_dict':>9}{'requests':>10}{'goal p99':>10}{'':>6}",
        "-" * WIDTH,
    ]
    missed = []
    for size in args.entities:
        for label, case in CASES:
            label = label.format(n=results["view_features"])
            for name in per_store:
                s = results["timings"][f"{name}/{case}/{size}"]
                goal = GOALS.get(size)
                verdict = ""
                if goal is not None:
                    verdict = "PASS" if s["p99_ms"] <= goal else "MISS"
                    if verdict == "MISS":
                        missed.append(f"{name}/{case}/{size}")
                lines.append(f"{name:<8}{label:<38}{size:>9}{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}{s['mean_ms']:>9.2f}"
                             f"{s['max_ms']:>9.2f}{s['cpu_p50_ms']:>9.2f}{s['to_dict_p50_ms']:>9.2f}"
                             f"{s['requests']:>10,}{(f'<= {goal:g}' if goal is not None else '-'):>10}{verdict:>6}")
        for name in per_store:
            a, b = results["timings"][f"{name}/service/{size}"], results["timings"][f"{name}/views/{size}"]
            lines.append(f"{name:<8}{'    (a) - (b): the on-demand view':<38}{size:>9}{a['p50_ms'] - b['p50_ms']:>9.2f}"
                         f"{a['p99_ms'] - b['p99_ms']:>9.2f}{a['mean_ms'] - b['mean_ms']:>9.2f}{'':>9}"
                         f"{a['cpu_p50_ms'] - b['cpu_p50_ms']:>9.2f}{a['to_dict_p50_ms'] - b['to_dict_p50_ms']:>9.2f}")
    lines.append("-" * WIDTH)
    results["missed"] = missed
    goal_text = ", ".join(f"p99 <= {g:g} ms for {n} entit{'y' if n == 1 else 'ies'}" for n, g in GOALS.items())
    verdict = "MISS (" + ", ".join(missed) + ")" if missed else "PASS"
    if not set(args.entities) & set(GOALS):
        verdict = "n/a (no goal for these entity counts)"
    lines.append(f"goal ({goal_text}): {verdict}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="df-bench-features-"))
    lake = work / "lake"
    results: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    previous_env = {k: os.environ.get(k) for k in ("AIRFLOW_HOME", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                                                   "AIRFLOW__CORE__LOAD_EXAMPLES", "AIRFLOW_CONN_FEAST_DEFAULT",
                                                   "AIRFLOW_CONN_LAKE_DEFAULT")}
    report_out, sys.stdout = sys.stdout, sys.stderr  # Airflow/Feast log to stdout: keep it for the report
    redis_process = None
    try:
        import numpy as np

        if args.store_note:
            print(f"note: {args.store_note}", file=sys.stderr, flush=True)
        isolate_airflow(work, lake)
        redis_address = None
        if "redis" in args.stores:
            redis_process, redis_address = start_redis(work / "redis")
            print(f"private redis-server (pid {redis_process.pid}) on {redis_address}", file=sys.stderr, flush=True)
        now = datetime.now(timezone.utc).replace(microsecond=0)
        print(f"writing gold tables under {lake} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        account, merchant = gold_tables(args, now)
        write_gold(lake, account, merchant)
        results["data"] = {"accounts": args.accounts, "merchants": args.merchants, "account_rows": account.num_rows,
                           "merchant_rows": merchant.num_rows, "seconds": time.perf_counter() - t0}

        rng = np.random.default_rng(args.seed + 1)
        ids = (sorted(set(account.column("account_id").to_pylist())),
               sorted(set(merchant.column("merchant_id").to_pylist())))
        sample = requests_for(ids, rng, min(200, args.accounts), 1)[0]
        targets, results["stores"] = {}, {}
        for name in args.stores:
            print(f"[{name}] feast apply (FeastHook, AIRFLOW_CONN_* connections) + materialize ...",
                  file=sys.stderr, flush=True)
            use_online_store(work, name, redis_address)
            feast = apply_and_materialize(now)
            store = feast["store"]
            if store.config.online_store.type != name:
                raise RuntimeError(f"asked for the {name} online store, Feast uses {store.config.online_store.type}")
            service = store.get_feature_service(SERVICE)  # fetched once, as a serving process keeps it
            view_refs = [f"{v.name}:{f.name}" for v in (store.get_feature_view(n) for n in VIEWS) for f in v.features]
            results["view_features"] = len(view_refs)
            results["stores"][name] = {"apply_s": feast["apply_s"], "materialize_s": feast["materialize_s"],
                                       "verify": verify(store, lake, service, sample)}
            from decisionflow.features.online import OnlineFeatureReader

            reader = OnlineFeatureReader(store, SERVICE)
            expected = store.get_online_features(features=service, entity_rows=sample).to_dict()
            if reader.read(sample) != expected:
                raise RuntimeError(f"[{name}] OnlineFeatureReader's values differ from get_online_features'")
            targets[name] = (store, service, view_refs, reader)
        results["environment"] = environment({name: target[0] for name, target in targets.items()})
        results["load_before"] = _load()
        results["timings"] = {}
        for size in args.entities:
            print(f"timing {args.requests:,} requests x {len(CASES)} cases x {len(targets)} online store(s) with {size} "
                  f"entit{'y' if size == 1 else 'ies'} ...", file=sys.stderr, flush=True)
            payloads = requests_for(ids, rng, size, args.warmup + args.requests)
            samples = run_cases(targets, payloads, args.warmup)
            for (name, case), values in samples.items():
                results["timings"][f"{name}/{case}/{size}"] = summarize(values)
            if args.profile:
                for name, (store, service, view_refs, _) in targets.items():
                    print(f"\n##### online store {name}", file=sys.stderr)
                    print(profile_one(store, service, view_refs, payloads[0]), file=sys.stderr, flush=True)
        results["load_after"] = _load()
        text = report(args, results)
        print(text, file=report_out, flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        return 1 if args.check and results["missed"] else 0
    finally:
        sys.stdout = report_out
        if redis_process is not None:
            stop_redis(redis_process)
        for key, value in previous_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
