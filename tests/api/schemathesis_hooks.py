"""Schemathesis hooks for test_openapi.py (loaded through ``SCHEMATHESIS_HOOKS``).

Keeps the capsules the fuzzer creates bounded: at most ``KEEP`` of them live at once,
the oldest destroyed first (recent ones stay, so a follow-up request of the stateful
phase still finds what it just created). Each is destroyed with the credentials that
created it. Template builds the fuzzer queues are cancelled at once (a build runs in a
capsule of its own). The test's teardown sweeps the rest.
"""

from __future__ import annotations

import collections
import os

import httpx
import schemathesis

URL = os.environ["WRENN_ST_URL"]
KEEP = 3
AUTH_HEADERS = ("x-api-key", "authorization")

_live: collections.deque = collections.deque()


def _created_capsules(response) -> list[str]:
    try:
        body = response.json()
    except Exception:  # noqa: BLE001 - not JSON: nothing was created
        return []
    out = []
    for item in body if isinstance(body, list) else [body]:
        if not isinstance(item, dict):
            continue
        sb = item.get("sandbox") if isinstance(item.get("sandbox"), dict) else item
        cid = sb.get("sandboxID") or sb.get("id")
        if isinstance(cid, str) and cid.startswith("cl-"):
            out.append(cid)
    return out


@schemathesis.hook
def after_call(context, case, response):
    if case.method.upper() != "POST" or response.status_code not in (200, 201, 202):
        return
    sent = response.request.headers
    auth = {k: v for k, v in sent.items() if k.lower() in AUTH_HEADERS}
    if response.status_code == 202:
        try:
            build = response.json().get("id", "")
        except Exception:  # noqa: BLE001 - not JSON: nothing was queued
            build = ""
        if isinstance(build, str) and build.startswith("bld-"):
            httpx.post(f"{URL}/v1/builds/{build}/cancel", headers=auth, timeout=60)
        return
    for cid in _created_capsules(response):
        if all(cid != c for c, _ in _live):
            _live.append((cid, auth))
    while len(_live) > KEEP:
        cid, auth = _live.popleft()
        httpx.delete(f"{URL}/v1/capsules/{cid}", headers=auth, timeout=60)
