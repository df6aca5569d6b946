"""ProvisionNewGPU: start while allowed, wait bounded, then refuse."""

from __future__ import annotations

import pytest

from vajra.policies.provisioning import CapacityProvisioner, ProvisionAction


def test_starts_one_at_a_time_within_budget_then_waits_then_refuses() -> None:
    p = CapacityProvisioner(allow_start=True, max_executors=2, max_wait_ms=1_000, start_ms=500)
    p.set_running("m", 1)
    d = p.provision("m", 0)
    assert d.action == ProvisionAction.START and d.until_ms == 1_000
    d = p.provision("m", 100, waiting_since_ms=50)  # a start is under way
    assert d.action == ProvisionAction.WAIT and d.until_ms == 1_050
    p.started("m")
    p.set_running("m", 2)
    d = p.provision("m", 200)  # budget spent: wait
    assert d.action == ProvisionAction.WAIT
    d = p.provision("m", 1_050, waiting_since_ms=50)
    assert d.action == ProvisionAction.REFUSE
    assert p.starts == 1 and p.refusals == 1


def test_a_start_that_never_joins_expires() -> None:
    p = CapacityProvisioner(allow_start=True, max_executors=3, max_wait_ms=10_000, start_ms=500)
    assert p.provision("m", 0).action == ProvisionAction.START
    assert p.provision("m", 400).action == ProvisionAction.WAIT
    assert p.provision("m", 600).action == ProvisionAction.START  # the first one timed out


def test_without_local_starts_it_only_waits() -> None:
    p = CapacityProvisioner(allow_start=False, max_executors=10, max_wait_ms=0)
    assert p.provision("m", 5).action == ProvisionAction.REFUSE
    q = CapacityProvisioner(allow_start=False, max_executors=10, max_wait_ms=100)
    assert q.provision("m", 5).action == ProvisionAction.WAIT
    # A waiting_since in the future is clamped to now (a careless caller).
    assert q.provision("m", 5, waiting_since_ms=1e12).until_ms == 105


@pytest.mark.parametrize("kw", [dict(max_executors=-1), dict(max_wait_ms=-1), dict(start_ms=-5)])
def test_bad_parameters_are_refused(kw: dict) -> None:
    args = dict(allow_start=True, max_executors=1, max_wait_ms=1)
    args.update(kw)
    with pytest.raises(ValueError):
        CapacityProvisioner(**args)  # type: ignore[arg-type]
