"""The routing service: an OpenAI-compatible FastAPI app that scores each request and forwards it.

`app` assembles it: the endpoints (`api/`, one router a resource), the middlewares (`middleware`), the error handlers
and the lifespan. `service` holds what one process does (route, forward, bill, record); `stream` relays a streamed
answer and accounts for it. Needs the `serve` extra (fastapi, uvicorn, httpx, prometheus-client); never imports torch.
"""
