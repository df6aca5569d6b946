"""Pure decision code (no I/O): placement, prefetch, eviction, billing.

Actors and the simulator import the same functions, so what the simulator measures is what
the cluster runs. An import-linter contract keeps this package free of trio, zmq, redis and torch.
"""
