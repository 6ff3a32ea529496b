#!/usr/bin/env python3
"""Capsules from Python, in-process (no server): the wrenn_embed binding.

Setup (once, as root, after ./scripts/setup.sh has built the images):

    pip install ./bindings/python      # builds the Rust extension with maturin
    python3 examples/python_embed.py

The same code runs against a remote Wrenn with the reference SDK by changing
the import to ``from wrenn import Capsule`` (and setting WRENN_API_KEY): the
calls used here exist in both.
"""

import asyncio
import time

from wrenn_embed import AsyncCapsule, Capsule, CommandNotFoundError, GuestNotFoundError


def sync_demo() -> None:
    t = time.monotonic()
    # `with` destroys the capsule at the end (so would garbage collection or exit).
    with Capsule(template="python", envs={"GREETING": "hello"}) as capsule:
        print(f"capsule {capsule.capsule_id} up in {time.monotonic() - t:.2f} s ({capsule.info.accel})")

        # A shell command; a non-zero exit code is part of the result, not an error.
        r = capsule.commands.run("echo $GREETING from $(uname -n); python3 -c 'print(6 * 7)'; exit 3")
        print(f"exit {r.exit_code}: {r.stdout!r}")

        # Output as it comes.
        capsule.commands.run(
            "for i in 1 2 3; do echo tick $i; sleep 0.3; done",
            on_stdout=lambda s: print("  streamed:", s.strip()),
        )

        # Files in, files out.
        capsule.files.write("/home/user/job.py", "import sys\nprint(sum(map(int, sys.argv[1:])))\n")
        print("sum:", capsule.commands.run("python3 /home/user/job.py 1 2 3 4").stdout.strip())
        print("listing:", [e.name for e in capsule.files.list("/home/user")])

        # A background process, fed through stdin.
        bg = capsule.commands.run("python3 -c 'import sys; print(sys.stdin.read().upper())'", background=True)
        bg.send_stdin("shout this\n")
        bg.close_stdin()
        print("background:", bg.wait().stdout.strip())

        # Pause (memory and disk to disk, no VM running), resume, fork.
        capsule.pause()
        capsule.resume()
        (twin,) = capsule.fork(1)
        print("fork sees the file:", twin.files.exists("/home/user/job.py"))
        twin.destroy()

        # Errors are typed.
        try:
            capsule.files.read("/no/such/file")
        except GuestNotFoundError as e:
            print(f"{type(e).__name__} ({e.kind}): {e}")
        try:
            capsule.commands.run(["no-such-program"])
        except CommandNotFoundError as e:
            print(f"{type(e).__name__} ({e.kind})")


async def async_demo() -> None:
    async with await AsyncCapsule.create(template="minimal") as capsule:
        outs = await asyncio.gather(*(capsule.commands.run(f"sleep 0.5; echo job {i}") for i in range(3)))
        print("async:", [o.stdout.strip() for o in outs])
        async for event in capsule.commands.stream("echo streamed; exit 2"):
            print("  event:", event)


if __name__ == "__main__":
    sync_demo()
    asyncio.run(async_demo())
