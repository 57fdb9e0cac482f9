"""The service: serve."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from ..errors import RouterError

from .common import fail, serve_imports, user_errors
from .main import app

# a new worker loads its router before it is ready: uvicorn's 5 s default is too short for a busy host
WORKER_START_S = 60


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
    from ..serving.app import Service, create_app
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
        return
    del service
    from uvicorn.supervisors import Multiprocess

    # each worker process builds its app from this factory, handed to it by uvicorn's supervisor (this process)
    factory = partial(worker_app, config.resolve(), Supervisor(os.getpid(), workers))
    settings = uvicorn.Config(
        factory, factory=True, workers=workers, timeout_worker_healthcheck=WORKER_START_S, **options
    )
    try:
        Multiprocess(settings, sockets=[settings.bind_socket()]).run()
    except KeyboardInterrupt:
        pass


@dataclass(frozen=True)
class Supervisor:
    """The process that runs `serve --workers` (uvicorn's supervisor): on SIGHUP it replaces its workers one at a
    time, each new one loading the config's router.path."""

    pid: int
    count: int

    def restart(self) -> None:
        """Ask the supervisor to replace every worker; RouterError when this process's parent is not it."""
        if os.getppid() != self.pid:  # never signal a process that is not ours
            raise RouterError(
                f"this worker's parent (pid {os.getppid()}) is not the supervisor that started it ({self.pid}); "
                "restart the service to load the new router"
            )
        os.kill(self.pid, signal.SIGHUP)


def worker_app(config: Path, supervisor: Supervisor):
    """The app of one `serve --workers` process. A config or router folder that no longer loads (changed since the
    service started) is one logged line and uvicorn's startup-failure exit: a replacement worker then never takes
    over, and the workers serving stay."""
    import logging

    from uvicorn.config import STARTUP_FAILURE

    from ..serving.app import Service, create_app
    from ..serving.config import load_config

    try:
        return create_app(Service(load_config(config), workers=supervisor))
    except RouterError as e:
        logging.getLogger("uvicorn.error").error("worker not started: %s", e)
        raise SystemExit(STARTUP_FAILURE) from None


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
