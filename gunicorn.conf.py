"""Production defaults for ``gunicorn wsgi:app`` (gunicorn reads this file from the working dir).

Every value can still be overridden on the command line (``-w 8 -b 0.0.0.0:8000``)
or through ``GUNICORN_CMD_ARGS``.
"""

import os
import shutil
import sys
import tempfile
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
# gunicorn >= 25's control socket defaults to one path per user: two services on
# one machine would take each other's. Turn it on with --control-socket PATH.
control_socket_disable = True
# The app writes its own access line (JSON, with request id, route and backend).
accesslog = None


# The metrics folder this config made, removed on exit. Kept in the master's
# environment: a SIGHUP reloads this file, and a module global would be lost.
_MADE = "OPTIN_METRICS_FOLDER_MADE"


def _metrics_enabled() -> bool:
    # optin_service.defaults loads nothing of the app (see optin_service/__init__.py).
    from optin_service.defaults import flag

    return flag("OPTIN_METRICS", os.environ.get("OPTIN_METRICS"), default=True)


def on_starting(server) -> None:  # noqa: ANN001 - gunicorn's Arbiter
    """Check the storage choice, and give the workers an empty folder for their metrics."""
    _refuse_memory_with_several_workers(server)
    if _metrics_enabled():
        # Every worker writes its samples here and /metrics sums them. It must be
        # empty at start: files of a previous run would be summed in.
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if path:
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
        else:
            # prometheus-client reads the variable once, when first imported, and
            # the workers inherit the master's modules: imported before this point
            # (by --preload, say), every worker would count alone, /metrics empty.
            if "prometheus_client" in sys.modules:
                raise RuntimeError(
                    "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR "
                    "was set (--preload?), so /metrics could not sum the workers. "
                    "Set PROMETHEUS_MULTIPROC_DIR to an empty folder, drop --preload, "
                    "or set OPTIN_METRICS=false."
                )
            path = tempfile.mkdtemp(prefix="optin-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ[_MADE] = path
        server.log.info("metrics of all workers collected in %s", path)


def when_ready(server) -> None:  # noqa: ANN001 - gunicorn's Arbiter
    """With OPTIN_METRICS_PORT set, also serve /metrics on its own port from the master."""
    port = os.environ.get("OPTIN_METRICS_PORT")
    if port and _metrics_enabled():
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        host = os.environ.get("OPTIN_METRICS_HOST", "127.0.0.1")
        start_http_server(int(port), addr=host, registry=registry)
        server.log.info("metrics on http://%s:%s/metrics", host, port)


def child_exit(server, worker) -> None:  # noqa: ANN001 - gunicorn's Arbiter and Worker
    """Tell prometheus-client a worker is gone (its live gauges stop counting)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:  # noqa: ANN001 - gunicorn's Arbiter
    """Remove the metrics folder this config made (one given by the operator stays)."""
    path = os.environ.get(_MADE)
    if path:
        shutil.rmtree(path, ignore_errors=True)


def _refuse_memory_with_several_workers(server) -> None:  # noqa: ANN001
    """Refuse a per-process store shared by several workers: each would see its own data."""
    scheme = urlsplit(os.environ.get("OPTIN_STORAGE_URL", "")).scheme
    if scheme == "memory" and server.cfg.workers > 1:
        raise RuntimeError(
            f"OPTIN_STORAGE_URL=memory:// keeps state inside one process, but gunicorn "
            f"is set to {server.cfg.workers} workers: each would answer from its own "
            "copy. Use -w 1, or a shared store (sqlite:///path.db, redis://host:6379/0)."
        )


def _optin_state(worker):  # noqa: ANN001, ANN202 - gunicorn's Worker; OptInState or None
    """The opt-in state of the app this worker loaded (None before it is loaded, or for
    an app that is not a Flask app carrying the extension)."""
    app = getattr(worker, "wsgi", None)
    return getattr(app, "extensions", {}).get("optin") if app is not None else None


def _refuse_waits_beyond_the_worker_timeout(worker) -> None:  # noqa: ANN001
    """Refuse a store that may block one call longer than half gunicorn's worker timeout,
    or a body deadline that long: past the timeout, gunicorn kills the worker
    mid-request (the client gets an empty reply, not a 503 or a 408), and the other
    half leaves room for the rest of the request."""
    state = _optin_state(worker)
    wait = state.store.max_wait if state is not None else None
    limit = worker.cfg.timeout  # 0: gunicorn never kills a worker
    if wait is not None and limit and wait > limit / 2:
        raise RuntimeError(
            f"the opt-in store ({state.store_name}) may wait {wait:g} s for storage, "
            f"but gunicorn kills a worker after {limit:g} s: lower the store's wait to "
            f"at most {limit / 2:g} s (half the worker timeout), or raise --timeout"
        )
    body = state.body_timeout if state is not None else None
    if body is not None and limit and body > limit / 2:
        raise RuntimeError(
            f"OPTIN_BODY_TIMEOUT_SECONDS is {body:g} s, but gunicorn kills a worker after "
            f"{limit:g} s: a stalled body would cost the worker, not a 408; set it to at "
            f"most {limit / 2:g} s (half the worker timeout), or raise --timeout"
        )


def post_worker_init(worker) -> None:  # noqa: ANN001 - gunicorn's Worker
    """Refuse a store whose waits the worker timeout cannot cover; then answer what
    gunicorn refuses itself (a request it cannot parse, a request line over its limit)
    with the API's JSON envelope and the seed's headers, not gunicorn's HTML page:
    gunicorn has no setting for that page, only this one function."""
    _refuse_waits_beyond_the_worker_timeout(worker)
    from gunicorn import util

    from optin_service.errors import http_error

    def write_error(sock, status_int, reason, mesg) -> None:  # noqa: ANN001 - util's
        util.write_nonblock(sock, http_error(status_int, reason, mesg))

    util.write_error = write_error


def worker_exit(server, worker) -> None:  # noqa: ANN001 - gunicorn's Arbiter and Worker
    """Close the store's connections when a worker stops."""
    state = _optin_state(worker)
    if state is not None:
        state.store.close()
        server.log.info("worker %s closed its store", worker.pid)
