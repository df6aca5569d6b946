"""``vajra config show``: the settings in force, and which settings those are.

With ``--config FILE`` it shows that file's effective settings (over the defaults, under the
``VAJRA_*`` variables). Otherwise, while a cluster runs in ``$VAJRA_HOME``, it shows that
cluster's own settings (its ``run/cluster.toml``, which its actors read with no variables
applied), and else the defaults with this shell's ``VAJRA_*`` variables. The first line, a TOML
comment, says which; secrets (the admin key, passwords) are masked.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from vajra.cli._common import running_config_path, with_config
from vajra.config import VajraConfig, dump_toml, load_config

if TYPE_CHECKING:
    from vajra.cli._common import Subcommands

MASK = "***"


def register(sub: Subcommands) -> None:
    config = sub.add_parser("config", help="configuration")
    csub = config.add_subparsers(dest="config_cmd", required=True)
    show = csub.add_parser(
        "show",
        help="print the running cluster's settings, or the defaults when none runs "
        "(the first line says which)",
    )
    with_config(show).set_defaults(func=cmd_config_show)


def cmd_config_show(args: argparse.Namespace) -> int:
    header, cfg = effective_settings(args.config, os.environ)
    print(header)
    print(f"# secrets are shown as {MASK}")
    print(dump_toml(mask_secrets(cfg)), end="")
    return 0


def effective_settings(config_file: str | None, env: Mapping[str, str]) -> tuple[str, VajraConfig]:
    """(a TOML comment saying what is shown, the settings) for ``vajra config show``."""
    cfg = load_config(config_file, env)
    if config_file:
        return f"# settings from {config_file}, under the VAJRA_* variables", cfg
    running = running_config_path(cfg)
    if running is not None:
        return f"# the running cluster's settings, from {running}", load_config(running, {})
    home = cfg.cluster.home_path
    header = f"# no cluster running in {home}: the defaults"
    overrides = _overriding_variables(env)
    if overrides:
        header += ", with " + ", ".join(f"${name}" for name in overrides)
    return header, cfg


def _overriding_variables(env: Mapping[str, str]) -> list[str]:
    """The ``VAJRA_*`` variables of ``env`` that change a setting."""
    defaults = VajraConfig()
    return sorted(
        name
        for name, value in env.items()
        if name.startswith("VAJRA_") and load_config(None, {name: value}) != defaults
    )


def mask_secrets(cfg: VajraConfig) -> VajraConfig:
    """``cfg`` with the admin key, the Redis password and the S3 secret key masked."""
    from vajra.state import redact_url

    if cfg.http.admin_key:
        cfg = cfg.replace("http", admin_key=MASK)
    if cfg.cluster.redis_url:
        cfg = cfg.replace("cluster", redis_url=redact_url(cfg.cluster.redis_url))
    if cfg.storage.s3_secret_access_key:
        cfg = cfg.replace("storage", s3_secret_access_key=MASK)
    return cfg
