"""Production defaults for ``gunicorn wsgi:app`` (gunicorn reads this file from the working dir).

Every value can still be overridden on the command line (``-w 8 -b 0.0.0.0:8000``)
or through ``GUNICORN_CMD_ARGS``.
"""

import os
from urllib.parse import urlsplit

bind = [os.environ.get("OPTIN_BIND", "127.0.0.1:8000")]
# Sync workers: one request per worker at a time, nothing shared between them
# but the store. WEB_CONCURRENCY is the usual knob for the worker count.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "sync"
# A request that takes longer than this is a stuck worker: storage calls give
# up after about a second, so 30 s only catches real hangs.
timeout = 30
# On SIGTERM, let in-flight requests finish for up to this long.
graceful_timeout = 30
# Build the app in each worker, after fork, so no connection crosses a fork.
preload_app = False
accesslog = "-"


def on_starting(server) -> None:  # noqa: ANN001 - gunicorn's Arbiter
    """Refuse a per-process store shared by several workers: each would see its own data."""
    scheme = urlsplit(os.environ.get("OPTIN_STORAGE_URL", "")).scheme
    if scheme == "memory" and server.cfg.workers > 1:
        raise RuntimeError(
            f"OPTIN_STORAGE_URL=memory:// keeps state inside one process, but gunicorn "
            f"is set to {server.cfg.workers} workers: each would answer from its own "
            "copy. Use -w 1, or a shared store (sqlite:///path.db, redis://host:6379/0)."
        )


def worker_exit(server, worker) -> None:  # noqa: ANN001 - gunicorn's Arbiter and Worker
    """Close the store's connections when a worker stops."""
    app = getattr(worker, "wsgi", None)
    state = getattr(app, "extensions", {}).get("optin") if app is not None else None
    if state is not None:
        state.store.close()
