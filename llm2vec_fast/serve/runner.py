"""Run the app under uvicorn. SIGTERM / SIGINT drain the server: it stops accepting connections,
answers 503 (``Retry-After``) to new requests on open connections, lets in-flight requests finish
(up to ``graceful_timeout`` seconds), then stops the batcher and exits."""

from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """A uvicorn server that marks the app as draining as soon as a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig, frame) -> None:
        if not self._app.state.draining:
            logger.warning("signal %s: draining (in-flight requests finish, new ones get 503)", sig)
        self._app.state.draining = True
        super().handle_exit(sig, frame)


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8080, log_level: str = "warning", graceful_timeout: float = 30.0) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, then drain (blocks)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=graceful_timeout,
        access_log=log_level in ("info", "debug"),
    )
    DrainingServer(config, app).run()
