"""A header read timeout for uvicorn: a client that does not finish a request's headers in time is disconnected.

uvicorn's own `timeout_keep_alive` covers only an idle connection between requests; a client that connects (or
starts its next request) and then trickles its headers holds the connection for as long as it likes. This protocol
is uvicorn's httptools one with a deadline: HEADER_TIMEOUT_S from the connection, or from the first byte of each
later request, to the end of that request's headers.

    uvicorn --factory learned_router.serving.app:create_app_from_env \\
        --http learned_router.serving.slowclients:HeaderTimeoutProtocol
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADER_TIMEOUT_S = 10.0


class HeaderTimeoutProtocol(HttpToolsProtocol):
    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.logger.info("closed a connection whose request headers took over %gs", self.header_timeout_s)
            self.transport.close()
