"""Configuration: defaults, the shipped file, TOML and environment precedence, typed errors."""

from __future__ import annotations

import itertools
import re
import tomllib
from pathlib import Path

import pytest

from vajra.config import ConfigError, VajraConfig, dump_toml, load_config

REPO = Path(__file__).resolve().parent.parent


def test_shipped_config_file_lists_exactly_the_defaults() -> None:
    path = REPO / "config" / "vajra.toml"
    assert load_config(path, env={}) == VajraConfig()
    listed = {
        (section, key)
        for section, values in tomllib.loads(path.read_text()).items()
        for key in values
    }
    defaults = VajraConfig().to_dict()
    every = {
        (section, key)
        for section, values in defaults.items()
        for key, v in values.items()
        if v is not None
    }
    assert listed == every, f"missing: {sorted(every - listed)}"


def test_paper_system_parameters_are_the_defaults() -> None:
    cfg = VajraConfig()
    assert cfg.adapters.max_vram_adapters == 100
    assert cfg.adapters.lru_eviction_threshold == 0.9
    assert cfg.policies.prefetch_lookahead_ms == 5000
    assert cfg.policies.billing_granularity_ms == 10
    assert cfg.policies.training_preemption_enabled is True
    assert (
        cfg.policies.placement_alpha,
        cfg.policies.placement_beta,
        cfg.policies.placement_gamma,
    ) == (
        0.5,
        0.3,
        0.2,
    )


def test_environment_overrides_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[executor]\nmax_batch_size = 4\n[gateway]\nmax_prompt_chars = 10\n")
    cfg = load_config(
        f,
        env={
            "VAJRA_EXECUTOR_MAX_BATCH_SIZE": "8",
            "VAJRA_REDIS_URL": "redis://x:1",
            "VAJRA_HOME": "/srv/vajra",
            "VAJRA_POLICIES_TRAINING_PREEMPTION_ENABLED": "false",
            "UNRELATED": "1",
        },
    )
    assert cfg.executor.max_batch_size == 8
    assert cfg.gateway.max_prompt_chars == 10
    assert cfg.cluster.redis_url == "redis://x:1"
    assert cfg.cluster.home_path == Path("/srv/vajra")
    assert cfg.policies.training_preemption_enabled is False


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ("[nope]\na = 1\n", {}, "unknown section"),
        ("[executor]\nmax_batchsize = 1\n", {}, "executor.max_batchsize"),
        ('[executor]\nmax_batch_size = "many"\n', {}, "executor.max_batch_size"),
        ("[executor\n", {}, "not valid TOML"),
        ("", {"VAJRA_EXECUTOR_MAX_BATCH_SIZE": "lots"}, "VAJRA_EXECUTOR_MAX_BATCH_SIZE"),
        ("", {"VAJRA_GATEWAY_NO_SUCH_KEY": "1"}, "gateway.no_such_key"),
    ],
)
def test_bad_config_names_the_problem(
    tmp_path: Path, text: str, env: dict[str, str], needle: str
) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(f, env=env)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", env={})


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = VajraConfig().replace("cluster", home='/a "quoted" path', executors=3)
    f = tmp_path / "c.toml"
    f.write_text(dump_toml(cfg))
    assert load_config(f, env={}) == cfg


def test_cluster_devices_key() -> None:
    assert VajraConfig().cluster.devices == ""
    cfg = load_config(env={"VAJRA_CLUSTER_DEVICES": "0,1"})
    assert cfg.cluster.devices == "0,1"
    assert 'devices = "0,1"' in dump_toml(cfg)


def test_every_key_is_read_or_marked_with_the_issue_that_will_read_it() -> None:
    """A key nothing reads misleads its users: the shipped file marks each one that an open
    issue will read (``# not read yet: issue N``), and a marked key that code now reads loses
    its mark. "Read" means an attribute access ``.<key>`` somewhere in vajra/ or simulations/
    outside vajra/config.py (a loose check: a common name may match elsewhere)."""
    sources = "\n".join(
        p.read_text()
        for folder in ("vajra", "simulations")
        for p in (REPO / folder).rglob("*.py")
        if p != REPO / "vajra" / "config.py"
    )
    lines = (REPO / "config" / "vajra.toml").read_text().splitlines()
    marked = {
        line.split("=")[0].strip()
        for before, line in itertools.pairwise(lines)
        if before.startswith("# not read yet: issue ")
    }
    keys = {key for values in VajraConfig().to_dict().values() for key in values}
    read = {key for key in keys if re.search(rf"\.{key}\b", sources)}
    assert keys - read - marked == set(), "keys nothing reads and no issue claims"
    assert marked & read == set(), "keys marked 'not read yet' that code now reads"
