"""The local actions webhook receiver: where decisions' actions go on one machine (tests and the demo).

``actions_webhook`` points at it by default; in production the connection points at the real receiver
(a case-management system, a notification service) and this component is simply not needed.
"""

from __future__ import annotations

from decisionflow.stack.base import Health, Service, http_ok


class WebhookService(Service):
    name = "webhook"
    start_timeout = 60

    @property
    def store(self):
        return self.ctx.data / "webhook" / "effects.sqlite"

    def url(self) -> str:
        return f"http://{self.ctx.host}:{self.ctx.port('webhook')}"

    def ports(self) -> list[int]:
        return [self.ctx.port("webhook")]

    def prepare(self) -> None:
        self.store.parent.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return [self.ctx.bin("python"), "-m", "decisionflow.decisions.webhook", "--host", self.ctx.host,
                "--port", str(self.ctx.port("webhook")), "--store", str(self.store)]

    def health(self) -> Health:
        return http_ok(f"{self.url()}/health")
