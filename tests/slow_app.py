"""A service whose writes take a while, to see gunicorn finish them on SIGTERM."""

from __future__ import annotations

import os
import time

from backends.sqlite import SQLiteStore
from optin_service import create_app


class SlowStore(SQLiteStore):
    def set(self, record, *, idempotency_key=None):
        time.sleep(float(os.environ.get("SLOW_SECONDS", "2")))
        return super().set(record, idempotency_key=idempotency_key)


app = create_app()
app.extensions["optin"].store = SlowStore.from_url(os.environ["OPTIN_STORAGE_URL"])
