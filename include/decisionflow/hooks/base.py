"""What every decisionflow hook offers on top of Airflow's BaseHook: a self-check for ``platform_check`` and a
read-only probe for the UI's connection "Test" button."""

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
    (safe to clear and rerun) and return a small JSON-serializable summary of what it proved; and ``probe``,
    a quick read-only look at the service (list topics, a health endpoint, list collections) that writes
    nothing anywhere, for the connection "Test" button.
    """

    layer: str = ""
    remedy: str = ""

    def platform_check(self) -> dict[str, Any]:
        raise NotImplementedError

    def probe(self) -> dict[str, Any]:
        """A read-only look at the service (seconds, writes nothing); a small summary of what it saw.

        :raises Exception: the service cannot be reached or the connection is invalid (the message says why).
        """
        raise NotImplementedError

    def test_connection(self) -> tuple[bool, str]:
        """Airflow UI's 'Test' button: the read-only :meth:`probe` (never the writing ``platform_check``).

        :return: ``(True, "<layer>: OK (read-only probe) {summary}")`` or ``(False, "[layer] cause -- remedy:
            ...")``.
        """
        from decisionflow.exceptions import describe_failure

        try:
            summary = self.probe()
        except Exception as exc:  # noqa: BLE001 - the UI wants a message, not a traceback
            return False, describe_failure(exc, layer=self.layer, remedy=self._remedy_text()).line()
        return True, f"{self.layer}: OK (read-only probe) {summary}"

    def _remedy_text(self) -> str:
        try:
            return str(self.remedy or "")
        except Exception:  # noqa: BLE001 - a remedy property that needs the connection
            return ""
