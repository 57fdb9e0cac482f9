"""One chat request from its routing decision to its end: billed, logged, recorded and offered for shadow grading
once, however it ends (an answer, a provider's client error, a failure, a stream done or broken)."""

from __future__ import annotations

import logging
import uuid

from .errors import APIError
from .providers import Reply
from .decision import TierDecision
from .service import Service
from .usage import Billed

log = logging.getLogger("learned_router.serving")


class Exchange:
    """A routed chat request: `failed` or `finish` ends it."""

    def __init__(self, service: Service, d: TierDecision, client: str | None, started: float, body: dict):
        self.service, self.d, self.client, self.started, self.body = service, d, client, started, body
        self.id = uuid.uuid4().hex[:16]

    def failed(self, e: APIError) -> None:
        """No provider answered: logged and recorded."""
        d = self.d
        log.warning(
            "chat id=%s tier=%s rule=%s task_type=%s status=%d: %s",
            self.id,
            d.tier,
            d.rule,
            d.task_type,
            e.status,
            e.message,
        )
        self.service.record(d, self.id, self.client, self.started, e.status, e.code or "failed")

    def finish(
        self, reply: Reply, outcome: str, usage: object = None, chars: int = 0, text: str | None = None
    ) -> Billed | None:
        """The provider's reply is over: a whole answer or a stream ('ok'), a stream broken ('interrupted', ...),
        or a provider's client error ('client_error', not billed). Bills what was answered, logs, records, and
        offers a whole answer's `text` for shadow grading; the bill, if any."""
        service, d, provider = self.service, self.d, reply.provider
        billed = None
        if outcome != "client_error":
            billed = service.account(provider, usage, chars, d, served=outcome == "ok")
        log.info(
            "chat id=%s tier=%s provider=%s status=%d outcome=%s rule=%s task_type=%s threshold=%.4f effective=%.4f "
            "fallbacks=%d cost_usd=%.8f",
            self.id,
            d.tier,
            provider.name,
            reply.status,
            outcome,
            d.rule,
            d.task_type,
            d.threshold,
            d.effective_threshold,
            reply.fallbacks,
            billed.usd if billed else 0.0,
        )
        service.record(d, self.id, self.client, self.started, reply.status, outcome, provider, billed)
        if outcome == "ok" and text is not None and service.shadow:
            service.shadow.offer(d, self.id, self.client, self.body, provider, text, billed.usd)
        return billed
