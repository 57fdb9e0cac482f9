"""Errors of the service: config errors for the CLI, OpenAI-style API errors for clients."""

from __future__ import annotations

from ..errors import RouterError


class ConfigError(RouterError):
    """The service config is invalid; the message names the key (`providers.strong[0].base_url: ...`)."""


class APIError(Exception):
    """An error returned to the client as OpenAI's `{"error": {message, type, param, code}}` body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
