"""Benchmark: the scoring gateway on Ray Serve vs. the same app under bare uvicorn, same model, same client.

    .venv/bin/python bench/serving.py [--seconds 8] [--rounds 3] [--clients 16] [--batch 100] [--check]

Method. One run sets up, once, in a private temporary directory (removed at the end):

1. a private MLflow (SQLite tracking + registry store, artifacts in a local folder): a LightGBM risk model
   trained on the seeded synthetic frame (``decisionflow.models.synthetic``), logged with
   ``log_training_run`` and registered with ``register_challenger`` -- what the training DAG does;
2. a private Feast registry + SQLite online store with materialized gold features: ``bench/features.py``'s own
   setup functions (imported, not copied) write ``gold/account_features`` / ``gold/merchant_features`` with
   delta-rs and apply + materialize the project's feature repo through ``FeastHook``;
3. the SAME gateway app (``decisionflow_serving.app.create_app``) twice, both up for the whole measurement:
   (a) ``python -m decisionflow_serving`` under bare uvicorn in a subprocess, ``LocalModelBackend`` (the model
   in-process); (b) a private Ray head (token auth, every port free and on loopback, like
   ``tests/integration/fixtures_ml.py``), the app deployed through the Serve REST API
   (``PUT /api/serve/applications/`` on the dashboard) by the provider's ``RayServeHook`` (connection
   ``ray_default`` from an ``AIRFLOW_CONN_*`` variable) with the project's Serve config
   (``decisionflow.rollout.serve_config``), Serve's HTTP proxy on a free port: the FastAPI ingress ``Gateway``
   + the ``stable`` model deployment (``@serve.batch``) + an empty ``canary``.

The client is a separate process (asyncio, keep-alive HTTP/1.1 connections, one per concurrent client, the
same for both servers): ``--clients`` (16) concurrent clients send ``POST /v1/score`` with one transaction per
request, then with ``--batch`` (100) transactions per request; the bodies are the same pre-built list for both
servers (valid ``transactions.v1`` records of accounts and merchants that are in the online store). The two
servers alternate in rounds (``--rounds`` x ``--seconds`` per server and load shape, the first server
alternating too, after an untimed warm-up), so a change in machine load hits both alike; the client, both
servers and whatever else runs share the machine's cores (2 here). Every response must be 200 and name the
model version; failures are counted and printed.

Printed: requests/s (QPS), p50/p99/max latency per server and load shape, rows/s at batch 100, the ratios
Ray/uvicorn, the client's CPU per request, and the servers' memory read from ``/proc`` (RSS and PSS summed
over every process of the Ray head's session with Serve running -- GCS, raylet, dashboard, Serve controller,
proxy, replicas -- vs the uvicorn process).

Goal (issue): Ray Serve QPS >= 0.7 x bare uvicorn QPS and Ray Serve p99 <= 25 ms, at 16 clients with one
transaction per request. Exit code 0 even on MISS (a benchmark, not a test) unless ``--check``; exit 2 when a
server could not be set up (the reason printed). ``--help`` lists the knobs; ``--only uvicorn`` skips Ray.
Everything it starts is stopped by PID (process group) at the end; standard ports are never used.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from argparse import Namespace
from datetime import datetime, timedelta, timezone
from pathlib import Path

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROUTE = "/v1/score"
QPS_RATIO_GOAL = 0.7
P99_GOAL_MS = 25.0
SERVERS = ("uvicorn", "ray")
EXPERIMENT = "bench-serving"
APP_NAME = "decisionflow"
WIDTH = 118


def _import_path(name: str, path: Path):
    """A module from a file path (``bench/`` and ``tests/`` are not packages on ``sys.path``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None) -> Namespace:
    parser = argparse.ArgumentParser(prog="bench/serving.py", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default %(default)s)")
    parser.add_argument("--batch", type=int, default=100,
                        help="transactions per request of the batch load shape (default %(default)s)")
    parser.add_argument("--batch-clients", type=int, default=None,
                        help="concurrent clients at --batch (default: --clients)")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="timed seconds per server, load shape and round (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="untimed seconds per server and load shape before the rounds (default %(default)s)")
    parser.add_argument("--idle-seconds", type=float, default=5.0,
                        help="seconds each server's idle CPU use is sampled before the load (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the servers alternating (default %(default)s)")
    parser.add_argument("--accounts", type=int, default=5_000, help="accounts in gold (default %(default)s)")
    parser.add_argument("--merchants", type=int, default=500, help="merchants in gold (default %(default)s)")
    parser.add_argument("--train-rows", type=int, default=10_000,
                        help="rows of the synthetic training frame (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=SERVERS, help="measure one server only")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, stores)")
    parser.add_argument("--client-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_clients = args.batch_clients or args.clients
    if min(args.clients, args.batch, args.rounds, args.accounts, args.merchants) < 1 or args.seconds <= 0:
        parser.error("--clients, --batch, --rounds, --accounts, --merchants must be >= 1 and --seconds > 0")
    if args.batch > 1000:
        parser.error("--batch cannot exceed 1000 (the /v1/score limit)")
    args.servers = [args.only] if args.only else list(SERVERS)
    args.start_order = sorted(args.servers, key=lambda name: name != "ray")  # Ray's start is the fragile one
    return args


# -- processes ----------------------------------------------------------------------------------------------------
def start_process(argv: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """``argv`` in a session of its own (so :func:`stop_group` can stop it and its children by process group)."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
                                env={**os.environ, **(env or {})})


def stop_group(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the process group this run created (its leader is ``process``), SIGKILL it after ``grace``."""
    _fixtures_ml().stop_group(process, grace)


def http(method: str, url: str, body=None, headers: dict | None = None, timeout: float = 10.0):
    """(status, parsed JSON or text) of one request; status None when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={
        **({"Content-Type": "application/json"} if data is not None else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - loopback only
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return None, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None,
             interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}" + _tail(log))
        if predicate():
            return
        time.sleep(interval)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f}s" + _tail(log))


def _tail(log: Path | None, chars: int = 2500) -> str:
    if log is None:
        return ""
    try:
        return f"\n--- {log} (tail)\n" + log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# -- /proc memory --------------------------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of ``pid`` from /proc/<pid>/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return int(fields[1]), int(fields[3])


def process_tree(root_pid: int) -> list[int]:
    """``root_pid``, its descendants, and every process in its session (a re-parented Ray worker stays in it)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                stats[int(entry.name)] = stat
    root = stats.get(root_pid)
    if root is None:
        return []
    members = {root_pid} | {pid for pid, (_, sid) in stats.items() if sid == root[1] and root[1] == root_pid}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in stats.items():
            if ppid in members and pid not in members:
                members.add(pid)
                grew = True
    return sorted(members)


def _kib(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _name(pid: int) -> str:
    """A short process name: Ray's own title (``ray::ServeReplica:...``), else the command with paths shortened."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    parts = [p.decode(errors="replace") for p in raw if p]
    if not parts:
        return "?"
    if parts[0].startswith("ray::"):  # Ray names its workers and actors in argv[0]
        return parts[0].split()[0]
    words = " ".join(parts).split()
    return " ".join(Path(w).name if w.startswith("/") else w for w in words[:4])[:56]


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (seconds) summed over ``pids`` (those still alive), from /proc/<pid>/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def memory(root_pid: int) -> dict:
    """RSS and PSS (MiB) summed over the process tree/session of ``root_pid``, with the largest processes."""
    rows = []
    for pid in process_tree(root_pid):
        rss = _kib(Path(f"/proc/{pid}/status"), "VmRSS")
        pss = _kib(Path(f"/proc/{pid}/smaps_rollup"), "Pss")
        if rss:
            rows.append({"pid": pid, "name": _name(pid), "rss_mib": rss / 1024, "pss_mib": pss / 1024})
    rows.sort(key=lambda r: -r["rss_mib"])
    return {"processes": len(rows), "rss_mib": sum(r["rss_mib"] for r in rows),
            "pss_mib": sum(r["pss_mib"] for r in rows), "top": rows[:8]}


# -- setup: MLflow model -----------------------------------------------------------------------------------------
def setup_model(work: Path, train_rows: int, seed: int) -> dict:
    """Train, log and register one risk model version in a private MLflow (SQLite store, local artifacts)."""
    from decisionflow.constants import MODEL_NAME
    from decisionflow.models.config import DEFAULT_FEATURE_COLUMNS, TrainingConfig
    from decisionflow.models.pipeline import train_and_evaluate
    from decisionflow.models.registry import register_challenger
    from decisionflow.models.synthetic import make_transactions
    from decisionflow.models.tracking import log_training_run, mlflow_client

    root = work / "mlflow"
    (root / "artifacts").mkdir(parents=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # A SQL registry store resolves a ``models:/m-...`` source through the process's tracking URI: point it here
    # (main() restores the environment at the end).
    os.environ["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_REGISTRY_URI"] = uri
    t0 = time.perf_counter()
    outcome = train_and_evaluate(make_transactions(train_rows, seed=seed + 3), list(DEFAULT_FEATURE_COLUMNS),
                                 TrainingConfig())
    trained = time.perf_counter() - t0
    client = mlflow_client(uri)
    client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    run_id = log_training_run(client, EXPERIMENT, outcome, run_name="bench-serving",
                              idempotency_key="bench/serving")
    version = register_challenger(client, MODEL_NAME, run_id).version
    return {"tracking_uri": uri, "name": MODEL_NAME, "version": str(version), "run_id": run_id,
            "train_s": trained, "total_s": time.perf_counter() - t0}


# -- setup: Feast ---------------------------------------------------------------------------------------------------
def setup_features(work: Path, args: Namespace) -> dict:
    """bench/features.py's gold tables, applied + materialized into a SQLite online store (its own functions)."""
    bench_features = _import_path("bench_features", ROOT / "bench" / "features.py")
    lake = work / "lake"
    bench_features.isolate_airflow(work, lake)
    feast_extra = bench_features.use_online_store(work, "sqlite", None)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    t0 = time.perf_counter()
    gold_args = Namespace(accounts=args.accounts, merchants=args.merchants, txns_per_account=4.0, seed=args.seed)
    account, merchant = bench_features.gold_tables(gold_args, now)
    bench_features.write_gold(lake, account, merchant)
    feast = bench_features.apply_and_materialize(now)
    ids = (sorted(set(account.column("account_id").to_pylist())),
           sorted(set(merchant.column("merchant_id").to_pylist())))
    return {"lake": lake, "feast_extra": feast_extra, "ids": ids, "now": now, "store": feast["store"],
            "account_rows": account.num_rows, "merchant_rows": merchant.num_rows,
            "seconds": time.perf_counter() - t0}


# -- request bodies -------------------------------------------------------------------------------------------------
_CHANNELS = ("card_present", "ecommerce", "mobile", "atm")


def transactions(ids, rng, count: int, now: datetime) -> list[dict]:
    """``count`` valid transactions.v1 records of known accounts and merchants, happening just now."""
    accounts, merchants = ids
    out = []
    for _ in range(count):
        channel = _CHANNELS[int(rng.integers(0, len(_CHANNELS)))]
        online = channel in ("ecommerce", "mobile")
        out.append({
            "event_id": str(uuid.UUID(int=int(rng.integers(0, 2**62)) << 64 | int(rng.integers(0, 2**62)), version=4)),
            "event_time": (now - timedelta(seconds=int(rng.integers(0, 30)))).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "account_id": accounts[int(rng.integers(0, len(accounts)))],
            "merchant_id": merchants[int(rng.integers(0, len(merchants)))],
            "amount": round(float(rng.lognormal(3.5, 1.0)), 2),
            "currency": "EUR",
            "mcc": ("5411", "5812", "5732", "4829")[int(rng.integers(0, 4))],
            "channel": channel,
            "country": "DE" if rng.random() < 0.85 else "FR",
            "device_id": f"dev-{int(rng.integers(0, 10_000)):05d}" if online else None,
            "ip": f"10.{int(rng.integers(0, 255))}.{int(rng.integers(0, 255))}.{int(rng.integers(1, 255))}"
            if online else None,
            "memo": None,
            "schema_version": 1,
        })
    return out


def bodies(ids, rng, size: int, count: int, now: datetime) -> list[str]:
    return [json.dumps({"transactions": transactions(ids, rng, size, now)}) for _ in range(count)]


# -- the client (a separate process) --------------------------------------------------------------------------------
class _Connection:
    """One keep-alive HTTP/1.1 connection: a request, then its whole response (Content-Length or chunked)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        self.writer.write(head + body)
        status_and_headers = await self.reader.readuntil(b"\r\n\r\n")
        lines = status_and_headers.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked, close = None, False, False
        for line in lines[1:]:
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif key == b"connection" and b"close" in value.lower():
                close = True
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size + 2))
            payload = b"".join(p[:-2] for p in parts)
        else:
            payload = await self.reader.readexactly(length or 0)
        if close:
            self.close()
        return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _load_phase(port: int, token: str, payloads: list[bytes], clients: int, warmup: float, seconds: float,
                      ) -> dict:
    """``clients`` connections sending ``payloads`` (round robin) for ``warmup`` (untimed) + ``seconds``."""
    head = (f"POST {ROUTE} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nAccept: application/json\r\n").encode()
    heads = {len(p): head + f"Content-Length: {len(p)}\r\n\r\n".encode() for p in payloads}
    latencies: list[int] = []
    failures: dict[str, int] = {}
    versions: dict[str, int] = {}
    counter = iter(range(10**12))
    start = time.monotonic()
    timed_from, stop_at = start + warmup, start + warmup + seconds
    first_error: list[str] = []
    sent = [0]

    async def client() -> None:
        connection = _Connection(HOST, port)
        clock = time.perf_counter_ns
        while True:
            now = time.monotonic()
            if now >= stop_at:
                break
            body = payloads[next(counter) % len(payloads)]
            t0 = clock()
            try:
                status, payload = await connection.request(heads[len(body)], body)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                connection.close()
                status, payload = None, repr(exc).encode()
            elapsed = clock() - t0
            sent[0] += 1
            timed = now >= timed_from
            if status == 200:
                try:
                    version = str(json.loads(payload)["model"]["version"])
                except (ValueError, KeyError, TypeError):
                    version = None
                if version is None:
                    status = "200 without model.version"
            if status != 200:
                key = str(status)
                if timed:
                    failures[key] = failures.get(key, 0) + 1
                if not first_error:
                    first_error.append(f"{key}: {payload[:300].decode(errors='replace')}")
                if status is None:
                    await asyncio.sleep(0.05)
                continue
            if timed:
                latencies.append(elapsed)
                versions[version] = versions.get(version, 0) + 1
        connection.close()

    cpu0 = time.process_time()
    await asyncio.gather(*(client() for _ in range(clients)))
    cpu = time.process_time() - cpu0
    wall = time.monotonic() - timed_from
    return {"latencies_ns": latencies, "failures": failures, "versions": versions, "seconds": wall,
            "client_cpu_s": cpu, "sent": sent[0], "first_error": first_error[0] if first_error else None}


def client_worker() -> int:
    """Reads one JSON command a line on stdin, answers one JSON line on stdout (the main process drives it)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    cache: dict[str, list[bytes]] = {}
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("quit"):
            break
        path = command["payloads"]
        if path not in cache:
            cache[path] = [p.encode() for p in json.loads(Path(path).read_text())]
        result = asyncio.run(_load_phase(command["port"], command["token"], cache[path], command["clients"],
                                         command["warmup"], command["seconds"]))
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


class Client:
    """The client process: one per run, driven over its stdin/stdout."""

    def __init__(self, log: Path):
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--client-worker"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "ab"),
                                        text=True, start_new_session=True)

    def run(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the client process exited with {self.process.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"quit": True}) + "\n")
                self.process.stdin.flush()
                self.process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                stop_group(self.process, grace=5)


# -- the servers -------------------------------------------------------------------------------------------------
def gateway_settings(work: Path, model: dict, feast_extra: dict) -> dict:
    """The GatewaySettings fields both servers get (paths and URIs only; the token store is private)."""
    return {
        "mlflow_uri": model["tracking_uri"], "model_name": model["name"], "model_version": model["version"],
        "feast_project": feast_extra["project"], "feast_registry": feast_extra["registry"],
        "feast_online_store": feast_extra["online_store"], "feature_repo": feast_extra["repo_path"],
        "token_store": str(work / "serving" / "api_tokens.json"),
    }


def free_port() -> int:
    fixtures = _fixtures_ml()
    return fixtures.free_port(avoid=fixtures.RAY_WORKER_PORTS)


def _fixtures_ml():
    """tests/integration/fixtures_ml.py: the private Ray head start (token auth, free ports), reused."""
    if "bench_fixtures_ml" not in sys.modules:
        _import_path("bench_fixtures_ml", ROOT / "tests" / "integration" / "fixtures_ml.py")
    return sys.modules["bench_fixtures_ml"]


def start_uvicorn(work: Path, settings: dict) -> dict:
    """``python -m decisionflow_serving`` (bare uvicorn, LocalModelBackend) on a free port; waits for /ready."""
    from decisionflow_serving.settings import ENV_PREFIX

    port = free_port()
    env = {ENV_PREFIX + k.upper(): (json.dumps(v) if isinstance(v, dict) else str(v)) for k, v in settings.items()}
    log = work / "uvicorn.log"
    t0 = time.perf_counter()
    process = start_process([sys.executable, "-m", "decisionflow_serving", "--host", HOST, "--port", str(port)],
                            log, env=env, cwd=work)
    server = {"name": "uvicorn", "process": process, "port": port, "log": log}
    try:
        wait_for(lambda: http("GET", f"http://{HOST}:{port}/ready", timeout=2)[0] == 200, 180,
                 "uvicorn gateway /ready", process, log)
    except BaseException:
        stop_group(process, grace=10)
        raise
    server["start_s"] = time.perf_counter() - t0
    return server


def serve_config(settings: dict, serve_port: int) -> dict:
    """The Serve REST API body of the gateway app, from the project's builder (``decisionflow.rollout``): the
    ``Gateway`` ingress + ``stable`` serving the version + an empty ``canary``; HTTP on ``serve_port``."""
    from decisionflow.rollout.serve_config import AppSpec, ServingState, application_config
    from decisionflow.rollout.serve_config import serve_config as full_config

    args = {k: v for k, v in settings.items() if k != "model_version"}  # stable's user_config names the version
    app = application_config(AppSpec(args=args), ServingState(stable_version=settings["model_version"]))
    return full_config([app], host=HOST, port=serve_port)


def start_ray(work: Path, settings: dict, attempts: int = 5) -> dict:
    """A private Ray head (2 CPUs, token auth, free loopback ports) and the gateway deployed on Serve through the
    REST API by ``RayServeHook``; waits for the app RUNNING and ``/ready`` on Serve's HTTP port."""
    fixtures = _fixtures_ml()
    root = work / "ray"
    root.mkdir()
    token_path = root / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    t0 = time.perf_counter()
    errors = []
    waited = 0.0
    for _attempt in range(attempts):  # the raylet of Ray 2.60 aborts its start when the machine is loaded
        w0 = time.perf_counter()
        fixtures.wait_for_quieter_machine(max_wait=90)
        waited += time.perf_counter() - w0
        load = os.getloadavg()[0]
        process, head, error = fixtures._start_ray_head(root, token_path, num_cpus=os.cpu_count() or 2)
        if error is None:
            break
        why = fixtures._raylet_abort(head).strip() or error.splitlines()[0]
        errors.append(f"[load average {load:.1f} on {os.cpu_count()} CPUs] {why[:300]}")
        print(f"ray head start failed: {errors[-1]}", file=sys.stderr, flush=True)
        stop_group(process, grace=30)
        shutil.rmtree(head.temp_dir, ignore_errors=True)
    else:
        raise RuntimeError(f"the private Ray head did not start in {attempts} attempts (logs under {root}): "
                           + " | ".join(errors))
    server = {"name": "ray", "process": process, "head": head, "log": root, "attempts": len(errors) + 1,
              "waited_s": waited}
    try:
        server["head_s"] = time.perf_counter() - t0 - waited
        serve_port = free_port()
        # The provider's RayServeHook over ``ray_default`` (an AIRFLOW_CONN_* variable, as a user sets it; the
        # Airflow home is the throwaway one of the feature setup): PUT keeping other apps, wait for RUNNING.
        os.environ["AIRFLOW_CONN_RAY_DEFAULT"] = json.dumps({
            "conn_type": "ray", "host": HOST, "port": head.gcs_port,
            "extra": {"dashboard_url": head.dashboard_url, "auth_token_path": str(token_path),
                      "serve_url": f"http://{HOST}:{serve_port}", "serve_port": serve_port}})
        from decisionflow.hooks.ray_serve import RayServeHook

        config = serve_config(settings, serve_port)
        server["config"] = config
        hook = RayServeHook()
        if hook.serve_http_options != config["http_options"]:
            raise RuntimeError(f"RayServeHook would deploy with {hook.serve_http_options}, not {config['http_options']}")
        t1 = time.perf_counter()
        app = config["applications"][0]
        hook.deploy_application(app)
        hook.wait_running(app, timeout=300)
        wait_for(lambda: http("GET", f"http://{HOST}:{serve_port}/ready", timeout=3)[0] == 200, 120,
                 "Ray Serve gateway /ready", process, None)
        server.update(port=serve_port, deploy_s=time.perf_counter() - t1, start_s=time.perf_counter() - t0)
        return server
    except BaseException:
        stop_ray(server)
        raise


def stop_ray(server: dict) -> None:
    stop_group(server["process"], grace=60)
    shutil.rmtree(server["head"].temp_dir, ignore_errors=True)


def stop_server(server: dict) -> None:
    if server["name"] == "ray":
        stop_ray(server)
    else:
        stop_group(server["process"], grace=15)


# -- measurement ----------------------------------------------------------------------------------------------------
def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def same_model(servers: dict, token: str, body: str) -> dict:
    """Both servers score one batch body: the same version and the same scores (so the same model)."""
    answers = {}
    for name, server in servers.items():
        status, answer = http("POST", f"http://{HOST}:{server['port']}{ROUTE}", json.loads(body),
                              {"Authorization": f"Bearer {token}"}, timeout=60)
        if status != 200:
            raise RuntimeError(f"{name}: POST {ROUTE} answered {status}: {str(answer)[:1500]}")
        answers[name] = answer
        status, _ = http("POST", f"http://{HOST}:{server['port']}{ROUTE}", json.loads(body), timeout=30)
        if status != 401:
            raise RuntimeError(f"{name}: POST {ROUTE} without a token answered {status}, not 401")
    versions = {name: a["model"]["version"] for name, a in answers.items()}
    scores = {name: [s["score"] for s in a["scores"]] for name, a in answers.items()}
    out = {"versions": versions, "rows": len(next(iter(scores.values()))), "bands": {}}
    for name, answer in answers.items():
        for s in answer["scores"]:
            out["bands"][s["band"]] = out["bands"].get(s["band"], 0) + 1
        break
    if len(answers) == 2:
        a, b = scores.values()
        if len(set(versions.values())) != 1 or len(a) != len(b):
            raise RuntimeError(f"the servers answer with different models/rows: {versions}")
        out["max_abs_score_diff"] = max(abs(x - y) for x, y in zip(a, b))
    return out


def measure(args, client: Client, servers: dict, token: str, payload_files: dict) -> dict:
    """Interleaved rounds: per round and load shape, every server in turn (the first alternating)."""
    shapes = {"single": (1, args.clients), "batch": (args.batch, args.batch_clients)}
    runs: dict[str, list[dict]] = {f"{name}/{shape}": [] for name in servers for shape in shapes}
    order = list(servers)
    for round_ in range(args.rounds):
        for shape, (size, clients) in shapes.items():
            for name in (order if round_ % 2 == 0 else order[::-1]):
                print(f"round {round_ + 1}/{args.rounds}: {name} {shape} ({size} txn/request, {clients} clients) ...",
                      file=sys.stderr, flush=True)
                pids = process_tree(servers[name]["process"].pid)
                cpu0 = cpu_seconds(pids)
                result = client.run(port=servers[name]["port"], token=token, payloads=str(payload_files[shape]),
                                    clients=clients, warmup=args.warmup if round_ == 0 else 0.5,
                                    seconds=args.seconds)
                result["server_cpu_s"] = cpu_seconds(pids) - cpu0
                runs[f"{name}/{shape}"].append(result)
    summary = {}
    for key, results in runs.items():
        name, shape = key.split("/")
        size = shapes[shape][0]
        ms = sorted(x / 1e6 for r in results for x in r["latencies_ns"])
        seconds = sum(r["seconds"] for r in results)
        failures: dict[str, int] = {}
        versions: dict[str, int] = {}
        for r in results:
            for k, v in r["failures"].items():
                failures[k] = failures.get(k, 0) + v
            for k, v in r["versions"].items():
                versions[k] = versions.get(k, 0) + v
        n = len(ms)
        summary[key] = {
            "server": name, "shape": shape, "size": size, "clients": shapes[shape][1], "requests": n,
            "qps": n / seconds if seconds else 0.0, "rows_per_s": n * size / seconds if seconds else 0.0,
            "p50_ms": percentile(ms, 50) if ms else float("nan"), "p99_ms": percentile(ms, 99) if ms else float("nan"),
            "max_ms": ms[-1] if ms else float("nan"), "mean_ms": sum(ms) / n if n else float("nan"),
            "failures": failures, "versions": versions,
            "round_qps": [len(r["latencies_ns"]) / r["seconds"] for r in results],
            "client_cpu_ms_per_request": 1000 * sum(r["client_cpu_s"] for r in results)
            / max(sum(r["sent"] for r in results), 1),
            "server_cpu_ms_per_request": 1000 * sum(r["server_cpu_s"] for r in results)
            / max(sum(r["sent"] for r in results), 1),
            "first_error": next((r["first_error"] for r in results if r["first_error"]), None),
        }
    return summary


# -- report -------------------------------------------------------------------------------------------------------
def versions_text() -> str:
    from importlib import metadata

    parts = []
    for dist in ("ray", "uvicorn", "fastapi", "feast", "mlflow", "lightgbm"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(parts) + f", Python {platform.python_version()}"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def report(args, results: dict) -> str:
    setup, model = results["setup"], results["model"]
    lines = [
        f"bench/serving.py: POST {ROUTE}, {args.clients} concurrent clients (1 txn/request) and {args.batch_clients} "
        f"at {args.batch} txns/request; {args.rounds} rounds x {args.seconds:g} s per server and shape, interleaved "
        f"(+ {args.warmup:g} s warm-up first, 0.5 s per later run)",
        f"model {model['name']} v{model['version']} (LightGBM, trained on {args.train_rows:,} synthetic rows in "
        f"{model['train_s']:.0f} s; private MLflow {model['tracking_uri'].split(':', 1)[0]} store); features: Feast "
        f"risk_v1 from a SQLite online store, {setup['account_rows']:,} + {setup['merchant_rows']:,} gold rows of "
        f"{args.accounts:,} accounts / {args.merchants:,} merchants ({setup['features_s']:.0f} s to write + apply + "
        "materialize)",
        f"{versions_text()}; {os.cpu_count()} CPUs ({platform.machine()}); load average before/after: "
        f"{results['load_before']} | {results['load_after']}",
    ]
    busiest = max(float(x.split(" / ")[0]) for x in (results["load_before"], results["load_after"]) if x != "?")
    if busiest > (os.cpu_count() or 1):
        lines.append(f"NOTE: the machine was busy (1-min load average up to {busiest:.1f} on {os.cpu_count()} CPUs, "
                     "other jobs included): wall-time latencies include waiting for a core; compare the ratios and "
                     "the CPU per request, and rerun on a quiet machine for absolute latencies")
    for name, server in results["servers"].items():
        if name == "uvicorn":
            lines.append(f"(a) uvicorn: python -m decisionflow_serving (LocalModelBackend: one model call per request), "
                         f"pid {server['pid']}, port {server['port']}, ready in {server['start_s']:.1f} s; idle CPU "
                         f"{server.get('idle_cpu_percent', float('nan')):.1f}% of a core")
        else:
            lines.append(f"(b) ray: private head ({server['head_s']:.0f} s to start, attempt {server['attempts']}"
                         + (f", after {server['waited_s']:.0f} s waiting for a quieter machine" if server['waited_s'] >= 1
                            else "")
                         + f"; {os.cpu_count()} CPUs, token auth), Serve app deployed by RayServeHook (PUT /api/serve/applications/) "
                         f"in {server['deploy_s']:.0f} s (deployments: {', '.join(server['deployments'])}; model calls "
                         f"batched by @serve.batch, up to {server['batch']}), Serve HTTP on port {server['port']}; idle CPU "
                         f"{server.get('idle_cpu_percent', float('nan')):.1f}% of a core (all Ray processes)")
    for name, reason in results["unavailable"].items():
        lines.append(f"({'a' if name == 'uvicorn' else 'b'}) {name}: NOT AVAILABLE -- {reason}")
    check = results.get("same_model")
    if check:
        diff = check.get("max_abs_score_diff")
        lines.append(f"same model: a {check['rows']}-row request scored by version {sorted(set(check['versions'].values()))}"
                     + (f" on both servers, max |score diff| {diff:.2e}" if diff is not None else "")
                     + f"; bands {check['bands']}; 401 without a token on each")
    lines += [
        "latency = client-side wall time of one request on a keep-alive connection (send to last byte); QPS = "
        "timed 200 responses / timed seconds; srv CPU / cl. CPU = CPU ms per request (all sent, warm-up included) of "
        "the server's processes (every Ray process for ray) / of the client process (less than wall time shows when "
        "other jobs hold the cores)",
        "",
        f"{'server':<9}{'shape':<9}{'clients':>8}{'requests':>10}{'QPS':>9}{'rows/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}{'failed':>8}{'srv CPU':>9}{'cl. CPU':>9}  QPS per round",
        "-" * WIDTH,
    ]
    timings = results["timings"]
    for shape in ("single", "batch"):
        for name in SERVERS:
            s = timings.get(f"{name}/{shape}")
            if s is None:
                continue
            failed = sum(s["failures"].values())
            lines.append(f"{name:<9}{shape:<9}{s['clients']:>8}{s['requests']:>10,}{s['qps']:>9.1f}{s['rows_per_s']:>10,.0f}"
                         f"{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}{s['max_ms']:>9.1f}{failed:>8}"
                         f"{s['server_cpu_ms_per_request']:>9.2f}{s['client_cpu_ms_per_request']:>9.2f}  "
                         + " ".join(f"{q:.0f}" for q in s["round_qps"]))
            if failed:
                lines.append(f"{'':<9}failures {s['failures']}; first: {s['first_error']}")
    lines.append("-" * WIDTH)
    ray_single, bare_single = timings.get("ray/single"), timings.get("uvicorn/single")
    ray_batch, bare_batch = timings.get("ray/batch"), timings.get("uvicorn/batch")
    qps_ok = p99_ok = None
    if ray_single and bare_single:
        ratio = ray_single["qps"] / bare_single["qps"] if bare_single["qps"] else float("nan")
        results["ratios"] = {"qps": ratio, "p50": ray_single["p50_ms"] / bare_single["p50_ms"],
                             "p99": ray_single["p99_ms"] / bare_single["p99_ms"]}
        lines.append(f"ratio Ray/uvicorn, 1 txn/request: QPS {ratio:.2f}x, p50 {results['ratios']['p50']:.2f}x, "
                     f"p99 {results['ratios']['p99']:.2f}x")
        qps_ok = ratio >= QPS_RATIO_GOAL
    if ray_batch and bare_batch:
        batch_ratio = ray_batch["rows_per_s"] / bare_batch["rows_per_s"] if bare_batch["rows_per_s"] else float("nan")
        results.setdefault("ratios", {})["batch_rows_per_s"] = batch_ratio
        lines.append(f"ratio Ray/uvicorn, {args.batch} txns/request: rows/s {batch_ratio:.2f}x "
                     f"({ray_batch['rows_per_s']:,.0f} vs {bare_batch['rows_per_s']:,.0f} rows/s)")
    if ray_single:
        p99_ok = ray_single["p99_ms"] <= P99_GOAL_MS
    failed_total = sum(sum(s["failures"].values()) for s in timings.values())
    lines.append(f"failed requests: {failed_total} of {sum(s['requests'] for s in timings.values()) + failed_total:,}"
                 + ("" if not timings else "; every 200 named the model version(s) "
                    + str(sorted({v for s in timings.values() for v in s['versions']}))))
    lines.append("")
    for name, mem in results["memory"].items():
        label = ("Ray head + Serve running (every process of the head's session)" if name == "ray"
                 else "uvicorn gateway process")
        lines.append(f"memory {name:<8}: RSS {mem['rss_mib']:,.0f} MiB, PSS {mem['pss_mib']:,.0f} MiB over "
                     f"{mem['processes']} process(es) -- {label}")
        lines.append("    largest: " + "; ".join(f"{r['name'][:48]} {r['rss_mib']:.0f}" for r in mem["top"][:6]))
    if "ray" in results["memory"] and "uvicorn" in results["memory"]:
        lines.append(f"memory ratio Ray/uvicorn: RSS {results['memory']['ray']['rss_mib'] / results['memory']['uvicorn']['rss_mib']:.1f}x")
    lines.append("")
    missed = [label for label, ok in ((f"QPS >= {QPS_RATIO_GOAL}x bare", qps_ok), (f"p99 <= {P99_GOAL_MS:g} ms", p99_ok))
              if ok is False]
    results["missed"] = missed
    lines.append(f"goal Ray Serve QPS >= {QPS_RATIO_GOAL}x bare uvicorn QPS (16 clients, 1 txn/request): "
                 f"{_verdict(qps_ok)}" + (f" ({results['ratios']['qps']:.2f}x)" if qps_ok is not None else ""))
    lines.append(f"goal Ray Serve p99 <= {P99_GOAL_MS:g} ms (same load): {_verdict(p99_ok)}"
                 + (f" ({ray_single['p99_ms']:.1f} ms)" if ray_single else ""))
    if results["unavailable"]:
        lines.append("goals not judged for: " + ", ".join(results["unavailable"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.client_worker:
        return client_worker()
    os.environ.setdefault("DECISIONFLOW_HOME", str(ROOT))
    work = Path(tempfile.mkdtemp(prefix="df-bench-serving-"))
    results: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "servers": {}, "unavailable": {}, "memory": {}, "timings": {}}
    saved_env = dict(os.environ)
    report_out, sys.stdout = sys.stdout, sys.stderr  # Feast/MLflow/Airflow log to stdout: keep it for the report
    servers: dict[str, dict] = {}
    client = None
    try:
        import numpy as np

        print(f"work dir {work}; training + registering the model ...", file=sys.stderr, flush=True)
        model = setup_model(work, args.train_rows, args.seed)
        results["model"] = {k: v for k, v in model.items()}
        print(f"model {model['name']} v{model['version']} registered; gold + feast apply + materialize ...",
              file=sys.stderr, flush=True)
        features = setup_features(work, args)
        results["setup"] = {"features_s": features["seconds"], "account_rows": features["account_rows"],
                            "merchant_rows": features["merchant_rows"]}
        from decisionflow_serving.auth import ensure_first_token

        token = ensure_first_token(work).read_text().strip()
        settings = gateway_settings(work, model, features["feast_extra"])
        results["settings"] = settings

        rng = np.random.default_rng(args.seed + 7)
        payload_files = {}
        for shape, size, count in (("single", 1, 4000), ("batch", args.batch, 200)):
            payload_files[shape] = work / f"bodies-{shape}.json"
            payload_files[shape].write_text(json.dumps(bodies(features["ids"], rng, size, count, features["now"])))

        for name in args.start_order:
            print(f"starting the {name} gateway ...", file=sys.stderr, flush=True)
            try:
                server = start_uvicorn(work, settings) if name == "uvicorn" else start_ray(work, settings)
            except Exception as exc:  # noqa: BLE001 - reported, the other server is still measured
                reason = f"{type(exc).__name__}: {exc}"
                results["unavailable"][name] = reason[:4000]
                print(f"{name}: not available: {reason}", file=sys.stderr, flush=True)
                continue
            servers[name] = server
            info = {"pid": server["process"].pid, "port": server["port"], "start_s": server["start_s"]}
            if name == "ray":
                info.update(head_s=server["head_s"], deploy_s=server["deploy_s"], attempts=server["attempts"],
                            waited_s=server["waited_s"],
                            deployments=[d["name"] for app in server["config"]["applications"]
                                         for d in app.get("deployments", [])] or ["(as declared in code)"])
            if name == "ray":
                from decisionflow_serving import deployments

                info["batch"] = f"{deployments.MAX_BATCH_SIZE} requests / {deployments.BATCH_WAIT_S * 1000:g} ms wait"
            results["servers"][name] = info
        if not servers:
            raise RuntimeError("no server could be started: " + "; ".join(results["unavailable"].values()))

        results["same_model"] = same_model(servers, token, json.loads(payload_files["batch"].read_text())[0])
        client = Client(work / "client.log")
        for name, server in servers.items():  # what each costs doing nothing (Ray's GCS, raylet, dashboard...)
            pids = process_tree(server["process"].pid)
            cpu0, t0 = cpu_seconds(pids), time.perf_counter()
            time.sleep(args.idle_seconds)
            results["servers"][name]["idle_cpu_percent"] = 100 * (cpu_seconds(pids) - cpu0) / (time.perf_counter() - t0)
        results["load_before"] = _load()
        results["timings"] = measure(args, client, servers, token, payload_files)
        results["load_after"] = _load()
        for name, server in servers.items():  # after the load: models loaded, Serve running, buffers warm
            results["memory"][name] = memory(server["process"].pid)
        text = report(args, results)
        print(text, file=report_out, flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        if results["unavailable"]:
            return 2
        return 1 if args.check and results["missed"] else 0
    finally:
        sys.stdout = report_out
        if client is not None:
            client.close()
        for server in servers.values():
            stop_server(server)
        os.environ.clear()
        os.environ.update(saved_env)
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
