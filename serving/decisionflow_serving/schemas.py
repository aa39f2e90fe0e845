"""Request and response models of the gateway; the transaction model is derived from the data contract.

:class:`Transaction` is built at import from ``include/decisionflow/contracts/transactions.v1.json`` (through
:func:`decisionflow.contracts.contract`): every field with its JSON type, nullability, bounds, lengths, pattern,
enum or const and description, so the OpenAPI document shows the contract and pydantic's 422 names the field.
What pydantic cannot say (formats: ``uuid``, RFC 3339 ``date-time``, ``ipv4``/``ipv6``; finite numbers; JSON
booleans are not integers) is checked after it by the contract's own validator (:func:`contract_violations`), and
reported the same way (a 422 whose ``loc`` ends with the field). Unknown fields are allowed, as the contract
says (``additionalProperties: true``), and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, create_model

from decisionflow import contracts

TOPIC = "transactions"
CONTRACT = contracts.contract(TOPIC)
MAX_TRANSACTIONS = 1000


def _annotation(field: contracts.Field) -> Any:
    constraints: dict[str, Any] = {"description": field.description or None}
    if field.enum is not None:
        base: Any = Literal[tuple(field.enum)]  # type: ignore[valid-type]
    elif field.const is not None:
        base = Literal[field.const]  # type: ignore[valid-type]
    elif field.type == "string":
        base = StrictStr
        for key in ("min_length", "max_length", "pattern"):
            if getattr(field, key) is not None:
                constraints[key] = getattr(field, key)
    elif field.type in ("number", "integer"):
        base = StrictInt if field.type == "integer" else StrictFloat  # strict: an int is accepted, "5" is not
        for key, name in (("minimum", "ge"), ("exclusive_minimum", "gt"), ("maximum", "le"),
                          ("exclusive_maximum", "lt")):
            if getattr(field, key) is not None:
                constraints[name] = getattr(field, key)
    elif field.type == "boolean":
        base = StrictBool
    else:
        base = Any
    if field.type == "string" and field.formats:
        fmt = " or ".join(field.formats)
        constraints["json_schema_extra"] = {"format": field.formats[0]} if len(field.formats) == 1 else None
        constraints["description"] = f"{field.description} (format: {fmt})".strip()
    annotated = Annotated[base, Field(**{k: v for k, v in constraints.items() if v is not None})]
    if field.nullable:
        annotated = Annotated[annotated | None, Field(description=constraints["description"])]
    return annotated


def _transaction_model() -> type[BaseModel]:
    definitions: dict[str, Any] = {}
    for field in CONTRACT.fields:
        annotation = _annotation(field)
        definitions[field.name] = (annotation, ...) if field.required else (annotation, None)
    model = create_model(
        "Transaction",
        __config__=ConfigDict(extra="allow", allow_inf_nan=False,
                              json_schema_extra={"description": CONTRACT.schema.get("description", "")}),
        **definitions,
    )
    model.__doc__ = CONTRACT.schema.get("description", "A transaction (contract transactions v1).")
    return model


Transaction = _transaction_model()


def contract_violations(record: dict[str, Any]) -> list[tuple[str, str]]:
    """``(field, message)`` for each rule of the contract ``record`` breaks (empty when valid)."""
    out = []
    for line in contracts.validate(TOPIC, record):
        name, _, message = line.partition(": ")
        out.append((name.split(".")[0] or "record", message or line))
    return out


class ScoreRequest(BaseModel):
    """Transactions to score (1 to 1,000 records of the transactions contract), all with one model version."""

    transactions: list[Transaction] = Field(min_length=1, max_length=MAX_TRANSACTIONS)  # type: ignore[valid-type]


class ModelRef(BaseModel):
    name: str = Field(description="Registered MLflow model name.")
    version: str = Field(description="The MLflow model version that scored this request.")


Band = Literal["approve", "review", "decline"]


class FeatureState(BaseModel):
    """How fresh the online features of one transaction were."""

    features_as_of: dict[str, str | None] = Field(
        description="Per feature view, the event time (UTC, RFC 3339) of the online row used; null when the "
                    "entity is not in the online store.")
    stale: list[str] = Field(default_factory=list, description="Feature views whose online row is older than "
                             "the freshness limit (the view's TTL unless configured).")
    missing: list[str] = Field(default_factory=list, description="Feature views with no online row for the "
                               "entity (its features are null; the policy's FEATURES_MISSING rule applies).")


class ScoreItem(FeatureState):
    event_id: str
    score: float = Field(description="Fraud probability from the model version named in `model`.")
    band: Band = Field(description="The policy's score band under that version's thresholds.")


class ScoreResponse(BaseModel):
    model: ModelRef
    scores: list[ScoreItem]


class DecisionResponse(FeatureState):
    """The audit record of the decision (the fields of a gold/decisions row) and the model that scored it."""

    model_config = ConfigDict(extra="allow")

    model: ModelRef
    published: bool = Field(description="True when the decision was published to the decisions topic "
                            "(false for dry_run=true).")
    decision_id: str
    event_id: str
    account_id: str
    merchant_id: str
    event_time: str
    decided_at: str
    run_id: str
    decision: Band
    band: Band
    reason_codes: list[str]
    score: float
    model_name: str
    model_version: str
    model_run_id: str
    features: dict[str, Any]
    similar_cases: Any
    policy_name: str
    policy_version: str
    escalated: bool
    rationale: str
    actions: list[str]


class Problem(BaseModel):
    """An error: what failed, in which component, and what to do."""

    detail: Any
