"""The service with parts of its per-request work switched off, to price each part.

Not what users run: ``bench/load.py --configs memory,memory-nolog,memory-bare``
uses these to show what the access log and the metrics cost under load, next to
the shipped service and the reference. ``OPTIN_METRICS=false`` turns metrics
off through the service's own setting; the access log has no setting, so the
``nolog`` apps disable its logger.
"""

import logging

from optin_service import create_app

app = create_app()
nolog = create_app()
logging.getLogger("optin_service.access").disabled = True
