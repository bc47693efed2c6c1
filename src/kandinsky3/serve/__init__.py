"""``kandinsky3 serve``: an HTTP server (FastAPI + uvicorn, the ``serve`` extra) over a durable SQLite job queue.

>>> from kandinsky3.serve import ServeConfig, create_app      # an ASGI app for any ASGI server
>>> serve_main(["--models", "nano", "--port", "8000"])        # what ``kandinsky3 serve`` runs
"""

from __future__ import annotations

import argparse

from .config import API_KEY_ENV, ServeConfig, add_serve_args, config_from_args

__all__ = [
    "API_KEY_ENV",
    "ServeConfig",
    "add_serve_args",
    "build_parser",
    "config_from_args",
    "create_app",
    "serve_main",
]


def create_app(config: ServeConfig | None = None, **kwargs):
    from .app import create_app as _create_app

    return _create_app(config, **kwargs)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="kandinsky3 serve", description="HTTP server: jobs API, web UI at /, OpenAPI at /docs (docs/serve.md)"
    )
    return add_serve_args(parser)


def serve_main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (the options of :class:`ServeConfig`) and serve until interrupted."""
    return run_server(config_from_args(build_parser().parse_args(argv)))


def run_server(config: ServeConfig) -> int:
    try:
        import uvicorn
    except ImportError:  # pragma: no cover - depends on the install
        raise SystemExit("kandinsky3 serve needs the serve extra: pip install 'kandinsky3[serve]'") from None
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=config.log_level)
    return 0
