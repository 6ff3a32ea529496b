"""The built-in `code-runner-beta` template through the unmodified `wrenn` SDK's
`wrenn.code_runner.Capsule().run_code(...)`: Jupyter on port 8888 reached through the
port proxy (`GET/POST /api/kernels`, the kernel's WebSocket channels), a `wrenn`
kernelspec, with real guests.

The SDK's proxy URLs are `8888-<capsule>.<WRENN_PROXY_DOMAIN>`; `localhost:<port>`
names are resolved to the server's loopback address here, as a DNS wildcard would.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import zlib

import pytest
from wrenn.code_runner import Capsule

from conftest import IMAGES

TEMPLATE = "code-runner-beta"


@pytest.fixture(autouse=True)
def _template_built():
    if not os.path.isfile(os.path.join(IMAGES, "templates", TEMPLATE, "snapshot", "meta.json")):
        pytest.fail(f"no {TEMPLATE} template under {IMAGES}: run ./scripts/images.sh")


@pytest.fixture
def runner_env(server, monkeypatch):
    """The SDK pointed at the server, its proxy host names resolvable."""
    monkeypatch.setenv("WRENN_BASE_URL", server.url)
    monkeypatch.setenv("WRENN_API_KEY", server.admin_key)
    port = server.url.rsplit(":", 1)[1]
    monkeypatch.setenv("WRENN_PROXY_DOMAIN", f"localhost:{port}")
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        if isinstance(host, str) and host.endswith(".localhost"):
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return server


def png_1x1() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b"")


@pytest.fixture
def runner(runner_env):
    c = Capsule(wait=True, timeout=600)
    yield c
    c.destroy()


def test_values_output_and_state(runner):
    first = runner.run_code("x = 41\nx + 1", timeout=120)
    assert first.error is None, first.error
    assert first.text == "42"
    assert first.execution_count is not None

    out = runner.run_code("import sys\nprint('hello')\nprint('oops', file=sys.stderr)")
    assert out.error is None
    assert "".join(out.logs.stdout) == "hello\n"
    assert "".join(out.logs.stderr) == "oops\n"
    assert out.results == []

    # State is kept between calls: the same kernel.
    kept = runner.run_code("x * 2")
    assert kept.text == "82"
    runner.run_code("def double(v):\n    return v * 2")
    assert runner.run_code("double(21)").text == "42"


def test_errors_carry_the_traceback(runner):
    ex = runner.run_code("def boom():\n    return 1 / 0\nboom()")
    assert ex.error is not None
    assert ex.error.name == "ZeroDivisionError"
    assert "division by zero" in ex.error.value
    assert "boom" in ex.error.traceback and "ZeroDivisionError" in ex.error.traceback
    # The kernel survives it.
    assert runner.run_code("1 + 1").text == "2"
    syntax = runner.run_code("def (:")
    assert syntax.error is not None and syntax.error.name == "SyntaxError"


def test_rich_results(runner):
    png = png_1x1()
    code = (
        "import base64\n"
        "from IPython.display import HTML, Image, display\n"
        f"display(Image(data=base64.b64decode({base64.b64encode(png).decode()!r})))\n"
        "display(HTML('<b>bold</b>'))\n"
        "{'a': 1}"
    )
    ex = runner.run_code(code)
    assert ex.error is None, ex.error
    images = [r for r in ex.results if r.png]
    assert len(images) == 1
    assert base64.b64decode(images[0].png) == png
    assert any(r.html == "<b>bold</b>" for r in ex.results)
    main = [r for r in ex.results if r.is_main_result]
    assert len(main) == 1 and main[0].text == "{'a': 1}"


def test_the_kernel_knows_its_capsule(runner):
    """The kernel was running when the template's snapshot was taken; it still sees
    the identity of the capsule it was restored into, not the build's."""
    ex = runner.run_code("import os\n(os.environ['WRENN_CAPSULE_ID'], os.environ['WRENN_TEMPLATE_ID'])")
    assert ex.error is None, ex.error
    assert ex.text == repr((runner.capsule_id, TEMPLATE))
    child = runner.run_code("import subprocess\nprint(subprocess.run(['sh', '-c', 'echo $WRENN_CAPSULE_ID'], capture_output=True, text=True).stdout)")
    assert "".join(child.logs.stdout).strip() == runner.capsule_id
    # Other commands of the capsule run as ever.
    assert runner.commands.run("python3 -c 'import ipykernel; print(1)'").stdout.strip() == "1"


def test_two_capsules_do_not_share_state(runner_env):
    a, b = Capsule(wait=True, timeout=600), Capsule(wait=True, timeout=600)
    try:
        a.run_code("secret = 'a only'")
        ex = b.run_code("secret")
        assert ex.error is not None and ex.error.name == "NameError"
        assert a.run_code("secret").text == "'a only'"
    finally:
        a.destroy()
        b.destroy()
