"""Client load through gunicorn for failover tests: writers that retry with their
Idempotency-Key and remember what was acknowledged and when, and a /readyz poller.

Shared by the Redis topologies (tests/test_topologies.py) and PostgreSQL's primary
and standby (tests/test_postgres_failover.py). Every loop is bounded in count and time.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter

import requests

from tests.servers import Gunicorn
from tests.topologies import wait_until

TIMEOUT = 5.0  # seconds, for every HTTP request
STATUSES = ("accepted", "declined")


class WriteLoad:
    """Client threads PUTting new members through gunicorn, without pause.

    Each logical write has its own Idempotency-Key and is sent again with it
    after a 503 or a lost connection, for at most ``retry_for`` seconds. What
    was acknowledged (200) is kept with the time of the acknowledgement.
    ``timeout``: how long one request may take (above the service's longest
    answer, so a slow 503 is seen as a 503, not as a client timeout).
    """

    def __init__(
        self, base: str, threads: int = 4, retry_for: float = 20.0, timeout: float = TIMEOUT
    ) -> None:
        self.base = base
        self.retry_for = retry_for
        self.timeout = timeout
        self.lock = threading.Lock()
        self.acked: dict[str, str] = {}  # id -> status answered 200
        self.acked_at: dict[str, float] = {}  # id -> when it was answered 200
        self.ack_times: list[float] = []
        self.given_up: dict[str, str] = {}  # id -> status never acknowledged
        self.first_failure: dict[str, float] = {}  # id -> first 503 or connection error
        self.answers: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._writer, args=(tid,), daemon=True)
            for tid in range(threads)
        ]

    def start(self) -> WriteLoad:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=self.retry_for + 15)
        assert not any(t.is_alive() for t in self.threads), "writers did not stop"

    def _writer(self, tid: int) -> None:
        try:
            with requests.Session() as http:
                for n in range(1_000_000):
                    if self.stopping.is_set():
                        return
                    self.write(http, f"w{tid}-{n}", STATUSES[(tid + n) % 2])
        except Exception as exc:  # reported by the test, not lost in a thread
            with self.lock:
                self.unexpected.append(f"writer {tid}: {exc!r}")

    def write(self, http: requests.Session, cid: str, status: str) -> None:
        key = uuid.uuid4().hex
        deadline = time.monotonic() + self.retry_for
        url = f"{self.base}/client/users/{cid}/profile/optin"
        for _ in range(5000):
            if time.monotonic() > deadline:
                break
            try:
                resp = http.put(
                    url,
                    json={"LOYALTY_OPTIN": status},
                    headers={"Idempotency-Key": key},
                    timeout=self.timeout,
                )
            except requests.RequestException as exc:
                with self.lock:
                    self.answers[type(exc).__name__] += 1
                    self.first_failure.setdefault(cid, time.monotonic())
                time.sleep(0.05)
                continue
            with self.lock:
                self.answers[str(resp.status_code)] += 1
                if resp.status_code == 200:
                    now = time.monotonic()
                    self.acked[cid] = status
                    self.acked_at[cid] = now
                    self.ack_times.append(now)
                    return
                if resp.status_code != 503:
                    self.unexpected.append(f"PUT {cid}: {resp.status_code} {resp.text[:200]}")
                    return
                self.first_failure.setdefault(cid, time.monotonic())
            time.sleep(0.05)
        with self.lock:
            self.given_up[cid] = status

    def acks_after(self, moment: float) -> int:
        with self.lock:
            return sum(1 for t in self.ack_times if t > moment)

    def longest_gap(self, start: float, end: float) -> tuple[float, float]:
        """The longest time in [start, end] without an acknowledgement: (length, start)."""
        with self.lock:
            times = sorted(t for t in self.ack_times if start <= t <= end)
        edges = [start, *times, end]
        return max((b - a, a) for a, b in itertools.pairwise(edges))


class Readiness:
    """Polls /readyz every 0.1 s in a thread, keeping (time, status code)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.seen: list[tuple[float, int]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> Readiness:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=15)

    def _poll(self) -> None:
        with requests.Session() as http:
            for _ in range(10_000):
                if self.stopping.is_set():
                    return
                try:
                    code = http.get(f"{self.base}/readyz", timeout=TIMEOUT).status_code
                except requests.RequestException:
                    code = 0
                self.seen.append((time.monotonic(), code))
                time.sleep(0.1)

    def codes_between(self, start: float, end: float) -> list[int]:
        return [code for t, code in self.seen if start <= t <= end]


def gunicorn_log_tail(server: Gunicorn, chars: int = 4000) -> str:
    text = server.log()
    return f"\n--- gunicorn log ---\n{text[-chars:]}\n--- end ---"


def wait_ready(server: Gunicorn, timeout: float = 15.0) -> None:
    def probe() -> bool:
        return requests.get(f"{server.base}/readyz", timeout=TIMEOUT).status_code == 200

    wait_until("gunicorn ready", probe, timeout=timeout, every=0.1)
