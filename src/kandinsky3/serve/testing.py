"""A real uvicorn server on 127.0.0.1 in a background thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time


class ServerThread:
    """``with ServerThread(app) as server: httpx.get(server.url + "/healthz")`` — binds a free port first, so
    the URL is known before the server starts; ``wait_ready()`` waits for ``/readyz``."""

    def __init__(self, app, host: str = "127.0.0.1", log_level: str = "warning"):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_keep_alive=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout: float = 120.0) -> "ServerThread":
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            r = httpx.get(self.url + "/readyz", timeout=10)
            if r.status_code == 200:
                return self
            if r.json().get("errors") or time.monotonic() > deadline:
                raise RuntimeError(f"the server is not ready: {r.text}")
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()
