"""``decisionflow`` command line: run the local stack and manage its settings.

    decisionflow up [COMPONENT ...]      start (idempotent) and wait for health
    decisionflow down [COMPONENT ...]    stop what `up` started, by PID
    decisionflow status                  each component, its URL, health and memory
    decisionflow logs [COMPONENT] [-n N] [-f]
    decisionflow env                     shell exports for the airflow CLI against this stack
    decisionflow settings validate|load [--file F]
    decisionflow trigger DAG_ID [--wait] [--timeout S]   unpause + trigger through the REST API
    decisionflow retry DAG [RUN] [--yes] [--wait]   show what clearing the failed tasks of RUN (default: the
                                         latest failed run) and their downstream would reset; --yes clears it
    decisionflow produce --events N --rate R --seed S ...  seeded transaction-risk events into Kafka
    decisionflow demo [--events N]       the whole loop: events -> ... -> decisions, a summary and a report
    decisionflow policy validate FILE    check a decision policy file (names file, rule and field on error)
    decisionflow policy backtest --policy FILE [--lake ROOT] [--model-version V | --scores PARQUET |
                                 --generated N] [--since T] [--until T] [--json]
                                         replay a policy over labelled history beside two baselines
    decisionflow review list [--all] [--lake ROOT]        open and in-review cases of the review queue
    decisionflow review answer DECISION_ID --decision approve|decline|escalate [--note TEXT] [--by NAME]
                                         answer a case: through its open HITL task (REST API) if it has one,
                                         else applied directly (audit, actions, label, case note)
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

from decisionflow import constants


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
    wanted = args.components or None
    if not args.paused and (wanted is None or "airflow" in wanted):
        # Parsed and unpaused: an event produced now flows to a decision with no clicks.
        from decisionflow.airflow_client import AirflowApiError, AirflowClient
        from decisionflow.demo import activate_loop

        try:
            activate_loop(AirflowClient.for_local_stack(stack.ctx))
        except AirflowApiError as exc:
            print(f"decisionflow up: the loop DAGs could not be activated -- {exc}", file=sys.stderr)
            return 1
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


def cmd_retry(args) -> int:
    from decisionflow.airflow_client import AirflowApiError, AirflowClient
    from decisionflow.retry import RetryError, apply_retry, label, plan_retry

    try:
        client = AirflowClient.from_env(args.url, args.user, args.password)
        plan = plan_retry(client, args.dag_id, args.run_id)
        print(plan.format())
        if not args.yes:
            print(f"\ndry run: nothing cleared. To clear these and re-run them: decisionflow retry {plan.dag_id} "
                  f"{plan.run_id} --yes")
            return 0
        cleared = apply_retry(client, plan)
        print(f"\ncleared {len(cleared)} task instance(s): {', '.join(sorted(label(t) for t in cleared))}")
        if not args.wait:
            print(f"the scheduler re-runs them; follow with: decisionflow retry {plan.dag_id} {plan.run_id} (or the "
                  f"UI: {client.base_url}/dags/{plan.dag_id}/runs/{plan.run_id})")
            return 0
        state = client.wait_for_run(plan.dag_id, plan.run_id, timeout=args.timeout, log=print)
    except (RetryError, AirflowApiError) as exc:
        print(f"decisionflow retry: {exc}", file=sys.stderr)
        return 1
    print(f"{plan.dag_id} {plan.run_id}: {state}")
    return 0 if state == "success" else 1


def _policy(path):
    from decisionflow.decisions.policy import SHIPPED_POLICY, Policy

    return Policy.load(path or SHIPPED_POLICY)


def cmd_policy_validate(args) -> int:
    from decisionflow.decisions.policy import PolicyError

    try:
        policy = _policy(args.file)
    except PolicyError as exc:
        print(f"policy INVALID -- {exc}", file=sys.stderr)
        return 1
    print(f"{policy.source}: policy {policy.name} {policy.version} OK (sha256 {policy.content_hash})")
    print(f"  {len(policy.rules)} rules: {', '.join(r.id for r in policy.rules)}")
    print(f"  similar-case rule: {'yes' if policy.similar_cases else 'no'}; review budget: "
          f"{policy.review_budget.share if policy.review_budget.share is not None else policy.review_budget.count}"
          f" (overflow -> {policy.review_budget.overflow_decision}); {len(policy.reason_codes)} reason codes")
    return 0


def _parse_thresholds(text: str):
    from decisionflow.decisions.costs import Thresholds

    try:
        review, decline = (float(v) for v in text.split(","))
        return Thresholds(review=review, decline=decline)
    except ValueError as exc:
        raise SystemExit(f"--thresholds must be REVIEW,DECLINE (e.g. 0.1,0.6): {exc}") from None


def _champion_thresholds(tracking_uri: str, model_name: str, version: str | None):
    from decisionflow.constants import CHAMPION_ALIAS
    from decisionflow.decisions.backtest import BacktestInputError
    from decisionflow.models.pipeline import MODEL
    from decisionflow.models.tracking import mlflow_client, read_thresholds

    client = mlflow_client(tracking_uri)
    try:
        mv = (client.get_model_version(model_name, version) if version
              else client.get_model_version_by_alias(model_name, CHAMPION_ALIAS))
        return read_thresholds(client, mv.run_id)[MODEL]
    except Exception as exc:  # noqa: BLE001 - any MLflow / connection error: say which layer and the remedy
        raise BacktestInputError(f"[mlflow] no thresholds for {model_name} "
                                 f"{version or '@' + CHAMPION_ALIAS} at {tracking_uri}: {exc} -- remedy: pass "
                                 "--thresholds REVIEW,DECLINE with --scores, or --tracking-uri") from exc


def cmd_policy_backtest(args) -> int:
    import json

    from decisionflow.decisions import backtest as bt
    from decisionflow.decisions.policy import PolicyError

    try:
        policy = _policy(args.policy)
        if args.generated:
            report = bt.generated_backtest(policy, events=args.generated, seed=args.seed, truth=args.truth)
        else:
            from decisionflow import config
            from decisionflow.constants import MODEL_NAME

            lake = args.lake or str(config.resolve_path("${DECISIONFLOW_DATA}/lake"))
            history = bt.read_history(lake, since=args.since, until=args.until)
            labelled = bt.labelled_history(history, as_of=args.as_of, label_maturity_days=args.label_maturity_days,
                                           truth=args.truth)
            if labelled.empty:
                print(f"policy backtest: no labelled (or mature unlabelled) transaction in {lake} "
                      f"between {args.since or '-'} and {args.until or '-'}", file=sys.stderr)
                return 1
            model_name = args.model_name or MODEL_NAME
            source = {"lake": lake, "since": args.since, "until": args.until, "rows_read": len(history)}
            if args.scores:
                scores = bt.scores_from_file(labelled, args.scores)
                thresholds = (_parse_thresholds(args.thresholds) if args.thresholds
                              else _champion_thresholds(args.tracking_uri, model_name, args.model_version))
                source["scores"] = args.scores
            else:
                scores, thresholds, info = bt.champion_scores(labelled, args.tracking_uri, model_name,
                                                              args.model_version)
                if args.thresholds:
                    thresholds = _parse_thresholds(args.thresholds)
                source.update(info)
            run_key = None
            if args.run_every:
                import pandas as pd

                labelled = labelled.assign(_run=pd.to_datetime(labelled["event_time"], utc=True)
                                           .dt.floor(args.run_every))
                run_key = "_run"
            report = bt.backtest(policy, labelled, scores, thresholds, run_key=run_key)
            report.source = source
    except (PolicyError, bt.BacktestInputError, ValueError) as exc:
        print(f"policy backtest FAILED -- {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True, default=str))
    else:
        print(report.format_table())
    return 0


# -- review -----------------------------------------------------------------------------------------------------
REVIEW_DAG = "review_decisions"


def _lake_root(args) -> str:
    from decisionflow import config

    return args.lake or str(config.resolve_path("${DECISIONFLOW_DATA}/lake"))


def cmd_review_list(args) -> int:
    from decisionflow.decisions import review_queue

    statuses = None if args.all else [review_queue.OPEN, review_queue.IN_REVIEW]
    frame = review_queue.read_queue(_lake_root(args), statuses=statuses)
    if frame.empty:
        print("no review cases" + ("" if args.all else " open or in review"))
        return 0
    print(f"{'decision_id':<36}  {'status':<9}  {'score':>6}  {'queued_at':<19}  {'review task / resolution':<40}  "
          "reason codes")
    for row in frame.head(args.limit).itertuples():
        if row.status == review_queue.IN_REVIEW:
            where = f"{row.review_run_id}[{int(row.review_map_index)}]"
        elif row.status in review_queue.FINAL:
            where = f"{row.resolution} by {row.resolved_by} ({row.review_source})"
        else:
            where = "-"
        print(f"{row.decision_id:<36}  {row.status:<9}  {row.score:>6.3f}  {str(row.queued_at)[:19]:<19}  "
              f"{where[:40]:<40}  {','.join(row.reason_codes if row.reason_codes is not None else [])}")
    if len(frame) > args.limit:
        print(f"... {len(frame) - args.limit} more (--limit)")
    return 0


def _open_hitl_task(client, queued: dict) -> dict | None:
    """The HITL detail of the case's review task when it exists in Airflow (None: no task for it)."""
    from decisionflow.airflow_client import AirflowApiError

    run_id, index = queued.get("review_run_id"), queued.get("review_map_index")
    if queued.get("status") != "in_review" or not run_id or index is None or index != index:  # NaN: no claim
        return None
    try:
        return client.request("GET", f"/dags/{REVIEW_DAG}/dagRuns/{run_id}/taskInstances/review_case.review/"
                                      f"{int(index)}/hitlDetails")
    except AirflowApiError as exc:
        if "404" in str(exc):
            return None
        raise


def answer_case(lake_root: str, decision_id: str, decision: str, note: str | None, by: str, client=None,
                log=print) -> dict:
    """
    ``decisionflow review answer``: through the case's HITL task when it waits for an answer (PATCH
    hitlDetails: the apply task records it, the reviewer being the Airflow user the client is logged in as),
    else applied here. Raises :class:`~decisionflow.decisions.review.ReviewError` for an unknown, not-review or
    already answered case.
    """
    from datetime import datetime, timezone

    from decisionflow.decisions.review import ReviewAnswer, ReviewError, apply_review, check_answerable

    row, queued = check_answerable(lake_root, decision_id)
    if row.get("review_decision") is not None or queued.get("status") in ("resolved", "escalated"):
        what = row.get("review_decision") or queued.get("resolution")
        who = row.get("reviewed_by") or queued.get("resolved_by")
        when = row.get("reviewed_at") or queued.get("resolved_at")
        how = row.get("review_source") or queued.get("review_source")
        raise ReviewError(f"decision {decision_id} is already resolved: {what} by {who} at {when} (via {how}); "
                          "nothing changed", decision_id)
    if client is not None:
        detail = _open_hitl_task(client, queued)
        if detail is not None:
            where = f"{REVIEW_DAG} run {queued['review_run_id']} task review_case.review[{int(queued['review_map_index'])}]"
            if detail.get("response_received"):
                user = (detail.get("responded_by_user") or {}).get("name", "the timeout")
                raise ReviewError(f"decision {decision_id} was already answered in Airflow ({where}): "
                                  f"{detail.get('chosen_options')} by {user} at {detail.get('responded_at')}; its "
                                  "apply task records it", decision_id)
            client.request("PATCH", f"/dags/{REVIEW_DAG}/dagRuns/{queued['review_run_id']}/taskInstances/"
                                    f"review_case.review/{int(queued['review_map_index'])}/hitlDetails",
                           json={"chosen_options": [decision], "params_input": {"note": note or ""}})
            log(f"answered {decision} in Airflow ({where}); its apply task records it")
            return {"via": "hitl", "decision_id": decision_id, "task": where}
    from decisionflow import config, constants
    from decisionflow.decisions.outbox import deliver_kafka, deliver_webhook
    from decisionflow.decisions.policy import SHIPPED_POLICY, Policy
    from decisionflow.decisions.review import KafkaReviewEvents, ReviewPorts

    kafka = {"bootstrap.servers": f"{config.HOST}:{config.port('kafka')}"}
    webhook = f"http://{config.HOST}:{config.port('webhook')}/actions"
    ports = ReviewPorts(deliverers=[("kafka", lambda box: deliver_kafka(box, kafka, topic=constants.DECISIONS_TOPIC)),
                                    ("webhook", lambda box: deliver_webhook(box, webhook))],
                        events=KafkaReviewEvents(kafka))
    answer = ReviewAnswer(decision_id, decision, by, datetime.now(timezone.utc), note, "cli")
    result = apply_review(lake_root, answer, Policy.load(SHIPPED_POLICY), ports)
    log(f"applied {decision} by {by}: actions {result.actions or 'none'}; events {result.events_sent}")
    return {"via": "cli", **result.as_dict()}


def cmd_review_answer(args) -> int:
    import getpass

    from decisionflow.airflow_client import AirflowApiError, AirflowClient
    from decisionflow.decisions.review import ReviewError

    client = None
    try:
        client = AirflowClient.for_local_stack()
    except AirflowApiError as exc:
        print(f"(Airflow not reachable, applying directly: {exc})", file=sys.stderr)
    try:
        answer_case(_lake_root(args), args.decision_id, args.decision, args.note, args.by or getpass.getuser(),
                    client=client)
    except ReviewError as exc:
        print(f"review answer REFUSED -- {exc}", file=sys.stderr)
        return 1
    except AirflowApiError as exc:
        print(f"review answer FAILED -- {exc}", file=sys.stderr)
        return 1
    return 0


def _mlflow_port() -> int:
    from decisionflow import config

    return config.port("mlflow")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decisionflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the local stack")
    up.add_argument("components", nargs="*")
    up.add_argument("--timeout", type=float, default=None, help="seconds to wait for each component's health")
    up.add_argument("--paused", action="store_true",
                    help="leave the loop's DAGs paused (default: wait until they are parsed, then unpause them)")
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
    sub.add_parser("demo", help="the whole loop on the local stack, ending in decisions and a report (see "
                                "`demo --help`)", add_help=False)
    policy = sub.add_parser("policy", help="validate or backtest a decision policy file")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    validate = policy_sub.add_parser("validate", help="check a policy file")
    validate.add_argument("file", nargs="?", help="policy YAML (default: the shipped transaction_risk.yaml)")
    validate.set_defaults(func=cmd_policy_validate)
    backtest = policy_sub.add_parser(
        "backtest", help="replay a policy over labelled history beside approve-all and the thresholds alone")
    backtest.add_argument("--policy", help="policy YAML (default: the shipped transaction_risk.yaml)")
    backtest.add_argument("--lake", help="lake root (default ${DECISIONFLOW_DATA}/lake)")
    source = backtest.add_mutually_exclusive_group()
    source.add_argument("--model-version", help="score with this registered version (default: @champion)")
    source.add_argument("--scores", help="parquet with event_id, score instead of scoring with a model")
    source.add_argument("--generated", type=int, metavar="N",
                        help="no lake or MLflow: N seeded generated events, a model trained on the older rows")
    backtest.add_argument("--seed", type=int, default=0, help="generator seed with --generated")
    backtest.add_argument("--truth", action="store_true",
                          help="label with the generator's hidden truth (generated data only)")
    backtest.add_argument("--thresholds", metavar="REVIEW,DECLINE",
                          help="the champion's thresholds (default: read from its MLflow training run)")
    backtest.add_argument("--since", help="first event_time (inclusive, ISO 8601)")
    backtest.add_argument("--until", help="last event_time (exclusive, ISO 8601)")
    backtest.add_argument("--as-of", help="labels known at this time (default: now)")
    backtest.add_argument("--label-maturity-days", type=float, default=30.0,
                          help="an unlabelled transaction this old counts as legit (default %(default)s)")
    backtest.add_argument("--run-every", metavar="FREQ",
                          help="apply the review budget per run of this length (pandas frequency, e.g. 1h); "
                               "default: the whole history is one run")
    backtest.add_argument("--tracking-uri", default=f"http://127.0.0.1:{_mlflow_port()}",
                          help="MLflow tracking URI (default %(default)s)")
    backtest.add_argument("--model-name", help="registered model (default decisionflow-risk)")
    backtest.add_argument("--json", action="store_true", help="machine-readable output")
    backtest.set_defaults(func=cmd_policy_backtest)
    review = sub.add_parser("review", help="list or answer human review cases")
    review_sub = review.add_subparsers(dest="review_command", required=True)
    listing = review_sub.add_parser("list", help="open and in-review cases, riskiest first")
    listing.add_argument("--all", action="store_true", help="resolved and escalated cases too")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--lake", help="lake root (default ${DECISIONFLOW_DATA}/lake)")
    listing.set_defaults(func=cmd_review_list)
    answer = review_sub.add_parser("answer", help="answer a review case (its HITL task if open, else directly)")
    answer.add_argument("decision_id")
    answer.add_argument("--decision", required=True, choices=list(constants.REVIEW_ANSWERS))
    answer.add_argument("--note", help="becomes a case note of the transaction")
    answer.add_argument("--by", help="who answers when applied directly (default: the OS user); through a HITL "
                                     "task the Airflow user is recorded")
    answer.add_argument("--lake", help="lake root (default ${DECISIONFLOW_DATA}/lake)")
    answer.set_defaults(func=cmd_review_answer)
    trigger = sub.add_parser("trigger", help="unpause and trigger a DAG through the REST API")
    trigger.add_argument("dag_id")
    trigger.add_argument("--wait", action="store_true", help="wait for the run to finish; non-zero unless success")
    trigger.add_argument("--timeout", type=float, default=1200)
    trigger.set_defaults(func=cmd_trigger)
    retry = sub.add_parser(
        "retry", help="clear a run's failed tasks and their downstream (upstream_failed included) to re-run them",
        description="Show what clearing the failed and upstream_failed task instances of a run, and everything "
                    "downstream of them, would reset (a dry run through the REST API); with --yes, clear them so "
                    "the scheduler re-runs them. Airflow: $DECISIONFLOW_AIRFLOW_URL / _USER / _PASSWORD, "
                    "else the local stack.")
    retry.add_argument("dag_id", metavar="DAG")
    retry.add_argument("run_id", metavar="RUN", nargs="?", help="run id (default: the latest failed run)")
    retry.add_argument("--yes", action="store_true", help="really clear (default: only show the plan)")
    retry.add_argument("--wait", action="store_true", help="with --yes: wait for the run; non-zero unless success")
    retry.add_argument("--timeout", type=float, default=1800, help="seconds --wait waits (default %(default)s)")
    retry.add_argument("--url", help="Airflow base URL (default $DECISIONFLOW_AIRFLOW_URL, else the local stack)")
    retry.add_argument("--user", help="Airflow user (default $DECISIONFLOW_AIRFLOW_USER or admin)")
    retry.add_argument("--password", help="Airflow password (default $DECISIONFLOW_AIRFLOW_PASSWORD)")
    retry.set_defaults(func=cmd_retry)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from decisionflow.demo import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] == ["produce"]:
        # The generator owns its (long) option list; see `decisionflow produce --help`.
        from decisionflow.risk.generator import main as produce_main

        return produce_main(argv)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
