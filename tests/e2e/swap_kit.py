"""What the swap tests share: free metrics ports, an executor's event counters, one answer.

The actors of a ``vajra up`` with ``cluster.metrics_port = P`` serve /metrics on P..P+3 and
the executors on P+10, P+11, ...
"""

from __future__ import annotations

import random
import re
import socket
import urllib.request

from vajra.client import AsyncClient


def _ephemeral_low() -> int:
    """The first port the kernel hands out for bind(0) and outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_metrics_base(executors: int = 1) -> int:
    """A port P such that P..P+3 and the executors' P+10.. are free now.

    P is drawn below the kernel's ephemeral range: the cluster binds these ports minutes after
    this runs (at collection), and a port from the ephemeral range may by then be taken by any
    other test's bind(0) or outgoing connection (a CI run failed so once).
    """
    offsets = (0, 1, 2, 3, *(10 + i for i in range(executors)))
    high = min(_ephemeral_low(), 65_000) - max(offsets) - 1
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10_000, high)
        try:
            for off in offsets:
                with socket.socket() as t:
                    t.bind(("127.0.0.1", base + off))
        except OSError:
            continue
        return base
    raise RuntimeError("no free metrics ports")


def executor_counters(metrics_base: int, executor: int = 0) -> dict[str, float]:
    """One executor's event counters from its /metrics endpoint (blocking)."""
    url = f"http://127.0.0.1:{metrics_base + 10 + executor}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r'vajra_actor_events_total\{[^}]*event="([^"]+)"[^}]*\} (\S+)', text):
        out[m.group(1)] = float(m.group(2))
    return out


async def answer(
    c: AsyncClient, prompt: str, adapter: str, max_tokens: int, *, stream: bool
) -> list[int]:
    """The token ids one request gets, streamed or not."""
    if not stream:
        return list((await c.infer(prompt, adapter=adapter, max_tokens=max_tokens)).tokens)
    tokens: list[int] = []
    async with c.stream(prompt, adapter=adapter, max_tokens=max_tokens) as s:
        async for chunk in s:
            tokens += chunk.token_ids
    return tokens
