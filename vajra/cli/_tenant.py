"""``vajra tenant``: create, list and delete tenants, issue and revoke their API keys.

These commands talk to the cluster's Redis/Valkey directly (``VAJRA_REDIS_URL`` or the
running cluster's ``cluster.json``); deleting a tenant also removes its adapter files from
the running cluster's object store.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from vajra.cli._common import cluster_config, load_args_config, redis_url, with_config
from vajra.config import VajraConfig
from vajra.errors import VajraError

if TYPE_CHECKING:
    from vajra.cli._common import Subcommands
    from vajra.state import ClusterState, TenantPurge


def register(sub: Subcommands) -> None:
    tenant = with_config(sub.add_parser("tenant", help="manage tenants and API keys"))
    tsub = tenant.add_subparsers(dest="tenant_cmd", required=True)
    create = tsub.add_parser("create", help="create a tenant; prints its API key once")
    create.add_argument("name")
    create.add_argument(
        "--key-only",
        action="store_true",
        help="print only the API key, for `export VAJRA_API_KEY=$(...)` (default: off)",
    )
    tsub.add_parser("list", help="list tenants")
    tsub.add_parser(
        "delete", help="delete a tenant: its keys, usage totals, adapters and their files"
    ).add_argument("name")
    tsub.add_parser("new-key", help="issue another API key").add_argument("name")
    tsub.add_parser("revoke-key", help="revoke an API key").add_argument("key")
    tenant.set_defaults(func=cmd_tenant)


def cmd_tenant(args: argparse.Namespace) -> int:
    from vajra.state import ClusterState

    cfg = load_args_config(args)
    with ClusterState(redis_url(cfg)) as state:
        if args.tenant_cmd == "create":
            record, key = state.tenants.create(args.name)
            if args.key_only:
                print(key)
            else:
                print(f"tenant {record.name} ({record.tenant_id}) created")
                print(f"api key (shown once): {key}")
        elif args.tenant_cmd == "list":
            for t in state.tenants.list():
                print(f"{t.name}\t{t.tenant_id}")
        elif args.tenant_cmd == "delete":
            return _delete(state, cfg, args)
        elif args.tenant_cmd == "new-key":
            tenant = state.tenants.get_by_name(args.name)
            if tenant is None:
                print(f"vajra: no tenant named {args.name!r}", file=sys.stderr)
                return 1
            print(f"api key (shown once): {state.api_keys.create(tenant.tenant_id)}")
        elif args.tenant_cmd == "revoke-key":
            if not state.api_keys.revoke(args.key):
                print("vajra: no such key", file=sys.stderr)
                return 1
            print("key revoked")
    return 0


def _delete(state: ClusterState, cfg: VajraConfig, args: argparse.Namespace) -> int:
    tenant = state.tenants.get_by_name(args.name)
    purge = state.tenants.delete(tenant.tenant_id) if tenant is not None else None
    if purge is None:
        print(f"vajra: no tenant named {args.name!r}", file=sys.stderr)
        return 1
    try:
        removed = _delete_tenant_objects(cluster_config(cfg, args), purge)
    except VajraError as exc:
        print(
            f"vajra: tenant {args.name} deleted, but its adapter files were not all removed: {exc}",
            file=sys.stderr,
        )
        return 1
    print(f"tenant {args.name} deleted ({removed} adapter files removed)")
    return 0


def _delete_tenant_objects(cfg: VajraConfig, purge: TenantPurge) -> int:
    """Delete a purged tenant's adapter files (registered or not); returns how many went."""
    from vajra.storage import delete_tenant_objects, open_store

    with open_store(cfg) as store:
        return delete_tenant_objects(store, purge.tenant_id)
