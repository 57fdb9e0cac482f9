"""The service: serve."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..errors import RouterError

from .common import fail, serve_imports, user_errors
from .main import app


def log_config(level: str) -> dict:
    """uvicorn's logging, plus the service's own logger at `level` (it never logs keys or prompt text)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["loggers"]["learned_router"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return cfg


@app.command()
@user_errors
def serve(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="Service config YAML (see serving/config.example.yaml).")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes; each holds its own router, and its own breakers and limits unless state.backend is redis (serving/DEPLOY.md).",
        ),
    ] = 1,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    access_log: Annotated[
        bool, typer.Option(help="Log one line per HTTP request (path and status, never bodies).")
    ] = True,
):
    """Run the OpenAI-compatible routing service."""
    uvicorn = serve_imports()
    from ..serving.app import CONFIG_ENV, SUPERVISOR_ENV, WORKERS_ENV, Service, create_app
    from ..serving.config import load_config

    if log_level.lower() not in ("debug", "info", "warning", "error"):
        fail(f"--log-level: expected debug, info, warning or error, got {log_level!r}")
    from ..serving.slowclients import HeaderTimeoutProtocol

    check_port(host, port)  # before the router loads
    service = Service(load_config(config))  # fail fast: config, router folder, key variables
    options = dict(
        host=host,
        port=port,
        log_config=log_config(log_level),
        log_level=log_level.lower(),
        access_log=access_log,
        http=HeaderTimeoutProtocol,
    )  # a client that never finishes its headers is cut off (DEPLOY.md)
    if workers == 1:
        uvicorn.run(create_app(service), **options)
    else:
        del service
        # uvicorn's worker processes build the app from these (create_app_from_env): a factory takes no arguments
        os.environ[CONFIG_ENV], os.environ[WORKERS_ENV] = str(config.resolve()), str(workers)
        os.environ[SUPERVISOR_ENV] = str(os.getpid())
        uvicorn.run("learned_router.serving.app:create_app_from_env", factory=True, workers=workers, **options)


def check_port(host: str, port: int) -> None:
    """RouterError naming the address when it cannot be listened on (in use, not this host's, no permission)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RouterError(f"--host {host}: not an address of this host ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as e:
            raise RouterError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
