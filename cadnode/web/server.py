"""uvicorn in a thread of ``cadnode serve``: the socket is bound before the thread starts, so
that a port in use is a one-line start-up error and port 0 gives the port actually bound."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading

import uvicorn

from cadnode.config import SettingsError
from cadnode.web.app import Node, create_app

log = logging.getLogger(__name__)


class HttpServer:
    """The dashboard, /metrics, /healthz and /readyz on ``host:port``."""

    def __init__(self, node: Node, host: str, port: int) -> None:
        self.node, self.host = node, host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise SettingsError(_bind_error(host, port, exc)) from None
        self._sock.listen(128)
        self.port = int(self._sock.getsockname()[1])
        # log_config None: uvicorn's loggers propagate to the node's handlers and format
        config = uvicorn.Config(create_app(node), log_config=None, log_level="warning",
                                access_log=False,
                                lifespan="off", http="h11", ws="none", loop="asyncio",
                                timeout_keep_alive=5, server_header=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> HttpServer:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except Exception:
            log.exception("the web server stopped")

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()


def _bind_error(host: str, port: int, exc: OSError) -> str:
    """The one line for a web server that cannot bind."""
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (f"CADNODE_HTTP_PORT: {where} is already in use; stop what listens there or "
                "choose another port")
    if exc.errno == errno.EACCES:
        return f"CADNODE_HTTP_PORT: no permission to listen on {where} (ports below 1024 need it)"
    return (f"CADNODE_HTTP_HOST / CADNODE_HTTP_PORT: cannot listen on {where}: "
            f"{exc.strerror or exc}")
