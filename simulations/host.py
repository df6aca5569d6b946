"""CPU contention on the machine a CPU cluster shares (``[host]``): how much slower a request
runs when the executors and the serving path want more cores than the machine has.

On a GPU cluster each executor computes on its own device and this does not apply (``cores`` =
0). A cluster of CPU executors (the tiny model, as ``vajra replay`` drives it here) runs every
process on the same cores: an executor that computes keeps one core busy, and each request in
flight keeps the serving path busy too (the client, the gateway, the scheduler, the ledger, the
predictor, Valkey). The model is processor sharing, decided once per request when it gets
its batch seat:

* demand, in cores = executors computing at that moment (this one included)
  + requests in flight x ``serving_cpu_ms`` / the request's uncontended latency
  (the serving path's CPU spread over the time the request is in flight)
  + ``background_cores`` (what the processes use while idle);
* the request's prefill, decode and serving-path times, and its adapter's load when it is
  cold (on a CPU host a load is CPU work too: page-cache reads, hashing, validation, packing,
  copies), are multiplied by max(1, demand / ``cores``), fixed for its lifetime like its batch
  size.

Every input is measured: ``cores`` is the machine's, ``serving_cpu_ms`` and
``background_cores`` come from ``vajra bench paced`` (CPU time of each process per request,
and idle). What it leaves out: the operating system's scheduling (a process woken on a busy core
waits for a time slice) and contention that changes during a request.
"""

from __future__ import annotations


def slowdown(
    *,
    cores: int,
    computing: int,
    inflight: int,
    serving_cpu_ms: float,
    nominal_ms: float,
    background_cores: float = 0.0,
) -> float:
    """The factor (>= 1) by which a request starting now runs slower; 1 when ``cores`` is 0.

    ``computing``: executors computing, this request's included; ``inflight``: requests in
    flight on the cluster, this one included; ``nominal_ms``: this request's uncontended
    latency (serving path, prefill and decode).
    """
    if cores <= 0:
        return 1.0
    serving = inflight * serving_cpu_ms / nominal_ms if nominal_ms > 0 else 0.0
    return max(1.0, (computing + serving + background_cores) / cores)
