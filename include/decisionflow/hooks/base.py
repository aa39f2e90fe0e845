"""What every decisionflow hook offers on top of Airflow's BaseHook: a self-check for ``platform_check``."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook


class LayerCheckError(RuntimeError):
    """A layer's self-check failed. Carries what on-call needs: the layer, the cause and the remedy."""

    def __init__(self, layer: str, cause: str, remedy: str):
        self.layer = layer
        self.cause = cause
        self.remedy = remedy
        super().__init__(f"[{layer}] {cause} -- remedy: {remedy}")


class CheckableHook(BaseHook):
    """A hook whose layer can prove it works end to end (a real round trip, not a ping).

    Subclasses set ``layer`` and ``remedy`` and implement ``platform_check``, which must be idempotent
    (safe to clear and rerun) and return a small JSON-serializable summary of what it proved.
    """

    layer: str = ""
    remedy: str = ""

    def platform_check(self) -> dict[str, Any]:
        raise NotImplementedError

    def test_connection(self) -> tuple[bool, str]:
        """Airflow UI's 'Test' button: the same round trip as platform_check."""
        try:
            return True, str(self.platform_check())
        except Exception as exc:  # noqa: BLE001 - the UI wants a message, not a traceback
            return False, str(exc)
