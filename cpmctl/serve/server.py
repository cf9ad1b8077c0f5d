"""Running the app on uvicorn: a socket bound first (so `--port 0` knows its port before the banner), graceful
shutdown on SIGTERM / SIGINT (no new connections; the requests in flight, queued ones included, are answered;
then the engine stops), and a server in a thread for tests and benchmarks."""

from __future__ import annotations

import signal
import socket
import threading

from cpmctl import CpmctlError

SERVE_EXTRA = "pip install 'cpmctl[serve]'"


def require_serving_stack() -> None:
    """One line naming the extra when Starlette or uvicorn is missing."""
    missing = []
    for name in ("starlette", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise CpmctlError(f"serving needs {' and '.join(missing)}: {SERVE_EXTRA}")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CpmctlError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _server(app, graceful_timeout: float | None):
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=graceful_timeout)
    return uvicorn.Server(config)


def run(app, sock: socket.socket, graceful_timeout: float | None = None) -> str | None:
    """Serve until SIGTERM or SIGINT, then drain. Returns the signal's name (None if the server stopped by
    itself). uvicorn re-raises the signal it caught once it is done; the handlers installed here take it, so the
    command returns normally after the drain and exits 0."""
    server = _server(app, graceful_timeout)
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _frame: caught.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return signal.Signals(caught[0]).name if caught else None


class ServerThread:
    """The app on a loopback port in a daemon thread (tests, benchmarks): `url`, then `stop()` drains it."""

    def __init__(self, app, host: str = "127.0.0.1"):
        self.sock = bind(host, 0)
        self.url = url_of(self.sock)
        self.server = _server(app, graceful_timeout=30)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30) -> "ServerThread":
        self.thread.start()
        for _ in range(int(timeout / 0.01)):
            if self.server.started:
                return self
            if not self.thread.is_alive():
                break
            threading.Event().wait(0.01)
        raise RuntimeError("the server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
