"""A raw pyzmq ROUTER that sends every message straight back: the ceiling of the bus benchmark.

``vajra bench bus`` drives it with the same frames and load generator it drives the cluster
with, so its result carries what plain pyzmq does on the same machine. Run it as
``python -m vajra.bus.echo ADDRESS``; it prints ``ready`` once bound and serves until killed.
"""

from __future__ import annotations

import sys
from typing import Any

import zmq

from vajra.bus.zsocket import new_context


def serve_echo(address: str) -> None:
    """Bind a ROUTER to ``address``, say ``ready`` on stdout, then echo forever."""
    ctx: zmq.Context[Any] = new_context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(address)
    print("ready", flush=True)
    while True:
        sock.send_multipart(sock.recv_multipart())


if __name__ == "__main__":
    serve_echo(sys.argv[1])
