"""The ``vajra`` command line.

Commands find a running local cluster through ``VAJRA_HOME`` (its ``cluster.json``) with no
flags, or through ``--gateway ADDRESS`` / ``VAJRA_REDIS_URL``. Each command group lives in its
own module and adds its subcommands to the parser built here:

- :mod:`~vajra.cli._cluster`: ``up``, ``actor``
- :mod:`~vajra.cli._tenant`: ``tenant``
- :mod:`~vajra.cli._infer`: ``infer``
- :mod:`~vajra.cli._adapter`: ``adapter``
- :mod:`~vajra.cli._train`: ``train``; :mod:`~vajra.cli._job`: ``job`` (training jobs)
- :mod:`~vajra.cli._status`: ``status``
- :mod:`~vajra.cli._usage`: ``usage`` (an invoice)
- :mod:`~vajra.cli._replay`: ``replay`` (drive the cluster with a trace)
- :mod:`~vajra.cli._config`: ``config show``
- :mod:`~vajra.cli._tools`: ``model init-tiny``, ``bench``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata

from vajra.cli import (
    _adapter,
    _cluster,
    _config,
    _infer,
    _job,
    _replay,
    _status,
    _tenant,
    _tools,
    _train,
    _usage,
)
from vajra.cli._cluster import actor_config as _actor_config  # kept for existing importers
from vajra.config import ConfigError
from vajra.errors import VajraError

__all__ = ["_actor_config", "build_parser", "main", "version"]


def version() -> str:
    """The installed package's version (importlib.metadata)."""
    try:
        return metadata.version("vajra")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vajra", description="Vajra: many LoRA adapters, one frozen model."
    )
    p.add_argument("--version", action="version", version=f"vajra {version()}")
    sub = p.add_subparsers(dest="cmd", required=True)
    groups = (_cluster, _tenant, _infer, _adapter, _status, _usage, _replay, _config, _tools)
    for group in (*groups, _train, _job):
        group.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "adapters"]:
        # The adapters benchmark owns its options, and runs where only torch is installed.
        from vajra.bench.adapters import main as bench_adapters

        return bench_adapters(argv[2:])
    if argv[:2] == ["bench", "decode-kernel"]:
        # Likewise: torch and triton alone (the GPU machine's packages).
        from vajra.bench.decode_kernel import main as bench_decode_kernel

        return bench_decode_kernel(argv[2:])
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
