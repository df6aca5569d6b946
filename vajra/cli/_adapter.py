"""``vajra adapter``: push, list, delete, roll back and merge a tenant's LoRA adapters through
the gateway; ``versions NAME`` shows a name's versions with their metadata (docs/hot-swap.md)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from vajra.cli._common import api_key, gateway_address, load_args_config, with_config

if TYPE_CHECKING:
    from vajra.cli._common import Subcommands
    from vajra.client import AdapterInfo


def register(sub: Subcommands) -> None:
    adapter = with_config(sub.add_parser("adapter", help="push, list and delete LoRA adapters"))
    asub = adapter.add_subparsers(dest="adapter_cmd", required=True)
    apush = asub.add_parser("push", help="upload a PEFT adapter directory as a new version")
    apush.add_argument("dir", help="directory with adapter_config.json + adapter_model.safetensors")
    apush.add_argument("--name", required=True, help="adapter name (1-64 of [A-Za-z0-9_.-])")
    asub.add_parser("list", help="every version of your adapters")
    adel = asub.add_parser("delete", help="delete NAME (every version) or NAME@VERSION")
    adel.add_argument("ref", metavar="NAME[@VERSION]")
    aver = asub.add_parser("versions", help="NAME's versions: digest, parent, created, metrics")
    aver.add_argument("name", metavar="NAME")
    aroll = asub.add_parser("rollback", help="make VERSION of NAME active again (warm swap)")
    aroll.add_argument("name", metavar="NAME")
    aroll.add_argument("version", metavar="VERSION", type=int)
    amerge = asub.add_parser(
        "merge", help="register w1*V1 + w2*V2 of NAME (exact, rank r1+r2) as its next version"
    )
    amerge.add_argument("name", metavar="NAME")
    amerge.add_argument("first", metavar="V1", type=int)
    amerge.add_argument("second", metavar="V2", type=int)
    amerge.add_argument(
        "--weights",
        default="0.5,0.5",
        help="W1,W2: the weight of each version's update (default: %(default)s, the average)",
    )
    amerge.add_argument(
        "--staged", action="store_true", help="register it without making it active"
    )
    for sp in asub.choices.values():
        sp.add_argument("--key", help="API key (default: $VAJRA_API_KEY)")
        sp.add_argument(
            "--gateway",
            help="gateway address, e.g. tcp://127.0.0.1:5555 (default: the running "
            "cluster's, from $VAJRA_HOME/cluster.json)",
        )
        sp.add_argument(
            "--timeout", type=float, default=120.0, help="seconds (default: %(default)s)"
        )
        sp.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    adapter.set_defaults(func=cmd_adapter)


def cmd_adapter(args: argparse.Namespace) -> int:
    from vajra.client import Client

    cfg = load_args_config(args)
    with Client(gateway_address(cfg, args), api_key(args), timeout_s=args.timeout) as client:
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
        elif args.adapter_cmd == "versions":
            infos = client.versions(args.name)
            if args.json:
                print(json.dumps([_adapter_json(i) for i in infos]))
            else:
                print("VERSION\tACTIVE\tPARENT\tSOURCE\tCREATED_MS\tDIGEST\tMETRICS")
                for i in infos:
                    state = "*" if i.active else ("staged" if i.staged else "")
                    parent = "" if i.parent_version is None else str(i.parent_version)
                    print(
                        f"{i.version}\t{state}\t{parent}\t{i.source}\t{i.created_ms}\t"
                        f"{i.digest}\t{json.dumps(dict(i.metrics), sort_keys=True)}"
                    )
        elif args.adapter_cmd == "rollback":
            info = client.rollback(args.name, args.version)
            if args.json:
                print(json.dumps(_adapter_json(info)))
            else:
                print(f"adapter {info.name} now answers with version {info.version}")
        elif args.adapter_cmd == "merge":
            weights = _weights(args.weights)
            versions = (args.first, args.second)
            info = client.merge(args.name, versions, weights, activate=not args.staged)
            if args.json:
                print(json.dumps(_adapter_json(info)))
            else:
                state = "active" if info.active else "staged"
                print(f"adapter {info.name} version {info.version} (rank {info.rank}, {state})")
    return 0


def _weights(text: str) -> tuple[float, float]:
    """``W1,W2`` as two numbers; InvalidRequest (field ``weights``) otherwise."""
    from vajra.errors import InvalidRequest

    parts = text.split(",")
    try:
        if len(parts) == 2:
            return float(parts[0]), float(parts[1])
    except ValueError:
        pass
    raise InvalidRequest(f"--weights must be W1,W2 (two numbers), not {text!r}", field="weights")


def _adapter_json(info: AdapterInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "version": info.version,
        "digest": info.digest,
        "size_bytes": info.size_bytes,
        "rank": info.rank,
        "active": info.active,
        "parent_version": info.parent_version,
        "created_ms": info.created_ms,
        "source": info.source,
        "staged": info.staged,
        "dataset_digest": info.dataset_digest,
        "hyperparams": dict(info.hyperparams),
        "metrics": dict(info.metrics),
    }
