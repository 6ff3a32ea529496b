"""Drives a natively running envd with the official e2b SDK.

Start envd first (scripts/setup.sh does), then: E2B_DEBUG=true python3 examples/envd_demo.py
"""

import os

os.environ.setdefault("E2B_DEBUG", "true")

from e2b import Sandbox  # noqa: E402

sbx = Sandbox.create()  # debug mode: no REST API, envd at localhost:49983
result = sbx.commands.run("echo hello from $(whoami) in $(pwd)")
print(result.stdout, end="")
sbx.files.write("demo/hello.txt", "written through envd\n")
print(sbx.files.read("demo/hello.txt"), end="")
print([e.name for e in sbx.files.list("demo")])
