"""The routing service: an OpenAI-compatible FastAPI app that scores each request and forwards it.

Needs the `serve` extra (fastapi, uvicorn, httpx, prometheus-client); never imports torch.
"""
