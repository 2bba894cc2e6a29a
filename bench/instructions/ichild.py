import os
import sys
import tempfile

root = sys.argv[1]
n = int(sys.argv[2])
spec = sys.argv[3] if len(sys.argv) > 3 else "wsgi:app"
sys.path.insert(0, root)
sys.path.insert(0, os.path.join(root, "bench"))
os.chdir(root)
os.environ.setdefault("OPTIN_STORAGE_URL", "memory://")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp()
sys.stderr = open(os.devnull, "w")
mod, _, name = spec.partition(":")
app = getattr(__import__(mod, fromlist=[name]), name)
from inproc import put_caller  # noqa: E402  (after the app: same import order as a worker)

one = put_caller(app)
for _ in range(300 + n):
    one()
