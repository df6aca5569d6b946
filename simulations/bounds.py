"""Cold-start bounds of a config's trace, independent of any placement or prefetch policy.

For the trace a config replays (:func:`simulations.workload.build_trace`) and its cluster's GPU
slots, counts the cold starts (an adapter not in GPU memory at its arrival) of three reference
placements, each with LRU eviction and no prefetch:

* ``compulsory``: the distinct adapters, the fewest cold starts any placement can have;
* ``one_executor``: every request on one executor (``gpu_slots`` slots): what a placement that
  concentrates a tenant's requests (tenant affinity with one tenant, ties always to the same
  executor) tends to;
* ``spread``: every adapter stays on the executor that loaded it while it is held there, and
  an adapter held nowhere loads where fewest adapters are held (ties: the lowest index):
  ``executors x gpu_slots`` slots used as one partitioned pool.

``python -m simulations.bounds --config simulations/configs/NAME.toml [--json PATH]`` prints
the three counts as JSON. Errors: those of :func:`simulations.config.load_config` and of
:func:`simulations.workload.build_trace`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.config import load_config
from simulations.workload import build_trace


def lru_misses(adapters: Sequence[int], slots: int) -> int:
    """Cold starts of one LRU pool of ``slots`` adapters over the arrival order."""
    pool: OrderedDict[int, None] = OrderedDict()
    misses = 0
    for a in adapters:
        if a in pool:
            pool.move_to_end(a)
            continue
        misses += 1
        pool[a] = None
        if len(pool) > slots:
            pool.popitem(last=False)
    return misses


def spread_misses(adapters: Sequence[int], executors: int, slots: int) -> int:
    """Cold starts when hits stay where the adapter is held and a cold adapter loads on the
    executor holding the fewest adapters (each executor an LRU pool of ``slots``)."""
    pools: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(executors)]
    where: dict[int, int] = {}
    misses = 0
    for a in adapters:
        held = where.get(a)
        if held is not None:
            pools[held].move_to_end(a)
            continue
        misses += 1
        i = min(range(executors), key=lambda e: (len(pools[e]), e))
        pools[i][a] = None
        where[a] = i
        if len(pools[i]) > slots:
            evicted, _ = pools[i].popitem(last=False)
            del where[evicted]
    return misses


def bounds(config: str | Path) -> dict[str, Any]:
    cfg = load_config(config)
    adapters = [int(s) for s in build_trace(cfg).source.tolist()]
    n, slots = cfg.cluster.executors, cfg.cluster.gpu_slots
    return {
        "config": str(config),
        "requests": len(adapters),
        "executors": n,
        "gpu_slots": slots,
        "cold_starts": {
            "compulsory": len(set(adapters)),
            "one_executor": lru_misses(adapters, slots),
            "spread": spread_misses(adapters, n, slots),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bounds", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    text = json.dumps(bounds(args.config), indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
