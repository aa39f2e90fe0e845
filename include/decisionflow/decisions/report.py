"""A readable account of the decisions made: a console summary and a self-contained HTML report with plots.

Both read the audit table (``gold/decisions``) and the labels in ``gold/transactions_enriched``; the HTML
embeds its plots as PNG data so the file can be mailed or opened anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from decisionflow import constants
from decisionflow.lakehouse.tables import join_path

if TYPE_CHECKING:
    import pandas as pd

DECISION_ORDER = ("approve", "review", "decline")
_COLOURS = {"approve": "#4c9f70", "review": "#e0a030", "decline": "#c8553d"}


def load_decisions(lake_root: str, storage_options: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Audit rows joined with the latest known label of their transaction (``label`` may be missing)."""
    from deltalake import DeltaTable

    options = dict(storage_options or {})
    decisions = DeltaTable(join_path(lake_root, constants.DECISIONS_TABLE), storage_options=options).to_pandas()
    gold = DeltaTable(join_path(lake_root, constants.GOLD_ENRICHED_TABLE), storage_options=options).to_pandas(
        columns=["event_id", "label", "amount", "channel", "country"])
    return decisions.merge(gold, on="event_id", how="left")


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _plots(frame: pd.DataFrame, evaluation: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots = []
    # Decision mix over event time (per day).
    day = frame["event_time"].dt.floor("D")
    mix = frame.groupby([day, "decision"]).size().unstack(fill_value=0).reindex(columns=DECISION_ORDER,
                                                                                fill_value=0)
    share = mix.div(mix.sum(axis=1), axis=0)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    bottom = np.zeros(len(share))
    for decision in DECISION_ORDER:
        ax.bar(share.index, share[decision], bottom=bottom, color=_COLOURS[decision], label=decision, width=0.8)
        bottom += share[decision].to_numpy()
    ax.set_ylabel("share of transactions")
    ax.set_title("Decision mix by day of event time")
    ax.legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    plots.append(("Decision mix over time", _png(fig)))

    # Score distribution by known outcome.
    fig, ax = plt.subplots(figsize=(8, 3.2))
    bins = np.linspace(0, 1, 41)
    for label, colour in (("legit", "#4c78a8"), ("fraud", "#c8553d")):
        scores = frame.loc[frame["label"] == label, "score"]
        if len(scores):
            ax.hist(scores, bins=bins, alpha=0.6, color=colour, label=f"{label} ({len(scores)})", density=True)
    unlabelled = frame.loc[frame["label"].isna(), "score"]
    if len(unlabelled):
        ax.hist(unlabelled, bins=bins, histtype="step", color="grey", label=f"no label yet ({len(unlabelled)})",
                density=True)
    ax.set_yscale("log")
    ax.set_xlabel("model score")
    ax.set_title("Score distribution by outcome")
    ax.legend(fontsize=8)
    plots.append(("Score distribution by outcome", _png(fig)))

    # Expected cost against the baselines.
    rows = (evaluation or {}).get("labels", {}).get("rows") if evaluation else None
    if rows:
        fig, ax = plt.subplots(figsize=(6, 2.8))
        names = [r["name"] for r in rows]
        costs = [r["expected_cost"] for r in rows]
        ax.barh(names, costs, color=["#4c78a8" if i == 0 else "#bbbbbb" for i in range(len(rows))])
        ax.set_xlabel("expected cost per transaction")
        ax.set_title("Policy vs baselines (labelled decisions)")
        plots.append(("Expected cost vs baselines", _png(fig)))
    return plots


def _reason_counts(frame: pd.DataFrame) -> Counter:
    counts: Counter = Counter()
    for codes in frame["reason_codes"]:
        counts.update(list(codes) if codes is not None else [])
    return counts


def _table(rows: list[Mapping[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(lake_root: str, path: str | Path, *, evaluation: Mapping[str, Any] | None = None,
                 storage_options: Mapping[str, str] | None = None) -> Path:
    """Write the HTML report to ``path``; returns it."""
    frame = load_decisions(lake_root, storage_options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mix = frame["decision"].value_counts().reindex(DECISION_ORDER, fill_value=0)
    sections = [f"<h1>decisionflow: {len(frame)} decisions</h1>",
                "<p>" + ", ".join(f"{d}: {int(mix[d])} ({mix[d] / max(len(frame), 1):.1%})" for d in DECISION_ORDER)
                + "</p>"]
    versions = frame.groupby(["model_name", "model_version", "policy_name", "policy_version"]).size()
    sections.append("<h2>Models and policies</h2>" + _table(
        [{"model": f"{m} v{v}", "policy": f"{p} {pv}", "decisions": int(n)} for (m, v, p, pv), n in versions.items()],
        ["model", "policy", "decisions"]))
    if evaluation:
        for source in ("labels", "truth"):
            block = evaluation.get(source)
            if block and block.get("rows"):
                sections.append(f"<h2>Quality against {html.escape(source)} ({block.get('n', '?')} decisions)</h2>"
                                + _table(block["rows"], list(block["rows"][0].keys())))
    for title, data in _plots(frame, evaluation):
        sections.append(f"<h2>{html.escape(title)}</h2><img src='data:image/png;base64,{data}'/>")
    top = _reason_counts(frame).most_common(10)
    sections.append("<h2>Top reason codes</h2>" + _table([{"reason code": c, "decisions": n} for c, n in top],
                                                         ["reason code", "decisions"]))
    examples = example_rows(frame)
    sections.append("<h2>Example audit rows</h2>" + "".join(
        f"<pre>{html.escape(json.dumps(row, indent=2, default=str))}</pre>" for row in examples))
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}pre{background:#f6f6f6;padding:8px;"
             "font-size:12px;overflow:auto}")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>decisionflow decisions</title>"
                    f"<style>{style}</style></head><body>{''.join(sections)}</body></html>", encoding="utf-8")
    return path


def example_rows(frame: pd.DataFrame, per_decision: int = 1) -> list[dict[str, Any]]:
    """One audit row per decision kind (the highest score for review/decline), JSON fields decoded."""
    out = []
    for decision in DECISION_ORDER:
        subset = frame[frame["decision"] == decision]
        if subset.empty:
            continue
        subset = subset.sort_values("score", ascending=decision == "approve")
        for row in subset.head(per_decision).to_dict("records"):
            for key in ("features", "similar_cases"):
                try:
                    row[key] = json.loads(row[key])
                except (TypeError, ValueError):
                    pass
            row = {k: (list(v) if hasattr(v, "tolist") and not isinstance(v, str) else v) for k, v in row.items()}
            out.append(row)
    return out


_ROW_FORMAT = "{:<16}{:>9}{:>9}{:>9}{:>11}{:>13}{:>14}{:>10}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def print_summary(lake_root: str, summary: Mapping[str, Any], evaluation: Mapping[str, Any] | None = None,
                  log: Callable[[str], None] = print, storage_options: Mapping[str, str] | None = None) -> None:
    """The console summary of the demo: mix, cost against the baselines, reason codes, one example row."""
    frame = load_decisions(lake_root, storage_options)
    mix = frame["decision"].value_counts().reindex(DECISION_ORDER, fill_value=0)
    log(f"\n== {len(frame)} decisions in {constants.DECISIONS_TABLE} ==")
    log("  mix: " + ", ".join(f"{d} {int(mix[d])} ({mix[d] / max(len(frame), 1):.1%})" for d in DECISION_ORDER))
    model, policy = summary.get("model") or {}, summary.get("policy") or {}
    log(f"  model {model.get('name')} v{model.get('version')}, policy {policy.get('name')} {policy.get('version')}")
    for source in ("labels", "truth"):
        block = (evaluation or {}).get(source)
        if block and block.get("rows"):
            log(f"  against {source} ({block.get('n')} decisions, {block.get('fraud')} fraud):")
            log("    " + _ROW_FORMAT.format("", "approve", "review", "decline", "decl.prec", "decl.recall",
                                           "fraud caught", "cost/txn"))
            for row in block["rows"]:
                log("    " + _ROW_FORMAT.format(row["name"], *(_share(row[k]) for k in (
                    "approve_rate", "review_rate", "decline_rate", "decline_precision", "decline_recall",
                    "fraud_caught")), "-" if row["expected_cost"] is None else f"{row['expected_cost']:.3f}"))
    log("  top reason codes: " + ", ".join(f"{c} ({n})" for c, n in _reason_counts(frame).most_common(5)))
    for row in example_rows(frame)[-1:]:
        log("  example audit row: " + json.dumps(row, default=str)[:1500])
