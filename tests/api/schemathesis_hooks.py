"""Schemathesis hooks for test_openapi.py (loaded through ``SCHEMATHESIS_HOOKS``).

Keeps the capsules the fuzzer creates bounded: at most ``KEEP`` of them live at once,
the oldest destroyed first (recent ones stay, so a follow-up request of the stateful
phase still finds what it just created). Each is destroyed with the credentials that
created it. Template builds the fuzzer queues are cancelled at once (a build runs in a
capsule of its own). The test's teardown sweeps the rest.

Build requests lose their container image base before they are sent: the server would
resolve the generated registry names (DNS queries off this machine) and try to reach
them. tests/api/test_oci_images.py covers image bases with a registry of its own.
"""

from __future__ import annotations

import collections
import json
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


IMAGE_KEYS = ("base_image", "fromImage", "fromImageRegistry", "registry")


def _without_images(body):
    if isinstance(body, dict):
        out = {k: _without_images(v) for k, v in body.items() if k not in IMAGE_KEYS}
        if isinstance(out.get("config"), str):
            try:
                out["config"] = json.dumps(_without_images(json.loads(out["config"])))
            except ValueError:
                pass
        return out
    return body


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.method.upper() == "POST" and "/builds" in case.path:
        case.body = _without_images(case.body)


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
