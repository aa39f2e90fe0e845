"""The decision policy: a declarative, versioned YAML file turned into vectorised approve / review / decline.

A policy file (the shipped one is ``decisionflow/policies/transaction_risk.yaml``) declares:

* ``name``, ``version`` (declared by its authors, e.g. ``"2026.12.1"``), ``description``;
* ``bands`` - the score bands, from the champion's thresholds (logged by its training run) with an optional
  ``offset`` or an absolute ``value`` override, each with the reason code it gives;
* ``rules`` - hard rules over declared transaction and feature columns (never ``memo`` or any free text);
* ``similar_cases`` - the fraud share among the top-k similar past cases with a known outcome, and
  ``search_when``: which rows need a similar-case search at all;
* ``missing_features`` - what a missing (NULL) feature or score does: never a silent approve;
* ``review_budget`` - how many reviews a run may create; the overflow, ranked by score, gets a declared outcome;
* ``actions`` per outcome, the ``reason_codes`` catalogue (every code used must be declared), ``costs``.

Precedence, in this order (deterministic, no row depends on another except through the budget):

1. **band**: the score alone (``decline`` from the decline threshold on, ``review`` from the review threshold).
2. **override rules** (``override: true``): the first matching one in file order *sets* the decision, which
   may be milder than the band (an allow-list); the only way a decision gets milder.
3. **raising rules** (every other rule): the decision becomes the strictest of itself and each matching rule's
   outcome (``decline`` or ``at_least: review``) - they never make a decision milder.
4. **similar cases**: a known-outcome fraud share at or above the threshold raises to the rule's outcome.
5. **missing features / score**: raises to at least ``review`` (with its reason code).
6. **review budget**: reviews beyond the budget that are not exempt (missing features, rules with
   ``budget_exempt: true``) become ``overflow_decision``, lowest scores first (the highest-scoring reviews stay).

Schema (unknown keys are rejected by name at every level)::

    name: str                     version: "str" (quoted)           description: str (optional)
    bands:                        # thresholds from the champion's; review > decline is clipped to decline
      approve: {reason_code: CODE}
      review:  {reason_code: CODE, offset: float | value: float}    # offset on the champion's, or absolute
      decline: {reason_code: CODE, offset: float | value: float}
    rules:                        # optional list, evaluated in file order
      - id: snake_case            # unique
        description: str          # optional
        when: CONDITION           # {field, op, value} | {all: [CONDITION, ...]} | {any: [CONDITION, ...]}
        outcome: decline | {at_least: review|decline} | approve|review (only with override: true)
        override: false           # true: sets the outcome exactly, even milder (first matching override wins)
        budget_exempt: false      # true: its reviews are never dropped by the budget
        reason_code: CODE
    # CONDITION field: amount currency mcc channel country device_id ip, a gold feature, or score (never memo);
    #   op: eq ne lt le gt ge (numbers only) in not_in (non-empty list) is_null not_null (no value);
    #   values of text fields must be strings ("5411"), of numeric fields finite numbers.
    similar_cases:                # optional
      k: int                      # top-k similar cases considered (best first)
      min_known: int              # fewest of them with a known outcome (fraud | legit) to judge
      fraud_share_at_least: float # fraud / known at or above this escalates
      outcome: {at_least: review} | decline
      reason_code: CODE
      search_when: {score_from_review_factor: float | null, below_decline: true, rule_hits: true}
    missing_features: {required: [feature, ...], outcome: {at_least: review} | decline, reason_code: CODE}
    review_budget: {share: float | count: int, min_count: int, overflow_decision: approve | decline,
                    overflow_reason_code: CODE, overflow_actions: [action, ...]}
    actions: {approve: [action, ...], review: [...], decline: [...]}     # action names: snake_case
    reason_codes: {CODE: description, ...}   # UPPER_SNAKE; every code used above must be declared here
    costs: {missed_fraud: float, review: float, false_decline: float}   # CostModel
    escalation:                   # optional: what the escalation agent may do (defaults below)
      allowed: {approve: [decision, ...], review: [...]}   # by score band: the decisions it may recommend
      never_approve_with: [CODE, ...]    # reason codes that take approve out of the allowed set
      budget_per_run: int         # cases per run the agent sees, riskiest first; the rest go to human review
      max_model_calls: int        # per case
      max_tool_calls: int         # per case
      case_timeout_seconds: float # per case, wall clock
    human_review:                 # optional: Airflow HITL review tasks (defaults below)
      tasks_per_run: int          # review tasks raised per decision run, riskiest open cases first
      response_timeout_hours: float
      on_timeout: approve | decline          # the default answer when nobody answers (never a label)
      actions: {approve: [action, ...], decline: [action, ...]}   # what the reviewer's answer triggers

Conditions follow SQL on NULL: every comparison with a NULL value is false (``ne`` and ``not_in`` too); only
``is_null`` matches it. A malformed file fails at :meth:`Policy.load` with :class:`PolicyError` naming the
file, the rule (index and id) and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from decisionflow import constants
from decisionflow.decisions.costs import DECISIONS, NEVER, ConfigError, CostModel, Thresholds
from decisionflow.exceptions import NonRetryableError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DECISIONS",
    "NEVER",
    "OPS",
    "SHIPPED_POLICY",
    "TRANSACTION_FIELDS",
    "REVIEW_ANSWERS",
    "Condition",
    "CostModel",
    "EscalationRules",
    "HumanReviewRules",
    "Policy",
    "PolicyDecisions",
    "PolicyError",
    "Rule",
    "Thresholds",
    "declared_fields",
]

#: The policy shipped with the package.
SHIPPED_POLICY = Path(__file__).resolve().parent.parent / "policies" / "transaction_risk.yaml"

#: Columns of the transaction itself a rule may reference (``memo`` is free text: it never decides anything).
TRANSACTION_FIELDS: tuple[str, ...] = ("amount", "currency", "mcc", "channel", "country", "device_id", "ip")
_STRING_FIELDS = frozenset({"currency", "mcc", "channel", "country", "device_id", "ip"})
#: The model score is a field too (e.g. "a large amount AND a score above 0.1").
SCORE_FIELD = "score"

#: Condition operators.
OPS: tuple[str, ...] = ("eq", "ne", "lt", "le", "gt", "ge", "in", "not_in", "is_null", "not_null")
_ORDER_OPS = frozenset({"lt", "le", "gt", "ge"})
_LIST_OPS = frozenset({"in", "not_in"})
_NULL_OPS = frozenset({"is_null", "not_null"})

_SEVERITY = {d: i for i, d in enumerate(DECISIONS)}
_CODE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_ACTION = re.compile(r"^[a-z][a-z0-9_]*$")
_RULE_ID = re.compile(r"^[a-z][a-z0-9_]*$")

_TOP_KEYS = ("name", "version", "description", "bands", "rules", "similar_cases", "missing_features",
             "review_budget", "actions", "reason_codes", "costs", "escalation", "human_review")
_REQUIRED_TOP = ("name", "version", "bands", "actions", "reason_codes", "costs", "review_budget")


class PolicyError(NonRetryableError, ValueError):
    """A policy file is malformed, or a batch does not fit the policy; the message names file, rule and field."""


def declared_fields() -> tuple[str, ...]:
    """Every column a rule may reference: the transaction's own, the gold features, and ``score``."""
    from decisionflow.models.config import GOLD_FEATURE_COLUMNS  # models.config: small; no training code runs

    return (*TRANSACTION_FIELDS, *GOLD_FEATURE_COLUMNS, SCORE_FIELD)


# -- the parsed file --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    """One condition ``field op value``, or a combination: ``all`` / ``any`` of child conditions."""

    field: str | None = None
    op: str | None = None
    value: Any = None
    all: tuple[Condition, ...] = ()
    any: tuple[Condition, ...] = ()

    def fields(self) -> set[str]:
        """The columns this condition reads."""
        own = {self.field} if self.field else set()
        return own.union(*(c.fields() for c in (*self.all, *self.any)))

    def mask(self, columns: Mapping[str, Any], n: int) -> np.ndarray:
        """Bool mask of the rows this condition holds for (NULL compares false)."""
        if self.all:
            out = np.ones(n, dtype=bool)
            for child in self.all:
                out &= child.mask(columns, n)
            return out
        if self.any:
            out = np.zeros(n, dtype=bool)
            for child in self.any:
                out |= child.mask(columns, n)
            return out
        values, null = columns[self.field]
        op = self.op
        if op == "is_null":
            return null.copy()
        if op == "not_null":
            return ~null
        if op in _LIST_OPS:
            import pandas as pd

            # hash-based (pandas), not np.isin: that sorts long lists, which fails on None among strings
            hit = pd.Series(values, copy=False).isin(list(self.value)).to_numpy(dtype=bool)
            return (hit if op == "in" else ~hit) & ~null
        with np.errstate(invalid="ignore"):
            if op == "eq":
                hit = values == self.value
            elif op == "ne":
                hit = values != self.value
            elif op == "lt":
                hit = values < self.value
            elif op == "le":
                hit = values <= self.value
            elif op == "gt":
                hit = values > self.value
            else:  # ge
                hit = values >= self.value
        return np.asarray(hit, dtype=bool) & ~null


@dataclass(frozen=True)
class Rule:
    """A hard rule: when ``when`` holds, the decision becomes (at least) ``outcome`` with ``reason_code``.

    ``override=True`` sets the decision to exactly ``outcome`` even when that is milder (step 2 of the
    precedence); otherwise the outcome only raises. ``budget_exempt=True`` keeps the rule's reviews out of
    the review-budget overflow.
    """

    id: str
    when: Condition
    outcome: str
    reason_code: str
    description: str = ""
    override: bool = False
    budget_exempt: bool = False


@dataclass(frozen=True)
class SimilarCasesRule:
    """Escalate on the fraud share of the top-``k`` similar cases whose outcome was known at decision time."""

    k: int
    min_known: int
    fraud_share_at_least: float
    outcome: str
    reason_code: str
    score_from_review_factor: float | None
    below_decline: bool
    rule_hits: bool


@dataclass(frozen=True)
class MissingFeatures:
    """What a NULL required feature, or a NULL / NaN score, does: at least ``outcome``, never a silent approve."""

    required: tuple[str, ...]
    outcome: str
    reason_code: str


@dataclass(frozen=True)
class ReviewBudget:
    """At most ``count`` reviews per run, or ``max(min_count, floor(share * n))``; the rest become ``overflow_decision``."""

    share: float | None
    count: int | None
    min_count: int
    overflow_decision: str
    overflow_reason_code: str
    overflow_actions: tuple[str, ...]

    def capacity(self, n: int) -> int:
        """Reviews allowed in a run of ``n`` transactions."""
        if self.count is not None:
            return self.count
        return max(self.min_count, int(math.floor(self.share * n + 1e-9)))


#: What a reviewer may answer (approve / decline resolve the case, escalate hands it on).
REVIEW_ANSWERS: tuple[str, ...] = constants.REVIEW_ANSWERS


@dataclass(frozen=True)
class EscalationRules:
    """What the escalation agent may do with a case the policy sent to review (section ``escalation``).

    The agent never widens this: :meth:`allowed_for` is enforced in code on its recommendation, not asked of it
    in a prompt. A score in the decline band is decided, never escalated, so it has no entry.
    """

    allowed: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: {
        "approve": ("approve", "review"), "review": ("approve", "review", "decline")})
    never_approve_with: tuple[str, ...] = ()
    budget_per_run: int = 25
    max_model_calls: int = 6
    max_tool_calls: int = 10
    case_timeout_seconds: float = 60.0

    def allowed_for(self, band: str, reason_codes: Sequence[str] = ()) -> tuple[str, ...]:
        """The decisions the agent may recommend for a case of this score band and these reason codes, mildest
        first; always includes ``review`` (keeping the case for a person is always allowed)."""
        allowed = list(self.allowed.get(band, ("review",)))
        if "review" not in allowed:
            allowed.append("review")
        if set(reason_codes) & set(self.never_approve_with) and "approve" in allowed:
            allowed.remove("approve")
        return tuple(sorted(allowed, key=_SEVERITY.__getitem__))


@dataclass(frozen=True)
class HumanReviewRules:
    """Human review of the cases still at ``review`` after escalation (section ``human_review``)."""

    tasks_per_run: int = 5
    response_timeout_hours: float = 24.0
    on_timeout: str = "decline"
    actions: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: {
        "approve": ("release_transaction",), "decline": ("decline_transaction", "notify_customer")})

    @property
    def response_timeout(self):
        """:attr:`response_timeout_hours` as a ``timedelta`` (the HITL task's ``response_timeout``)."""
        from datetime import timedelta

        return timedelta(hours=self.response_timeout_hours)

    def actions_for(self, answer: str) -> list[str]:
        """The actions a reviewer's answer triggers (none for ``escalate``: the case stays open)."""
        if answer not in REVIEW_ANSWERS:
            raise PolicyError(f"human_review: {answer!r} is not one of {list(REVIEW_ANSWERS)}")
        return list(self.actions.get(answer, ()))


@dataclass(frozen=True)
class Band:
    """A score band's threshold rule (``offset`` on the champion's, or an absolute ``value``) and reason code."""

    reason_code: str
    offset: float = 0.0
    value: float | None = None


@dataclass
class PolicyDecisions:
    """What :meth:`Policy.decide` decided, one entry per row of the batch (in batch order).

    * ``decision`` - ``approve`` | ``review`` | ``decline`` (object array).
    * ``band`` - what the score alone decides with the policy's thresholds (``approve`` | ``review`` | ``decline``).
    * ``reason_codes`` - per row, the declared codes of everything that contributed, band first.
    * ``actions`` - per row, the policy's actions for the final outcome (+ the overflow actions).
    * ``escalated`` - rows handed to the review queue (final decision ``review``).
    * ``rationale`` - deterministic text of what decided it.
    * ``overflowed`` - reviews the budget turned into ``overflow_decision``.
    * ``similar_evaluated`` - rows whose similar cases were given (the rule was evaluated for them).
    * ``thresholds`` - the effective band thresholds.
    """

    decision: np.ndarray
    band: np.ndarray
    reason_codes: list[list[str]]
    actions: list[list[str]]
    escalated: np.ndarray
    rationale: list[str]
    overflowed: np.ndarray
    similar_evaluated: np.ndarray
    thresholds: Thresholds

    def __len__(self) -> int:
        return int(self.decision.size)

    def mix(self) -> dict[str, int]:
        """Count of each outcome."""
        return {d: int((self.decision == d).sum()) for d in DECISIONS}


# -- loading ------------------------------------------------------------------------------------------------------
class _Loader:
    """Validates the raw mapping of one file; every error names the file, the rule and the field."""

    def __init__(self, source: str, fields: Sequence[str]):
        self.source = source
        self.fields = tuple(fields)
        self.codes: dict[str, str] = {}

    def fail(self, where: str, message: str) -> PolicyError:
        return PolicyError(f"{self.source}: {where}: {message}")

    def keys(self, where: str, data: Any, allowed: Sequence[str], required: Sequence[str] = ()) -> Mapping:
        if not isinstance(data, Mapping):
            raise self.fail(where, f"must be a mapping, got {type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in allowed)
        if unknown:
            raise self.fail(where, f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")
        missing = [k for k in required if k not in data]
        if missing:
            raise self.fail(where, f"missing required key(s) {', '.join(map(repr, missing))}")
        return data

    def string(self, where: str, name: str, value: Any, pattern: re.Pattern | None = None) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"field {name!r}: must be a non-empty string, got {value!r}")
        if pattern is not None and not pattern.match(value):
            raise self.fail(where, f"field {name!r}: {value!r} does not match {pattern.pattern}")
        return value

    def number(self, where: str, name: str, value: Any, lo: float | None = None, hi: float | None = None,
               integer: bool = False) -> float:
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or not math.isfinite(value):
            raise self.fail(where, f"field {name!r}: must be {'an integer' if integer else 'a finite number'}, "
                                   f"got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.fail(where, f"field {name!r}: must be within [{lo}, {hi}], got {value!r}")
        return value

    def boolean(self, where: str, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"field {name!r}: must be true or false, got {value!r}")
        return value

    def code(self, where: str, name: str, value: Any) -> str:
        code = self.string(where, name, value)
        if code not in self.codes:
            raise self.fail(where, f"field {name!r}: reason code {code!r} is not declared in reason_codes "
                                   f"(declared: {', '.join(sorted(self.codes)) or 'none'})")
        return code

    def outcome(self, where: str, value: Any, *, may_override: bool) -> str:
        """A plain outcome or ``{at_least: X}``; plain ``approve`` / ``review`` only with ``override: true``."""
        if isinstance(value, Mapping):
            self.keys(f"{where} field 'outcome'", value, ("at_least",), ("at_least",))
            value = value["at_least"]
            plain = False
        else:
            plain = True
        if value not in DECISIONS:
            raise self.fail(where, f"field 'outcome': {value!r} is not one of {', '.join(DECISIONS)} "
                                   "(or {at_least: review})")
        if plain and value != "decline" and not may_override:
            raise self.fail(where, f"field 'outcome': a plain {value!r} could make a decision milder; write "
                                   f"{{at_least: {value}}} to raise, or set override: true to set it exactly")
        return value

    def field_name(self, where: str, value: Any) -> str:
        name = self.string(where, "field", value)
        if name not in self.fields:
            hint = " (free text never changes a decision)" if name == "memo" else ""
            raise self.fail(where, f"field 'field': {name!r} is not a declared column{hint}; declared: "
                                   f"{', '.join(self.fields)}")
        return name

    def condition(self, where: str, data: Any, depth: int = 0) -> Condition:
        if depth > 8:
            raise self.fail(where, "conditions nested deeper than 8 levels")
        if isinstance(data, Mapping) and ("all" in data or "any" in data):
            self.keys(where, data, ("all", "any"))
            if len(data) != 1:
                raise self.fail(where, "a combination has exactly one of 'all' or 'any'")
            kind = next(iter(data))
            children = data[kind]
            if not isinstance(children, list) or not children:
                raise self.fail(where, f"field {kind!r}: must be a non-empty list of conditions")
            parsed = tuple(self.condition(f"{where}.{kind}[{i}]", c, depth + 1) for i, c in enumerate(children))
            return Condition(**{kind: parsed})
        data = self.keys(where, data, ("field", "op", "value"), ("field", "op"))
        name = self.field_name(where, data["field"])
        op = data["op"]
        if op not in OPS:
            raise self.fail(where, f"field 'op': {op!r} is not one of {', '.join(OPS)}")
        text = name in _STRING_FIELDS
        if op in _NULL_OPS:
            if "value" in data:
                raise self.fail(where, f"field 'value': {op} takes no value")
            return Condition(field=name, op=op)
        if "value" not in data:
            raise self.fail(where, f"field 'value': {op} needs a value")
        value = data["value"]
        if op in _LIST_OPS:
            if not isinstance(value, list) or not value:
                raise self.fail(where, f"field 'value': {op} needs a non-empty list, got {value!r}")
            items = value
        else:
            if op in _ORDER_OPS and text:
                raise self.fail(where, f"field 'op': {op} compares numbers but {name!r} is text; use eq, ne, in")
            items = [value]
        for item in items:
            if text and not isinstance(item, str):
                raise self.fail(where, f"field 'value': {name!r} is text, {item!r} is not a string (quote it)")
            if not text and (isinstance(item, bool) or not isinstance(item, (int, float))
                             or not math.isfinite(item)):
                raise self.fail(where, f"field 'value': {name!r} is numeric, {item!r} is not a finite number")
        return Condition(field=name, op=op, value=tuple(value) if op in _LIST_OPS else value)

    def actions(self, where: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list of action names, got {value!r}")
        return tuple(self.string(where, "action", a, _ACTION) for a in value)


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _parse(data: Any, source: str) -> dict[str, Any]:
    """The keyword arguments of :class:`Policy` from a file's raw mapping (validated)."""
    ld = _Loader(source, declared_fields())
    top = ld.keys("top level", data, _TOP_KEYS, _REQUIRED_TOP)
    name = ld.string("top level", "name", top["name"])
    version = top["version"]
    if isinstance(version, (int, float)) and not isinstance(version, bool):
        raise ld.fail("top level", f"field 'version': quote it (\"{version}\"): YAML reads {version!r} as a number")
    version = ld.string("top level", "version", version)
    description = top.get("description") or ""
    if not isinstance(description, str):
        raise ld.fail("top level", "field 'description': must be a string")

    codes = ld.keys("reason_codes", top["reason_codes"], list(top["reason_codes"] or {}))
    for code, text in codes.items():
        ld.string("reason_codes", "code", code, _CODE)
        ld.string(f"reason_codes.{code}", "description", text)
    ld.codes = dict(codes)

    raw_bands = ld.keys("bands", top["bands"], DECISIONS, DECISIONS)
    bands = {}
    for band in DECISIONS:
        where = f"bands.{band}"
        allowed = ("reason_code",) if band == "approve" else ("reason_code", "offset", "value")
        spec = ld.keys(where, raw_bands[band], allowed, ("reason_code",))
        if "offset" in spec and "value" in spec:
            raise ld.fail(where, "give either 'offset' (on the champion's threshold) or 'value', not both")
        offset = ld.number(where, "offset", spec.get("offset", 0.0), -1.0, 1.0)
        value = spec.get("value")
        if value is not None:
            value = ld.number(where, "value", value, 0.0, 1.0)
        bands[band] = Band(reason_code=ld.code(where, "reason_code", spec["reason_code"]), offset=float(offset),
                           value=None if value is None else float(value))

    rules = []
    seen: dict[str, int] = {}
    raw_rules = top.get("rules") or []
    if not isinstance(raw_rules, list):
        raise ld.fail("rules", "must be a list of rules")
    for i, raw in enumerate(raw_rules):
        rid = raw.get("id") if isinstance(raw, Mapping) else None
        where = f"rules[{i}]" + (f" (id={rid})" if isinstance(rid, str) else "")
        spec = ld.keys(where, raw, ("id", "description", "when", "outcome", "override", "reason_code",
                                    "budget_exempt"), ("id", "when", "outcome", "reason_code"))
        rid = ld.string(where, "id", spec["id"], _RULE_ID)
        if rid in seen:
            raise ld.fail(where, f"field 'id': {rid!r} is already the id of rules[{seen[rid]}]")
        seen[rid] = i
        override = ld.boolean(where, "override", spec.get("override", False))
        rules.append(Rule(
            id=rid, when=ld.condition(f"{where} when", spec["when"]),
            outcome=ld.outcome(where, spec["outcome"], may_override=override),
            reason_code=ld.code(where, "reason_code", spec["reason_code"]),
            description=str(spec.get("description") or ""), override=override,
            budget_exempt=ld.boolean(where, "budget_exempt", spec.get("budget_exempt", False))))

    similar = None
    if top.get("similar_cases") is not None:
        where = "similar_cases"
        spec = ld.keys(where, top["similar_cases"], ("k", "min_known", "fraud_share_at_least", "outcome",
                                                    "reason_code", "search_when"),
                       ("k", "min_known", "fraud_share_at_least", "outcome", "reason_code", "search_when"))
        k = int(ld.number(where, "k", spec["k"], 1, 100, integer=True))
        min_known = int(ld.number(where, "min_known", spec["min_known"], 1, 100, integer=True))
        if min_known > k:
            raise ld.fail(where, f"field 'min_known': {min_known} is more than k={k}")
        sw = ld.keys(f"{where}.search_when", spec["search_when"],
                     ("score_from_review_factor", "below_decline", "rule_hits"))
        factor = sw.get("score_from_review_factor")
        if factor is not None:
            factor = float(ld.number(f"{where}.search_when", "score_from_review_factor", factor, 0.0, 10.0))
        similar = SimilarCasesRule(
            k=k, min_known=min_known,
            fraud_share_at_least=float(ld.number(where, "fraud_share_at_least", spec["fraud_share_at_least"],
                                                 0.0, 1.0)),
            outcome=ld.outcome(where, spec["outcome"], may_override=False),
            reason_code=ld.code(where, "reason_code", spec["reason_code"]),
            score_from_review_factor=factor,
            below_decline=ld.boolean(f"{where}.search_when", "below_decline", sw.get("below_decline", True)),
            rule_hits=ld.boolean(f"{where}.search_when", "rule_hits", sw.get("rule_hits", True)))

    where = "missing_features"
    spec = ld.keys(where, top.get("missing_features") or {}, ("required", "outcome", "reason_code"),
                   ("required", "outcome", "reason_code"))
    required = spec["required"]
    if not isinstance(required, list):
        raise ld.fail(where, "field 'required': must be a list of declared feature columns")
    missing = MissingFeatures(
        required=tuple(ld.field_name(f"{where}.required[{i}]", f) for i, f in enumerate(required)),
        outcome=ld.outcome(where, spec["outcome"], may_override=False),
        reason_code=ld.code(where, "reason_code", spec["reason_code"]))
    if missing.outcome == "approve":
        raise ld.fail(where, "field 'outcome': a missing feature must never approve; use {at_least: review}")

    where = "review_budget"
    spec = ld.keys(where, top["review_budget"], ("share", "count", "min_count", "overflow_decision",
                                                 "overflow_reason_code", "overflow_actions"),
                   ("overflow_decision", "overflow_reason_code"))
    if ("share" in spec) == ("count" in spec):
        raise ld.fail(where, "give exactly one of 'share' (of the run's transactions) or 'count'")
    overflow = spec["overflow_decision"]
    if overflow not in ("approve", "decline"):
        raise ld.fail(where, f"field 'overflow_decision': {overflow!r} is not one of approve, decline")
    budget = ReviewBudget(
        share=float(ld.number(where, "share", spec["share"], 0.0, 1.0)) if "share" in spec else None,
        count=int(ld.number(where, "count", spec["count"], 0, None, integer=True)) if "count" in spec else None,
        min_count=int(ld.number(where, "min_count", spec.get("min_count", 0), 0, None, integer=True)),
        overflow_decision=overflow,
        overflow_reason_code=ld.code(where, "overflow_reason_code", spec["overflow_reason_code"]),
        overflow_actions=ld.actions(f"{where} field 'overflow_actions'", spec.get("overflow_actions", [])))

    raw_actions = ld.keys("actions", top["actions"], DECISIONS, DECISIONS)
    actions = {d: ld.actions(f"actions.{d}", raw_actions[d]) for d in DECISIONS}

    try:
        costs = CostModel.from_dict(top["costs"])
    except (ConfigError, TypeError) as exc:
        raise ld.fail("costs", str(exc)) from None

    escalation = _parse_escalation(ld, top.get("escalation"))
    human_review = _parse_human_review(ld, top.get("human_review"))

    return dict(name=name, version=version, description=description.strip(), bands=bands, rules=tuple(rules),
                similar_cases=similar, missing_features=missing, review_budget=budget, actions=actions,
                reason_codes=dict(codes), costs=costs, escalation=escalation, human_review=human_review,
                source=source, content_hash=hashlib.sha256(_canonical(data).encode()).hexdigest())


def _parse_escalation(ld: _Loader, raw: Any) -> EscalationRules:
    if raw is None:
        return EscalationRules()
    where = "escalation"
    spec = ld.keys(where, raw, ("allowed", "never_approve_with", "budget_per_run", "max_model_calls",
                                "max_tool_calls", "case_timeout_seconds"))
    default = EscalationRules()
    allowed = dict(default.allowed)
    if "allowed" in spec:
        bands = ld.keys(f"{where}.allowed", spec["allowed"], ("approve", "review"))
        allowed = {}
        for band, decisions in bands.items():
            if not isinstance(decisions, list) or not decisions:
                raise ld.fail(f"{where}.allowed.{band}", "must be a non-empty list of decisions")
            for decision in decisions:
                if decision not in DECISIONS:
                    raise ld.fail(f"{where}.allowed.{band}", f"{decision!r} is not one of {list(DECISIONS)}")
            allowed[band] = tuple(decisions)
    never = spec.get("never_approve_with") or []
    if not isinstance(never, list):
        raise ld.fail(where, "field 'never_approve_with': must be a list of reason codes")
    return EscalationRules(
        allowed=allowed,
        never_approve_with=tuple(ld.code(f"{where}.never_approve_with", "code", c) for c in never),
        budget_per_run=int(ld.number(where, "budget_per_run", spec.get("budget_per_run", default.budget_per_run),
                                     0, None, integer=True)),
        max_model_calls=int(ld.number(where, "max_model_calls", spec.get("max_model_calls",
                                                                          default.max_model_calls),
                                      1, 100, integer=True)),
        max_tool_calls=int(ld.number(where, "max_tool_calls", spec.get("max_tool_calls", default.max_tool_calls),
                                     1, 200, integer=True)),
        case_timeout_seconds=float(ld.number(where, "case_timeout_seconds",
                                             spec.get("case_timeout_seconds", default.case_timeout_seconds),
                                             0.1, 3600.0)))


def _parse_human_review(ld: _Loader, raw: Any) -> HumanReviewRules:
    if raw is None:
        return HumanReviewRules()
    where = "human_review"
    spec = ld.keys(where, raw, ("tasks_per_run", "response_timeout_hours", "on_timeout", "actions"))
    default = HumanReviewRules()
    on_timeout = spec.get("on_timeout", default.on_timeout)
    if on_timeout not in ("approve", "decline"):
        raise ld.fail(where, f"field 'on_timeout': {on_timeout!r} is not one of approve, decline")
    actions = dict(default.actions)
    if "actions" in spec:
        raw_actions = ld.keys(f"{where}.actions", spec["actions"], ("approve", "decline"))
        actions = {a: ld.actions(f"{where}.actions.{a}", v) for a, v in raw_actions.items()}
    return HumanReviewRules(
        tasks_per_run=int(ld.number(where, "tasks_per_run", spec.get("tasks_per_run", default.tasks_per_run),
                                    0, 1000, integer=True)),
        response_timeout_hours=float(ld.number(where, "response_timeout_hours",
                                               spec.get("response_timeout_hours", default.response_timeout_hours),
                                               0.001, 24.0 * 90)),
        on_timeout=on_timeout, actions=actions)


# -- the policy --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    """A loaded, validated policy file. Build with :meth:`load` (or :meth:`from_dict`); see the module doc.

    ``version`` is what the file declares; ``content_hash`` (sha256 of the canonical parsed content) tells two
    different files with the same declared version apart.
    """

    name: str
    version: str
    description: str
    bands: Mapping[str, Band]
    rules: tuple[Rule, ...]
    similar_cases: SimilarCasesRule | None
    missing_features: MissingFeatures
    review_budget: ReviewBudget
    actions: Mapping[str, tuple[str, ...]]
    reason_codes: Mapping[str, str]
    costs: CostModel
    escalation: EscalationRules = field(default_factory=EscalationRules)
    human_review: HumanReviewRules = field(default_factory=HumanReviewRules)
    source: str = "<dict>"
    content_hash: str = field(default="", compare=False)

    @classmethod
    def load(cls, path: str | Path = SHIPPED_POLICY) -> Policy:
        """Read and validate a YAML policy file; :class:`PolicyError` names the file, rule and field."""
        import yaml

        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read the policy file: {exc}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PolicyError(f"{path.name}: not valid YAML: {exc}") from exc
        return cls(**_parse(data, path.name))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> Policy:
        """Validate an already parsed policy mapping (``source`` names it in errors)."""
        return cls(**_parse(data, source))

    @property
    def short_hash(self) -> str:
        """The first 12 hex digits of :attr:`content_hash`."""
        return self.content_hash[:12]

    def describe(self) -> dict[str, Any]:
        """Name, version, hash and counts: for logs, MLflow params and the audit."""
        return {"policy_name": self.name, "policy_version": self.version, "policy_content_hash": self.content_hash,
                "rules": len(self.rules), "similar_cases_rule": self.similar_cases is not None}

    def actions_for(self, decision: str) -> list[str]:
        """The actions a decision triggers (``actions`` section)."""
        if decision not in DECISIONS:
            raise PolicyError(f"{self.source}: {decision!r} is not one of {list(DECISIONS)}")
        return list(self.actions[decision])

    def columns(self) -> tuple[str, ...]:
        """The batch columns :meth:`decide` reads (rule fields and required features; ``score`` is passed apart)."""
        wanted = set(self.missing_features.required)
        for rule in self.rules:
            wanted |= rule.when.fields()
        return tuple(sorted(wanted - {SCORE_FIELD}))

    def thresholds(self, champion: Thresholds) -> Thresholds:
        """The band thresholds: the champion's, each moved by its ``offset`` or replaced by its ``value``."""
        def one(band: Band, base: float) -> float:
            return band.value if band.value is not None else base + band.offset

        review, decline = one(self.bands["review"], champion.review), one(self.bands["decline"], champion.decline)
        return Thresholds(review=min(review, decline), decline=decline)

    # -- evaluation ------------------------------------------------------------------------------------------
    def _columns(self, batch: pd.DataFrame, scores: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(values, null mask) of each referenced column; a referenced column the batch lacks is an error."""
        import pandas as pd

        columns: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in self.columns():
            if name not in batch.columns:
                users = [f"rules[{i}] (id={r.id})" for i, r in enumerate(self.rules) if name in r.when.fields()]
                users += ["missing_features.required"] if name in self.missing_features.required else []
                raise PolicyError(f"{self.source}: the batch lacks column {name!r} used by {', '.join(users)}; "
                                  "pass the gold transaction with its features")
            series = batch[name]
            null = series.isna().to_numpy()
            if name in _STRING_FIELDS:
                values = series.astype(object).where(~null, None).to_numpy(dtype=object)
            else:
                values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
                null = null | np.isnan(values)
            columns[name] = (values, null)
        s = np.asarray(scores, dtype=np.float64)
        columns[SCORE_FIELD] = (s, np.isnan(s))
        return columns

    def _stage(self, batch: pd.DataFrame, scores: np.ndarray, thresholds: Thresholds) -> dict[str, Any]:
        """Steps 1-3 and 5 of the precedence (everything but similar cases and the budget), vectorised."""
        n = len(batch)
        s = np.asarray(scores, dtype=np.float64).ravel()
        if s.size != n:
            raise PolicyError(f"{self.source}: {s.size} scores for a batch of {n} rows")
        eff = self.thresholds(thresholds)
        cols = self._columns(batch, s)
        score_nan = np.isnan(s)
        band = np.where(s >= eff.decline, 2, np.where(s >= eff.review, 1, 0)).astype(np.int8)
        severity = band.copy()
        hits = {}
        overridden = np.zeros(n, dtype=bool)
        for rule in self.rules:
            hit = rule.when.mask(cols, n)
            hits[rule.id] = hit
            if rule.override:
                apply = hit & ~overridden  # the first matching override in file order wins
                severity[apply] = _SEVERITY[rule.outcome]
                overridden |= hit
        exempt = np.zeros(n, dtype=bool)
        for rule in self.rules:
            if not rule.override:
                severity = np.where(hits[rule.id], np.maximum(severity, _SEVERITY[rule.outcome]), severity)
            if rule.budget_exempt:
                exempt |= hits[rule.id]  # matters only where the final decision is review
        missing = score_nan.copy()
        for name in self.missing_features.required:
            missing |= cols[name][1]
        return {"n": n, "s": s, "eff": eff, "band": band, "severity": severity, "hits": hits,
                "exempt": exempt, "missing": missing}

    def needs_similar_cases(self, batch: pd.DataFrame, scores: np.ndarray, thresholds: Thresholds) -> np.ndarray:
        """Bool mask of rows for which a similar-case search is worth its cost (``similar_cases.search_when``).

        A row is searched when its score is in the grey zone (``score >= review * score_from_review_factor``,
        and below the decline threshold when ``below_decline``), or, with ``rule_hits``, when any rule matched.
        All false without a ``similar_cases`` rule.
        """
        st = self._stage(batch, scores, thresholds)
        rule = self.similar_cases
        if rule is None or st["n"] == 0:
            return np.zeros(st["n"], dtype=bool)
        s, eff = st["s"], st["eff"]
        wanted = np.zeros(st["n"], dtype=bool)
        if rule.score_from_review_factor is not None:
            with np.errstate(invalid="ignore"):
                grey = s >= eff.review * rule.score_from_review_factor
                if rule.below_decline:
                    grey &= s < eff.decline
            wanted |= grey
        if rule.rule_hits:
            for hit in st["hits"].values():
                wanted |= hit
        return wanted

    @staticmethod
    def _similar_counts(similar: Sequence[Any] | None, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(given, known, fraud) per row from the top ``k`` similar cases (SimilarCase objects or their dicts)."""
        given = np.zeros(n, dtype=bool)
        known = np.zeros(n, dtype=np.int64)
        fraud = np.zeros(n, dtype=np.int64)
        if similar is None:
            return given, known, fraud
        if len(similar) != n:
            raise PolicyError(f"similar cases for {len(similar)} rows, batch has {n} (give None for rows "
                              "not searched)")
        # Only searched rows carry cases (a small share of the batch): a loop over them, not over the batch.
        for i, cases in enumerate(similar):
            if cases is None:
                continue
            given[i] = True
            for case in list(cases)[:k]:
                outcome = case.get("outcome") if isinstance(case, Mapping) else getattr(case, "outcome", None)
                if outcome == "fraud":
                    known[i] += 1
                    fraud[i] += 1
                elif outcome == "legit":
                    known[i] += 1
        return given, known, fraud

    def decide(self, batch: pd.DataFrame, scores: np.ndarray, thresholds: Thresholds,
               similar: Sequence[Sequence[Any] | None] | None = None) -> PolicyDecisions:
        """Decide every row of ``batch`` (the gold transaction + its features) given its model ``scores``.

        :param batch: one row per transaction; must hold every column the rules and ``missing_features`` use.
        :param scores: the champion's fraud probability per row (NaN = no score: degrades to review).
        :param thresholds: the champion's thresholds (the bands apply the policy's offsets / overrides).
        :param similar: per row, its similar cases best first (``SimilarCase`` or ``as_dict()`` dicts), or
            ``None`` for a row not searched; ``None`` altogether when no search ran (the rule is skipped).
        :raises PolicyError: scores or similar cases of another length, a column the policy uses is missing.
        """
        st = self._stage(batch, scores, thresholds)
        n, s, eff = st["n"], st["s"], st["eff"]
        severity, band, hits = st["severity"], st["band"], st["hits"]
        exempt = st["exempt"].copy()

        similar_hit = np.zeros(n, dtype=bool)
        rule = self.similar_cases
        given, known, fraud = self._similar_counts(similar, n, rule.k if rule else 0)
        if rule is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                share = np.where(known > 0, fraud / np.maximum(known, 1), 0.0)
            similar_hit = given & (known >= rule.min_known) & (share >= rule.fraud_share_at_least)
            severity = np.where(similar_hit, np.maximum(severity, _SEVERITY[rule.outcome]), severity)

        missing = st["missing"]
        mf = self.missing_features
        severity = np.where(missing, np.maximum(severity, _SEVERITY[mf.outcome]), severity)
        exempt |= missing  # a review for missing data is never dropped by the budget: no silent approve

        # Review budget: exempt reviews first, then the others by descending score (stable: row order on ties).
        review = severity == 1
        capacity = self.review_budget.capacity(n)
        free = max(0, capacity - int((review & exempt).sum()))
        candidates = np.flatnonzero(review & ~exempt)
        overflowed = np.zeros(n, dtype=bool)
        if candidates.size > free:
            order = candidates[np.argsort(-np.nan_to_num(s[candidates], nan=np.inf), kind="stable")]
            overflowed[order[free:]] = True
            severity = np.where(overflowed, _SEVERITY[self.review_budget.overflow_decision], severity)

        decision = np.asarray(DECISIONS, dtype=object)[severity]
        band_names = np.asarray(DECISIONS, dtype=object)[band]

        # Reason codes and rationale: per-row lists, filled per rule over its hit rows (no loop over the batch
        # beyond building the output lists themselves).
        band_codes = [self.bands[d].reason_code for d in DECISIONS]
        reason_codes: list[list[str]] = [[band_codes[b]] for b in band.tolist()]
        extras: dict[int, list[str]] = {}

        def note(mask: np.ndarray, code: str | None, text: str) -> None:
            for i in np.flatnonzero(mask).tolist():
                if code is not None and code not in reason_codes[i]:
                    reason_codes[i].append(code)
                extras.setdefault(i, []).append(text)

        overridden_first = np.zeros(n, dtype=bool)
        for r in self.rules:
            if r.override:
                first = hits[r.id] & ~overridden_first
                overridden_first |= hits[r.id]
                note(first, r.reason_code, f"override rule {r.id} -> {r.outcome}")
        for r in self.rules:
            if not r.override:
                note(hits[r.id], r.reason_code, f"rule {r.id} -> at least {r.outcome}")
        for i in np.flatnonzero(given).tolist():
            extras.setdefault(i, []).append(f"similar cases: {fraud[i]}/{known[i]} known fraud")
        if rule is not None:
            note(similar_hit, rule.reason_code, f"fraud share >= {rule.fraud_share_at_least:.2f} among >= "
                                                f"{rule.min_known} known of top {rule.k} -> at least {rule.outcome}")
        note(missing, mf.reason_code, f"missing feature or score -> at least {mf.outcome}")
        note(overflowed, self.review_budget.overflow_reason_code,
             f"review budget of {capacity} exceeded, lower score -> {self.review_budget.overflow_decision}")

        base_actions = [list(self.actions[d]) for d in DECISIONS]
        overflow_actions = [a + list(self.review_budget.overflow_actions) for a in base_actions]
        actions = [list(base_actions[v]) for v in severity.tolist()]
        for i in np.flatnonzero(overflowed).tolist():
            actions[i] = list(overflow_actions[severity[i]])
        bands_text = [f" -> band {d} (review >= {eff.review:.4f}, decline >= {eff.decline:.4f})" for d in DECISIONS]
        with np.errstate(invalid="ignore"):
            score_text = np.char.mod("score %.4f", s).tolist()
        for i in np.flatnonzero(np.isnan(s)).tolist():
            score_text[i] = "no score"
        decided = [f" => {d}" for d in DECISIONS]
        rationale = [score_text[i] + bands_text[b] + decided[v]
                     for i, (b, v) in enumerate(zip(band.tolist(), severity.tolist()))]
        for i, texts in extras.items():
            rationale[i] = score_text[i] + bands_text[band[i]] + "; " + "; ".join(texts) + decided[severity[i]]
        return PolicyDecisions(decision=decision, band=band_names, reason_codes=reason_codes, actions=actions,
                               escalated=decision == "review", rationale=rationale, overflowed=overflowed,
                               similar_evaluated=given, thresholds=eff)
