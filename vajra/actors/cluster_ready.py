"""Waiting for a started cluster to serve: what ``vajra up`` does before it prints ready."""

from __future__ import annotations

import trio

from vajra.config import VajraConfig
from vajra.state import ClusterState, OffLoop


async def wait_cluster_ready(cfg: VajraConfig, executors: int) -> None:
    """Wait until the gateway answers and every executor has a heartbeat."""
    from vajra.client import AsyncClient, AuthError
    from vajra.errors import VajraError

    state = ClusterState(cfg.cluster.redis_url)
    redis = OffLoop()
    want = {f"exec-{i}" for i in range(executors)}
    try:
        while True:
            try:
                beats = {hb.executor_id for hb in await redis.run(state.heartbeats.list)}
            except VajraError:  # Valkey restarting under us
                beats = set()
            if want <= beats:
                break
            await trio.sleep(0.1)
    finally:
        state.close()
    while True:
        try:
            async with AsyncClient(
                cfg.cluster.gateway_address, api_key=cfg.http.admin_key, timeout_s=1.0
            ) as c:
                await c.stats()
            break
        except AuthError:  # refused without the admin key: it answers, so it serves
            break
        except Exception:  # the gateway process may still be importing
            await trio.sleep(0.1)
    while cfg.http.enabled:
        try:
            stream = await trio.open_tcp_stream(cfg.http.host, cfg.http.port)
            await stream.aclose()
            return
        except OSError:  # the bridge binds once it is connected and ready
            await trio.sleep(0.1)
