"""The chat model of the escalation agent, named by an Airflow connection (``llm_default``; optional).

Two ways to name a model in the connection's ``extra``:

* a provider, for ``langchain.chat_models.init_chat_model``::

      {"provider": "openai", "model": "gpt-4.1-mini", "base_url": "https://...", "temperature": 0,
       "timeout": 30, "kwargs": {...}}

  ``provider`` is any of init_chat_model's providers (``openai``, ``anthropic``, ``ollama``, ...), which needs
  its LangChain package installed (``langchain-openai``, ``langchain-ollama``, ...). ``password`` is the API key
  (``api_key``); ``host`` is used as ``base_url`` when the extra has none. ``kwargs`` are passed on as they are
  (provider-specific settings).
* a class, for any ``BaseChatModel`` subclass (a self-hosted model's own class, the tests' scripted model)::

      {"class": "package.module:ClassName", "kwargs": {...}}

Without the connection there is no agent: :func:`brain_from_connection` returns the policy brain and logs why,
and every escalated case's audit row says ``brain = policy``. A connection that exists but cannot build its model
(missing provider package, unknown class, bad kwargs) is an error naming the connection: a configured agent that
silently did not run would be worse than a failed task.

Imports of LangChain happen inside the methods: DAG files importing this module parse fast.
"""

from __future__ import annotations

import importlib
import json
import logging
from functools import cached_property
from typing import TYPE_CHECKING, Any

from decisionflow.hooks.base import CheckableHook, LayerCheckError
from decisionflow.exceptions import NonRetryableError

if TYPE_CHECKING:
    from airflow.sdk import Connection
    from langchain_core.language_models.chat_models import BaseChatModel

    from decisionflow.decisions.agent import AgentBrain, PolicyBrain

log = logging.getLogger(__name__)

#: LangChain package of each common init_chat_model provider (for error messages).
PROVIDER_PACKAGES = {"openai": "langchain-openai", "azure_openai": "langchain-openai",
                     "anthropic": "langchain-anthropic", "ollama": "langchain-ollama",
                     "google_genai": "langchain-google-genai", "google_vertexai": "langchain-google-vertexai",
                     "bedrock": "langchain-aws", "bedrock_converse": "langchain-aws",
                     "mistralai": "langchain-mistralai", "groq": "langchain-groq", "huggingface":
                     "langchain-huggingface", "fireworks": "langchain-fireworks", "together": "langchain-together",
                     "deepseek": "langchain-deepseek", "xai": "langchain-xai"}


class LlmConfigError(NonRetryableError, RuntimeError):
    """The LLM connection exists but its chat model cannot be built; names the connection and the remedy."""


class LlmHook(CheckableHook):
    """Build the LangChain chat model named by an Airflow connection.

    :param llm_conn_id: the Airflow connection id; ``llm_default`` if omitted. Its ``extra`` names a provider
        (``provider``, ``model``, optional ``base_url``, ``temperature`` (default 0), ``timeout`` seconds,
        ``kwargs``) or a class (``class`` = ``"package.module:ClassName"``, ``kwargs``); its ``password`` is
        the API key, its ``host`` the base URL when ``extra.base_url`` is not set.
    """

    conn_name_attr = "llm_conn_id"
    default_conn_name = "llm_default"
    conn_type = "llm"
    hook_name = "LLM (LangChain chat model)"

    layer = "llm"

    def __init__(self, llm_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.llm_conn_id = llm_conn_id

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """How the Airflow UI connection form shows an ``llm`` connection."""
        return {
            "hidden_fields": ["schema", "port", "login"],
            "relabeling": {"host": "Base URL (optional)", "password": "API key"},
            "placeholders": {"extra": json.dumps({"provider": "openai", "model": "gpt-4.1-mini", "temperature": 0,
                                                  "timeout": 30})},
        }

    @property
    def remedy(self) -> str:  # type: ignore[override]
        return (f"fix connection {self.llm_conn_id!r}: extra {{\"provider\": ..., \"model\": ...}} with the "
                "provider's LangChain package installed, or {\"class\": \"module:Class\"}; or delete it to let the "
                "policy brain decide")

    @cached_property
    def connection(self) -> Connection:
        """The Airflow connection, fetched once per hook instance (AirflowNotFoundException when missing)."""
        return self.get_connection(self.llm_conn_id)

    @property
    def extra(self) -> dict[str, Any]:
        """The connection's extra as a dict."""
        return dict(self.connection.extra_dejson or {})

    @property
    def model_name(self) -> str:
        """What the audit records as ``chat_model``: ``provider:model`` or the class path."""
        extra = self.extra
        if extra.get("class"):
            return str(extra["class"])
        return f"{extra.get('provider', '?')}:{extra.get('model', '?')}"

    def get_chat_model(self) -> BaseChatModel:
        """The chat model of the connection.

        :raises LlmConfigError: naming the connection, and the package to install when the provider's LangChain
            integration is missing.
        """
        extra = self.extra
        if extra.get("class"):
            return self._from_class(str(extra["class"]), extra.get("kwargs") or {})
        provider, model = extra.get("provider"), extra.get("model")
        if not provider or not model:
            raise LlmConfigError(f"[llm] connection {self.llm_conn_id!r}: extra needs \"provider\" and \"model\" "
                                 f"(or \"class\"), got keys {sorted(extra)} -- remedy: {self.remedy}")
        kwargs: dict[str, Any] = {"temperature": extra.get("temperature", 0)}
        base_url = extra.get("base_url") or self.connection.host
        if base_url:
            kwargs["base_url"] = base_url
        if extra.get("timeout") is not None:
            kwargs["timeout"] = float(extra["timeout"])
        if self.connection.password:
            kwargs["api_key"] = self.connection.password
        kwargs.update(extra.get("kwargs") or {})
        from langchain.chat_models import init_chat_model

        try:
            return init_chat_model(str(model), model_provider=str(provider), **kwargs)
        except ImportError as exc:
            package = PROVIDER_PACKAGES.get(str(provider), f"the LangChain integration of {provider!r}")
            raise LlmConfigError(f"[llm] connection {self.llm_conn_id!r}: provider {provider!r} needs {package}, "
                                 f"which is not installed ({exc}) -- remedy: pip install {package} (and add it to "
                                 "requirements), or delete the connection to let the policy brain decide") from exc
        except Exception as exc:  # noqa: BLE001 - unknown provider, bad kwargs: name the connection
            raise LlmConfigError(f"[llm] connection {self.llm_conn_id!r}: cannot build {provider}:{model}: "
                                 f"{type(exc).__name__}: {exc} -- remedy: {self.remedy}") from exc

    def _from_class(self, path: str, kwargs: dict[str, Any]) -> BaseChatModel:
        from langchain_core.language_models.chat_models import BaseChatModel

        module_name, _, class_name = path.partition(":")
        if not module_name or not class_name:
            raise LlmConfigError(f"[llm] connection {self.llm_conn_id!r}: \"class\" must be \"package.module:"
                                 f"ClassName\", got {path!r} -- remedy: {self.remedy}")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise LlmConfigError(f"[llm] connection {self.llm_conn_id!r}: cannot import {path!r}: {exc} -- remedy: "
                                 "install the package that provides it (on the workers too)") from exc
        if not (isinstance(cls, type) and issubclass(cls, BaseChatModel)):
            raise LlmConfigError(f"[llm] connection {self.llm_conn_id!r}: {path!r} is not a LangChain "
                                 f"BaseChatModel subclass -- remedy: {self.remedy}")
        try:
            return cls(**kwargs)
        except Exception as exc:  # noqa: BLE001 - pydantic validation of the kwargs
            raise LlmConfigError(f"[llm] connection {self.llm_conn_id!r}: {path}(**kwargs) failed: "
                                 f"{type(exc).__name__}: {exc} -- remedy: fix extra.kwargs") from exc

    def probe(self) -> dict[str, Any]:
        """Read-only and free: the connection builds its chat model (provider package, class, settings); the model
        is not called (a call costs tokens -- ``platform_check`` makes one)."""
        model = self.get_chat_model()
        return {"chat_model": self.model_name, "class": f"{type(model).__module__}.{type(model).__name__}"}

    def platform_check(self) -> dict[str, Any]:
        """One real round trip: the model is asked to call an ``echo`` tool and must answer with that tool call
        (the agent only works with tool calls)."""
        from langchain_core.tools import tool

        @tool
        def echo(text: str) -> str:
            """Echo the text back."""
            return text

        try:
            model = self.get_chat_model()
            answer = model.bind_tools([echo]).invoke("Call the echo tool with text 'ok'. Do not answer in text.")
        except LlmConfigError as exc:
            raise LayerCheckError(self.layer, str(exc), self.remedy) from exc
        except Exception as exc:  # noqa: BLE001 - the provider's errors: auth, network, quota
            raise LayerCheckError(self.layer, f"{self.model_name} failed: {type(exc).__name__}: {exc}",
                                  self.remedy) from exc
        calls = [c["name"] for c in getattr(answer, "tool_calls", [])]
        if "echo" not in calls:
            raise LayerCheckError(self.layer, f"{self.model_name} answered without the echo tool call (tool calls: "
                                  f"{calls}): the agent needs a model that calls tools", self.remedy)
        return {"chat_model": self.model_name, "tool_calls": calls}


def _is_not_found(exc: Exception) -> bool:
    return type(exc).__name__ == "AirflowNotFoundException"


def brain_from_connection(conn_id: str = LlmHook.default_conn_name, *, checkpointer: Any = None
                          ) -> AgentBrain | PolicyBrain:
    """The escalation brain the connection names.

    :param conn_id: the LLM connection (``llm_default``).
    :param checkpointer: the LangGraph checkpointer of the agent (the decision run's ``SqliteSaver``); can also
        be set later as ``brain.checkpointer``.
    :return: an :class:`~decisionflow.decisions.agent.AgentBrain` on the connection's chat model when the
        connection exists; a :class:`~decisionflow.decisions.agent.PolicyBrain` when it does not (logged, and
        its reason is in every escalated case's audit summary).
    :raises LlmConfigError: the connection exists but its model cannot be built (names the connection and the
        missing provider package).
    """
    from decisionflow.decisions.agent import AgentBrain, PolicyBrain

    hook = LlmHook(llm_conn_id=conn_id)
    try:
        hook.connection  # noqa: B018 - fetch now: a missing connection means "no agent"
    except Exception as exc:
        if not _is_not_found(exc):
            raise
        log.info("no connection %r: escalated cases are decided by the policy brain", conn_id)
        return PolicyBrain(reason=f"connection {conn_id!r} is not defined: no chat model, the policy decides")
    model = hook.get_chat_model()
    log.info("connection %r: escalated cases go to the agent on %s", conn_id, hook.model_name)
    return AgentBrain(model, checkpointer=checkpointer, model_name=hook.model_name)
