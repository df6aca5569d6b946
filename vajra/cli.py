"""The ``vajra`` command line.

Commands find a running local cluster through ``VAJRA_HOME`` (its ``cluster.json``) with no
flags, or through ``--gateway ADDRESS`` / ``VAJRA_REDIS_URL``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vajra.config import ConfigError, VajraConfig, dump_toml, load_config
from vajra.errors import VajraError

if TYPE_CHECKING:
    from vajra.state import TenantPurge


def _config(args: argparse.Namespace) -> VajraConfig:
    return load_config(getattr(args, "config", None))


def _cluster_info(cfg: VajraConfig) -> dict[str, Any]:
    from vajra.actors.supervisor import read_cluster_file

    return read_cluster_file(cfg.cluster.home_path) or {}


def _redis_url(cfg: VajraConfig) -> str:
    url = cfg.cluster.redis_url or _cluster_info(cfg).get("redis_url", "")
    if not url:
        raise SystemExit(
            "vajra: no cluster found: start one with `vajra up`, or set VAJRA_REDIS_URL / VAJRA_HOME"
        )
    return str(url)


def _gateway(cfg: VajraConfig, args: argparse.Namespace) -> str:
    if getattr(args, "gateway", None):
        return str(args.gateway)
    address = _cluster_info(cfg).get("gateway_address")
    if not address:
        raise SystemExit(
            "vajra: no cluster found: start one with `vajra up`, or pass --gateway ADDRESS"
        )
    return str(address)


# --- commands ---------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    import trio

    from vajra.actors.base import configure_logging
    from vajra.actors.supervisor import Supervisor, run_supervisor

    configure_logging("supervisor")
    cfg = _config(args)
    if args.http_port is not None:
        cfg = cfg.replace("http", enabled=True, port=args.http_port)
    if args.devices is not None:
        cfg = cfg.replace("cluster", devices=args.devices)
    sup = Supervisor(
        cfg, gateway_port=args.gateway_port, executors=args.executors, model=args.model
    )
    return trio.run(run_supervisor, sup)


def _actor_config(args: argparse.Namespace) -> VajraConfig:
    cfg = _config(args)
    if args.device:
        cfg = cfg.replace("executor", device=args.device)
    return cfg


def cmd_actor(args: argparse.Namespace) -> int:
    from vajra.actors import run_actor_process

    cfg = _actor_config(args)
    return run_actor_process(
        args.name,
        cfg,
        executor_id=args.executor_id,
        model=args.model,
        metrics_port=args.metrics_port,
    )


def cmd_tenant(args: argparse.Namespace) -> int:
    from vajra.state import ClusterState

    cfg = _config(args)
    with ClusterState(_redis_url(cfg)) as state:
        if args.tenant_cmd == "create":
            record, key = state.create_tenant(args.name)
            print(f"tenant {record.name} ({record.tenant_id}) created")
            print(f"api key (shown once): {key}")
        elif args.tenant_cmd == "list":
            for t in state.list_tenants():
                print(f"{t.name}\t{t.tenant_id}")
        elif args.tenant_cmd == "delete":
            tenant = state.get_tenant_by_name(args.name)
            purge = state.delete_tenant(tenant.tenant_id) if tenant is not None else None
            if purge is None:
                print(f"vajra: no tenant named {args.name!r}", file=sys.stderr)
                return 1
            try:
                removed = _delete_tenant_objects(_cluster_config(cfg, args), purge)
            except VajraError as exc:
                print(
                    f"vajra: tenant {args.name} deleted, but its adapter files were not all "
                    f"removed: {exc}",
                    file=sys.stderr,
                )
                return 1
            print(f"tenant {args.name} deleted ({removed} adapter files removed)")
        elif args.tenant_cmd == "new-key":
            tenant = state.get_tenant_by_name(args.name)
            if tenant is None:
                print(f"vajra: no tenant named {args.name!r}", file=sys.stderr)
                return 1
            print(f"api key (shown once): {state.create_api_key(tenant.tenant_id)}")
        elif args.tenant_cmd == "revoke-key":
            if not state.revoke_api_key(args.key):
                print("vajra: no such key", file=sys.stderr)
                return 1
            print("key revoked")
    return 0


def _cluster_config(cfg: VajraConfig, args: argparse.Namespace) -> VajraConfig:
    """The running cluster's own configuration (its ``cluster.toml``: object store, admin
    key) unless ``--config`` was given."""
    if getattr(args, "config", None):
        return cfg
    path = _cluster_info(cfg).get("config")
    if isinstance(path, str) and Path(path).is_file():
        return load_config(path)
    return cfg


def _delete_tenant_objects(cfg: VajraConfig, purge: TenantPurge) -> int:
    """Delete a purged tenant's adapter files (registered or not); returns how many went."""
    from vajra.storage import delete_tenant_objects, open_store

    with open_store(cfg) as store:
        return delete_tenant_objects(store, purge.tenant_id)


def cmd_adapter(args: argparse.Namespace) -> int:
    from vajra.client import Client

    cfg = _config(args)
    with Client(_gateway(cfg, args), args.key, timeout_s=args.timeout) as client:
        if args.adapter_cmd == "push":
            info = client.push_adapter(args.dir, args.name)
            if args.json:
                print(json.dumps(_adapter_json(info)))
            else:
                print(
                    f"adapter {info.name} version {info.version} pushed "
                    f"(rank {info.rank}, {info.size_bytes} bytes, sha256 {info.digest})"
                )
        elif args.adapter_cmd == "list":
            infos = client.list_adapters()
            if args.json:
                print(json.dumps([_adapter_json(i) for i in infos]))
            else:
                print("NAME\tVERSION\tACTIVE\tRANK\tSIZE_BYTES\tDIGEST")
                for i in infos:
                    active = "*" if i.active else ""
                    print(f"{i.name}\t{i.version}\t{active}\t{i.rank}\t{i.size_bytes}\t{i.digest}")
        elif args.adapter_cmd == "delete":
            gone = client.delete_adapter(args.ref)
            for i in gone:
                print(f"deleted {i.name}@{i.version}")
    return 0


def _adapter_json(info: Any) -> dict[str, Any]:
    return {
        "name": info.name,
        "version": info.version,
        "digest": info.digest,
        "size_bytes": info.size_bytes,
        "rank": info.rank,
        "active": info.active,
    }


def cmd_infer(args: argparse.Namespace) -> int:
    from vajra.client import Client

    cfg = _config(args)
    with Client(_gateway(cfg, args), args.key, timeout_s=args.timeout) as client:
        kw: dict[str, Any] = dict(
            adapter=args.adapter,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            stop=args.stop or None,
            seed=args.seed,
        )
        if args.stream:
            for chunk in client.stream(args.prompt, **kw):
                print(chunk.text, end="", flush=True)
            print()
        else:
            result = client.infer(args.prompt, **kw)
            print(result.text)
            if args.verbose:
                print(json.dumps(vars(result.usage)), file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from vajra.state import ClusterState

    cfg = _config(args)
    info = _cluster_info(cfg)
    if info:
        print(f"gateway  {info.get('gateway_address')}")
    with ClusterState(_redis_url(cfg)) as state:
        beats = state.list_heartbeats()
    print(f"executors: {len(beats)}")
    for hb in beats:
        print(
            f"  {hb.executor_id}  model={hb.model} device={hb.device} queue={hb.queue_depth} "
            f"running={hb.running} free_mem={hb.free_memory_bytes // 2**20}MiB "
            f"resident={len(hb.resident_adapters)} updated_ms={hb.updated_ms}"
        )
    try:
        gateway = _gateway(cfg, args)
    except SystemExit:
        return 0
    from vajra.client import AuthError, Client

    # The gateway's counters are for operators: ask with the cluster's admin key.
    admin_key = _cluster_config(cfg, args).http.admin_key
    try:
        with Client(gateway, admin_key, timeout_s=2.0) as client:
            stats = client.stats()
        print("gateway counters: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    except AuthError:
        print("gateway counters: need the admin key (set http.admin_key)")
    except VajraError as exc:
        print(f"gateway unreachable: {exc}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    print(dump_toml(_config(args)), end="")
    return 0


def cmd_model_init_tiny(args: argparse.Namespace) -> int:
    from vajra.gpu.tiny import init_tiny_model

    path = init_tiny_model(Path(args.dir), seed=args.seed)
    print(f"tiny model written to {path}")
    return 0


def cmd_bench_bus(args: argparse.Namespace) -> int:
    from vajra.bench.bus import run_bus_bench

    result = run_bus_bench(
        duration_s=args.duration,
        concurrency=args.concurrency,
        latency_requests=args.latency_requests,
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


# --- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vajra", description="Vajra: many LoRA adapters, one frozen model."
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", help="TOML config file (see config/vajra.toml)")
        return sp

    up = with_config(sub.add_parser("up", help="run the whole cluster on this machine"))
    up.add_argument("--model", help="local Hugging Face model directory (default: a tiny model)")
    up.add_argument("--executors", type=int, help="executor processes (one per GPU)")
    up.add_argument("--gateway-port", type=int, help="gateway TCP port on 127.0.0.1 (0: any free)")
    up.add_argument(
        "--http-port", type=int, help="also start the HTTP bridge on this port (0: any free)"
    )
    up.add_argument(
        "--devices",
        metavar="0,1",
        help="GPU indices for the executors, round-robin (default: every visible GPU)",
    )
    up.set_defaults(func=cmd_up)

    actor = with_config(sub.add_parser("actor", help="run one actor process"))
    actor.add_argument(
        "name", choices=["gateway", "scheduler", "predictor", "ledger", "executor", "http"]
    )
    actor.add_argument("--executor-id", default="exec-0")
    actor.add_argument("--model", help="override the model directory (executor)")
    actor.add_argument("--metrics-port", type=int, help="serve /metrics on 127.0.0.1:PORT")
    actor.add_argument("--device", help="override executor.device (executor), e.g. cuda:1")
    actor.set_defaults(func=cmd_actor)

    tenant = with_config(sub.add_parser("tenant", help="manage tenants and API keys"))
    tsub = tenant.add_subparsers(dest="tenant_cmd", required=True)
    tsub.add_parser("create", help="create a tenant; prints its API key once").add_argument("name")
    tsub.add_parser("list", help="list tenants")
    tsub.add_parser(
        "delete", help="delete a tenant: its keys, usage totals, adapters and their files"
    ).add_argument("name")
    tsub.add_parser("new-key", help="issue another API key").add_argument("name")
    tsub.add_parser("revoke-key", help="revoke an API key").add_argument("key")
    tenant.set_defaults(func=cmd_tenant)

    infer = with_config(sub.add_parser("infer", help="send one request through the gateway"))
    infer.add_argument("prompt")
    infer.add_argument(
        "--key", default=os.environ.get("VAJRA_API_KEY", ""), help="API key ($VAJRA_API_KEY)"
    )
    infer.add_argument("--adapter")
    infer.add_argument("--gateway", help="gateway address, e.g. tcp://127.0.0.1:5555")
    infer.add_argument("--max-tokens", type=int, default=64)
    infer.add_argument("--temperature", type=float, default=0.0)
    infer.add_argument("--top-p", type=float, default=1.0)
    infer.add_argument("--stop", action="append")
    infer.add_argument("--seed", type=int)
    infer.add_argument("--stream", action="store_true")
    infer.add_argument("--timeout", type=float, default=60.0)
    infer.add_argument("-v", "--verbose", action="store_true", help="print usage to stderr")
    infer.set_defaults(func=cmd_infer)

    adapter = with_config(sub.add_parser("adapter", help="push, list and delete LoRA adapters"))
    asub = adapter.add_subparsers(dest="adapter_cmd", required=True)
    apush = asub.add_parser("push", help="upload a PEFT adapter directory as a new version")
    apush.add_argument("dir", help="directory with adapter_config.json + adapter_model.safetensors")
    apush.add_argument("--name", required=True, help="adapter name (1-64 of [A-Za-z0-9_.-])")
    asub.add_parser("list", help="every version of your adapters")
    adel = asub.add_parser("delete", help="delete NAME (every version) or NAME@VERSION")
    adel.add_argument("ref", metavar="NAME[@VERSION]")
    for sp in asub.choices.values():
        sp.add_argument(
            "--key", default=os.environ.get("VAJRA_API_KEY", ""), help="API key ($VAJRA_API_KEY)"
        )
        sp.add_argument("--gateway", help="gateway address, e.g. tcp://127.0.0.1:5555")
        sp.add_argument("--timeout", type=float, default=120.0)
        sp.add_argument("--json", action="store_true", help="print JSON")
    adapter.set_defaults(func=cmd_adapter)

    status = with_config(sub.add_parser("status", help="executors, heartbeats, queue depths"))
    status.add_argument("--gateway")
    status.set_defaults(func=cmd_status)

    config = sub.add_parser("config", help="configuration")
    csub = config.add_subparsers(dest="config_cmd", required=True)
    with_config(csub.add_parser("show", help="print the effective configuration")).set_defaults(
        func=cmd_config_show
    )

    model = sub.add_parser("model", help="model directories")
    msub = model.add_subparsers(dest="model_cmd", required=True)
    tiny = msub.add_parser(
        "init-tiny", help="write a small random-weight Llama model and tokenizer"
    )
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_model_init_tiny)

    bench = sub.add_parser("bench", help="benchmarks writing JSON results")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)
    bus = bsub.add_parser("bus", help="end-to-end request rate and latency with a null model")
    bus.add_argument("--json", required=True, help="where to write the results")
    bus.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run")
    bus.add_argument("--concurrency", type=int, default=256, help="requests kept outstanding")
    bus.add_argument(
        "--latency-requests", type=int, default=2000, help="sequential requests for p50/p99"
    )
    bus.set_defaults(func=cmd_bench_bus)
    # `vajra bench adapters ARGS` hands ARGS to the benchmark's own parser (see main()).
    bsub.add_parser(
        "adapters",
        help="adapter activation latency per tier and multi-adapter decode throughput vs PEFT "
        "(options: vajra bench adapters --help)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "adapters"]:
        # The adapters benchmark owns its options, and runs where only torch is installed.
        from vajra.bench.adapters import main as bench_adapters

        return bench_adapters(argv[2:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"vajra: {exc}", file=sys.stderr)
        return 2
    except VajraError as exc:
        print(f"vajra: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
