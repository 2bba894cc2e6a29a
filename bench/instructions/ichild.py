import io
import os
import random
import sys
import tempfile

root = sys.argv[1]
n = int(sys.argv[2])
spec = sys.argv[3] if len(sys.argv) > 3 else "wsgi:app"
sys.path.insert(0, root)
os.chdir(root)
os.environ.setdefault("OPTIN_STORAGE_URL", "memory://")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp()
sys.stderr = open(os.devnull, "w")
mod, _, name = spec.partition(":")
app = getattr(__import__(mod, fromlist=[name]), name)
from werkzeug.test import EnvironBuilder  # noqa: E402  (after the app: same import order as a worker)

BODIES = (b'{"LOYALTY_OPTIN": "accepted"}', b'{"LOYALTY_OPTIN": "declined"}')
base = EnvironBuilder(
    path="/", method="PUT", headers={"Content-Type": "application/json"}, data=BODIES[0]
).get_environ()
base["REMOTE_ADDR"] = "127.0.0.1"
rng = random.Random(1)


def sr(s, h, e=None):
    pass


def one():
    environ = dict(base)
    environ["PATH_INFO"] = f"/client/users/member-{rng.randrange(1_000_000):07d}/profile/optin"
    body = BODIES[rng.randrange(2)]
    environ["CONTENT_LENGTH"] = str(len(body))
    environ["wsgi.input"] = io.BytesIO(body)
    r = app(environ, sr)
    b"".join(r)
    r.close()


for _ in range(300 + n):
    one()
