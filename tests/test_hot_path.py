"""The request path's shortcuts give exactly what the plain library calls they stand for give."""

from __future__ import annotations

from flask import Response
from hypothesis import given
from hypothesis import strategies as st

from optin_service.headers import REQUEST_ID_HEADERS, RESPONSE_HEADERS, SEED_HEADERS, apply_headers

#: Names a response may carry before ``apply_headers``: the fixed ones in other casings,
#: a host's own, and Flask's.
_NAMES = [
    *(name for name, _ in RESPONSE_HEADERS),
    *(name.upper() for name, _ in RESPONSE_HEADERS),
    *(name.lower() for name in REQUEST_ID_HEADERS),
    "Content-Type",
    "X-Host-Header",
]


@given(
    before=st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(["a", "b c"])), max_size=8),
    standalone=st.booleans(),
)
def test_apply_headers_gives_what_setting_each_header_in_turn_gives(before, standalone):
    fixed = SEED_HEADERS if standalone else RESPONSE_HEADERS
    rid = "7f1c6e0e-3b9a-4d6e-9d8e-2f4b8a6c1d20"
    response = apply_headers(Response(headers=before), fixed, rid)
    expected = Response(headers=before)
    for name, value in (*fixed, *((name, rid) for name in REQUEST_ID_HEADERS)):
        expected.headers[name] = value
    assert response.headers.to_wsgi_list() == expected.headers.to_wsgi_list()
