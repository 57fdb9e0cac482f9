"""POST /v1/feedback: a client's grade of one of its answers, stored beside the request in the traffic record."""

from __future__ import annotations

import math
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ...errors import first_error
from ..auth import bucket_of
from ..errors import APIError
from .deps import Client, ServiceDep

router = APIRouter(tags=["feedback"])


class Feedback(BaseModel):
    """A client's grade of one answer: `score` in [0, 1], or `thumbs` up (1) or down (0)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    request_id: str = Field(min_length=1, max_length=64)  # the x-request-id header of the answer
    score: float | None = Field(None, ge=0.0, le=1.0)
    thumbs: Literal["up", "down"] | None = None

    @model_validator(mode="after")
    def _one(self) -> Feedback:
        if (self.score is None) == (self.thumbs is None):
            raise ValueError("give score (a number in [0, 1]) or thumbs (up or down), one of them")
        return self


class FeedbackStored(BaseModel):
    request_id: str
    score: float = Field(description="the score stored: the one given, or 1.0 for thumbs up and 0.0 for down")


@router.post("/v1/feedback")
async def feedback(request: Request, service: ServiceDep, client: Client) -> FeedbackStored:
    """A client's score of one of its answers (by its x-request-id), stored beside the request; a second replaces it."""
    if service.traffic is None:
        raise APIError(
            404,
            "feedback needs the traffic record, which is off in this service (the traffic: block)",
            code="traffic_off",
        )
    per_minute = service.config.traffic.feedback_per_minute
    if (
        per_minute is not None
        and (
            wait := await service.state.take(
                f"feedback:{bucket_of(request, client)}", per_minute, max(1, math.ceil(per_minute))
            )
        )
        is not None
    ):
        raise APIError(
            429,
            f"feedback limit exceeded for this key (traffic.feedback_per_minute {per_minute:g}); retry in {wait:.1f}s",
            type="rate_limit_error",
            code="feedback_limit_exceeded",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    try:
        fb = Feedback.model_validate_json(await request.body())
    except ValidationError as e:
        loc, msg = first_error(e)
        param = ".".join(map(str, loc))
        raise APIError(400, f"{param + ': ' if param else ''}{msg}", param=param or None) from None
    score = fb.score if fb.score is not None else {"up": 1.0, "down": 0.0}[fb.thumbs]
    if not await service.traffic.feedback(fb.request_id, client.name if client else None, score):
        raise APIError(
            404,
            f"no recorded request {fb.request_id!r} of this client (unknown, expired, or of a data class "
            "that is never recorded)",
            param="request_id",
            code="unknown_request",
        )
    return FeedbackStored(request_id=fb.request_id, score=score)
