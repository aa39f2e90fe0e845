"""``decisionflow`` command line: run the local stack and manage its settings.

    decisionflow up [COMPONENT ...]      start (idempotent) and wait for health
    decisionflow down [COMPONENT ...]    stop what `up` started, by PID
    decisionflow status                  each component, its URL, health and memory
    decisionflow logs [COMPONENT] [-n N] [-f]
    decisionflow env                     shell exports for the airflow CLI against this stack
    decisionflow settings validate|load [--file F]
    decisionflow trigger DAG_ID [--wait] [--timeout S]   unpause + trigger through the REST API
    decisionflow produce --events N --rate R --seed S ...  seeded transaction-risk events into Kafka
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys


def _stack():
    from decisionflow.stack import Stack

    return Stack()


def cmd_up(args) -> int:
    from decisionflow.stack import ServiceError, format_status

    stack = _stack()
    print("decisionflow: starting the local stack (logs in", stack.ctx.log_dir, ")")
    try:
        elapsed = stack.up(args.components or None, timeout=args.timeout)
    except ServiceError as exc:
        print(f"decisionflow up FAILED -- {exc}", file=sys.stderr)
        print("see `decisionflow logs <component>`; `make down` stops what did start", file=sys.stderr)
        return 1
    print(f"all healthy in {elapsed:.0f}s\n")
    print(format_status(stack.status()))
    return 0


def cmd_down(args) -> int:
    stack = _stack()
    stopped = stack.down(args.components or None)
    left = stack.listeners_left(args.components or None)
    if left:
        print(f"still listening after down (not started by this stack?): {left}", file=sys.stderr)
        return 1
    print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return 0


def cmd_status(args) -> int:
    from decisionflow.stack import format_status

    rows = _stack().status()
    print(format_status(rows))
    return 0 if all(r.running and r.health.ok for r in rows) else 3


def cmd_logs(args) -> int:
    stack = _stack()
    services = stack.select([args.component] if args.component else None)
    if args.follow:
        paths = [str(s.log_path) for s in services if s.log_path.exists()]
        return subprocess.call(["tail", "-n", str(args.lines), "-F", *paths])  # noqa: S603,S607
    for service in services:
        if not service.log_path.exists():
            continue
        print(f"==> {service.log_path} <==")
        lines = service.log_path.read_text(errors="replace").splitlines()[-args.lines:]
        print("\n".join(lines))
    return 0


def cmd_env(args) -> int:
    for key, value in sorted(_stack().environment().items()):
        print(f"export {key}={shlex.quote(value)}")
    return 0


def cmd_settings(args) -> int:
    # The settings loader talks to Airflow's DB: point Airflow at the local stack unless told otherwise.
    if "AIRFLOW_HOME" not in os.environ:
        os.environ.update(_stack().environment())
    from decisionflow.settings.airflow_settings import main as settings_main

    argv = [args.action] + (["--file", args.file] if args.file else [])
    return settings_main(argv)


def cmd_trigger(args) -> int:
    from decisionflow.airflow_client import AirflowApiError, AirflowClient

    try:
        client = AirflowClient.for_local_stack()
        client.wait_for_dag(args.dag_id)
        client.unpause(args.dag_id)
        run_id = client.trigger(args.dag_id)
        print(f"triggered {args.dag_id}: run {run_id}  ({client.base_url}/dags/{args.dag_id})")
        if not args.wait:
            return 0
        state = client.wait_for_run(args.dag_id, run_id, timeout=args.timeout, log=print)
    except AirflowApiError as exc:
        print(f"decisionflow trigger: {exc}", file=sys.stderr)
        return 1
    print(f"{args.dag_id} {run_id}: {state}")
    if state != "success":
        failed = [t for t, s in client.task_states(args.dag_id, run_id).items() if s != "success"]
        print(f"failed tasks: {failed}; open the UI or `decisionflow logs` for the cause", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decisionflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the local stack")
    up.add_argument("components", nargs="*")
    up.add_argument("--timeout", type=float, default=None, help="seconds to wait for each component's health")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop the local stack")
    down.add_argument("components", nargs="*")
    down.set_defaults(func=cmd_down)
    sub.add_parser("status", help="component health, URLs, memory").set_defaults(func=cmd_status)
    logs = sub.add_parser("logs", help="show component logs")
    logs.add_argument("component", nargs="?")
    logs.add_argument("-n", "--lines", type=int, default=40)
    logs.add_argument("-f", "--follow", action="store_true")
    logs.set_defaults(func=cmd_logs)
    sub.add_parser("env", help="shell exports for this stack").set_defaults(func=cmd_env)
    settings = sub.add_parser("settings", help="validate or load airflow_settings.yaml")
    settings.add_argument("action", choices=["validate", "load"])
    settings.add_argument("--file")
    settings.set_defaults(func=cmd_settings)
    sub.add_parser("produce", help="seeded transaction-risk events into Kafka (see `produce --help`)", add_help=False)
    trigger = sub.add_parser("trigger", help="unpause and trigger a DAG through the REST API")
    trigger.add_argument("dag_id")
    trigger.add_argument("--wait", action="store_true", help="wait for the run to finish; non-zero unless success")
    trigger.add_argument("--timeout", type=float, default=1200)
    trigger.set_defaults(func=cmd_trigger)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["produce"]:
        # The generator owns its (long) option list; see `decisionflow produce --help`.
        from decisionflow.risk.generator import main as produce_main

        return produce_main(argv)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
