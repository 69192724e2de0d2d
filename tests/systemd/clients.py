"""Poetry clients the tests run inside the container, with the container's Python.

``early PORT``: connect, say ``connected AT`` (CLOCK_MONOTONIC, shared with the host and
systemd's timestamps), then read the poem to the end; say ``received N`` and exit 0.

``load PORT SECONDS CLIENTS``: keep CLIENTS fetches going for SECONDS, each client
fetching again as soon as one ends; print one JSON line: fetches that got the whole poem
and the failures' reasons.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time

import tend.poetry


def early(port: int) -> int:
    with socket.create_connection(("localhost", port), timeout=30) as sock:
        print(f"connected {time.monotonic():.6f}", flush=True)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    print(f"received {len(b''.join(chunks))}", flush=True)
    return 0


async def load(port: int, seconds: float, clients: int, size: int) -> dict[str, object]:
    end = time.monotonic() + seconds
    whole = 0
    failures: list[str] = []

    async def client() -> None:
        nonlocal whole
        while time.monotonic() < end:
            try:
                poem = await tend.poetry.get_poetry("localhost", port, timeout=20)
            except tend.poetry.PoetryError as error:
                failures.append(str(error))
            else:
                if len(poem) == size:
                    whole += 1
                else:
                    failures.append(f"{len(poem)} bytes instead of {size}")

    async with asyncio.TaskGroup() as group:
        for _ in range(clients):
            group.create_task(client())
    return {"whole": whole, "failures": failures}


def main() -> int:
    command, port = sys.argv[1], int(sys.argv[2])
    if command == "early":
        return early(port)
    seconds, clients, size = float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    print(json.dumps(asyncio.run(load(port, seconds, clients, size))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
