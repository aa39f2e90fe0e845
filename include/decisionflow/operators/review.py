"""Human review operators: a review case as an Airflow HITL task, and the task that applies its answer.

Thin: the case's text and the answer's effects are plain Python in :mod:`decisionflow.decisions.review`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import BaseOperator, Param

from decisionflow import constants
from decisionflow.operators.decisions import DEFAULT_POLICY  # one shipped-policy path for every operator
from decisionflow.operators.base import DecisionflowOperatorMixin

if TYPE_CHECKING:
    from airflow.sdk import Context

#: The reviewer's answers.
OPTIONS = list(constants.REVIEW_ANSWERS)


def _note_param() -> dict[str, Param]:
    return {"note": Param("", type=["null", "string"], maxLength=10000, title="Note",
                          description="Optional: what you found. It becomes a case note of this transaction.")}


class ReviewCaseOperator(DecisionflowOperatorMixin, HITLOperator):
    """
    One review case as a human-in-the-loop task: the subject and the Markdown body are built from the case's
    audit row (transaction, score and band, reason codes, top similar cases with their outcomes, the escalation
    step's rationale) when the task runs, then the task waits in ``awaiting_input`` for an answer: from the UI
    (Browse -> Required Actions) or ``PATCH .../hitlDetails``. Its result (XCom) is the HITL answer the apply
    task reads.

    :param case: the claimed queue row (``decision_id`` at least), e.g. one element of the ``pick`` task's list;
        templated (a mapped task group's argument).
    :param policy_path: the policy YAML; its ``human_review`` section gives the timeout and its default answer.
    :param lake_conn_id: ``delta_lake`` connection of ``gold/decisions`` and ``gold/transactions_enriched``.
    :param defaults: the answer after ``response_timeout`` (default: the policy's ``human_review.on_timeout``).
    :param response_timeout: how long the task waits for a person (default: the policy's
        ``human_review.response_timeout_hours``).
    :param top_similar: similar past cases shown in the body.
    :param kwargs: the rest of :class:`~airflow.providers.standard.operators.hitl.HITLOperator`'s arguments
        (``assigned_users``, ``notifiers``, ...) and BaseOperator's.
    """

    layer = "review"

    template_fields = (*HITLOperator.template_fields, "case")

    def __init__(self, *, case: Mapping[str, Any] | Any, policy_path: str = DEFAULT_POLICY,
                 lake_conn_id: str = "lake_default", defaults: str | list[str] | None = None,
                 response_timeout: timedelta | None = None, top_similar: int = 5, **kwargs) -> None:
        kwargs.setdefault("subject", "Review case")  # replaced by the case's own in execute
        kwargs.setdefault("params", _note_param())
        super().__init__(options=list(OPTIONS), defaults=defaults, response_timeout=response_timeout, **kwargs)
        self.case = case
        self.policy_path = policy_path
        self.lake_conn_id = lake_conn_id
        self.top_similar = top_similar

    def execute(self, context: Context):
        from decisionflow.decisions.policy import Policy
        from decisionflow.decisions.review import case_markdown, case_subject, load_case
        from decisionflow.hooks.lake import LakeHook

        policy = Policy.load(self.policy_path)
        lake = LakeHook(self.lake_conn_id)
        row, transaction = load_case(lake.root, str(self.case["decision_id"]), lake.storage_options or None)
        self.subject = case_subject(row, policy)
        self.body = case_markdown(row, transaction, policy, top_similar=self.top_similar)
        if self.defaults is None:
            self.defaults = [policy.human_review.on_timeout]
            self.validate_defaults()
        if self.response_timeout is None:
            self.response_timeout = policy.human_review.response_timeout
        self.log.info("review of decision %s: %s (timeout %s, then %s)", row["decision_id"], self.subject,
                      self.response_timeout, self.defaults)
        return super().execute(context)


def kafka_ports(kafka_conn_id: str, webhook_conn_id: str, log) -> tuple[list, Any]:
    """The deliverers of the outbox (the decision run's own) and the label/note publisher, from connections."""
    from decisionflow.decisions.review import KafkaReviewEvents
    from decisionflow.operators.decisions import outbox_deliverers

    deliverers, hook = outbox_deliverers(kafka_conn_id, webhook_conn_id, log)

    def exists(topic: str) -> None:  # a source topic: created by the platform, any partition count is fine
        hook.ensure_topic(topic, 1)

    return deliverers, KafkaReviewEvents(dict(hook.config), ensure_topic=exists)


class ApplyReviewOperator(DecisionflowOperatorMixin, BaseOperator):
    """
    Apply the answer of a :class:`ReviewCaseOperator` task once (:func:`decisionflow.decisions.review.apply_review`):
    the audit row's review columns, the queue row, the answer's actions through the outbox, the label on
    ``transaction-labels`` and the note on ``case-notes``. A retry repeats nothing. An answer for an unknown or
    already-resolved case fails the task at once (no retries) with the reason.

    :param case: the claimed queue row (``decision_id`` at least); templated.
    :param answer: the review task's result (its XCom: ``chosen_options``, ``params_input``, ``responded_at``,
        ``responded_by_user``); templated. No ``responded_by_user`` means the timeout's default answer: recorded
        with ``review_source`` ``timeout`` and no label.
    :param policy_path: the policy YAML (the answer's actions).
    :param lake_conn_id: ``delta_lake`` connection of the decision tables.
    :param kafka_conn_id: Kafka connection of the ``decisions``, ``transaction-labels`` and ``case-notes`` topics.
    :param webhook_conn_id: HTTP connection of the actions webhook (off when it does not exist).
    """

    layer = "review"

    template_fields = ("case", "answer")

    def __init__(self, *, case: Mapping[str, Any] | Any, answer: Mapping[str, Any] | Any,
                 policy_path: str = DEFAULT_POLICY, lake_conn_id: str = "lake_default",
                 kafka_conn_id: str = "kafka_default", webhook_conn_id: str = constants.ACTIONS_WEBHOOK_CONN_ID,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.case = case
        self.answer = answer
        self.policy_path = policy_path
        self.lake_conn_id = lake_conn_id
        self.kafka_conn_id = kafka_conn_id
        self.webhook_conn_id = webhook_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from decisionflow.decisions.policy import Policy
        from decisionflow.decisions.review import ReviewAnswer, ReviewPorts, apply_review
        from decisionflow.hooks.lake import LakeHook

        lake = LakeHook(self.lake_conn_id)
        policy = Policy.load(self.policy_path)
        # ReviewError is a NonRetryableError (the same answer fails the same way on every retry): the operator
        # base fails the task without burning retries
        answer = ReviewAnswer.from_hitl(str(self.case["decision_id"]), dict(self.answer or {}),
                                        review_run_id=context["run_id"])
        deliverers, events = kafka_ports(self.kafka_conn_id, self.webhook_conn_id, self.log)
        result = apply_review(lake.root, answer, policy, ReviewPorts(deliverers=deliverers, events=events),
                              storage_options=lake.storage_options or None)
        self.log.info("applied: %s", result.as_dict())
        return result.as_dict()
