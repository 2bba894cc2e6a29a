import http.client
import random
import sys

port, n = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(2)
bodies = (b'{"LOYALTY_OPTIN": "accepted"}', b'{"LOYALTY_OPTIN": "declined"}')
for i in range(n):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request(
        "PUT",
        f"/client/users/member-{rng.randrange(10**6):07d}/profile/optin",
        bodies[i % 2],
        {"Content-Type": "application/json"},
    )
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
    c.close()
