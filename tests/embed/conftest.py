"""Fixtures for the wrenn_embed (Python binding) suite: real capsules, booted
under whatever acceleration the host measured.

Install the binding first: ``pip install ./bindings/python`` (maturin builds it).
Needs root and the built images (``wrenn image build``; templates ``minimal``
and ``python``). ``WRENN_DATA_DIR`` selects the data directory.
"""

from __future__ import annotations

import os

import pytest

DATA_DIR = os.environ.get("WRENN_DATA_DIR", "/var/lib/wrenn")

# Test machines may have only a few GiB free, and these guests write little: the
# binding's host keeps room for a quarter of the capsules' disks (read when the first
# capsule is made, after this).
os.environ.setdefault("WRENN_DISK_OVERCOMMIT", "4")


def pytest_collection_modifyitems(config, items):  # noqa: ARG001
    problems = []
    if os.geteuid() != 0:
        problems.append("the wrenn_embed suite must run as root (capsules need network namespaces)")
    if not os.path.isdir(os.path.join(DATA_DIR, "templates", "minimal")):
        problems.append(f"no template 'minimal' under {DATA_DIR}: run `wrenn image build` first")
    try:
        import wrenn_embed  # noqa: F401
    except ImportError as e:
        problems.append(f"wrenn_embed is not installed ({e}): pip install ./bindings/python")
    here = os.path.dirname(os.path.abspath(__file__))
    if problems and any(str(i.fspath).startswith(here) for i in items):
        # Fail loudly rather than skip: these tests are part of the acceptance run.
        raise pytest.UsageError("tests/embed: " + "; ".join(problems))


@pytest.fixture(scope="module")
def capsule():
    """One capsule shared by a module's tests (creates are cheap but not free)."""
    from wrenn_embed import Capsule

    with Capsule(template="minimal", envs={"CAPSULE_ENV": "from-create"}, metadata={"suite": "embed"}) as c:
        yield c
