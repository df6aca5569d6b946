"""Hypothesis invariants of time and rate scaling and of adapter mapping."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vajra.traces import Trace, TraceError, map_to_adapters


@st.composite
def traces(draw: st.DrawFn) -> Trace:
    n_sources = draw(st.integers(1, 6))
    gaps = draw(st.lists(st.floats(0, 5_000, allow_nan=False), min_size=0, max_size=40))
    n = len(gaps)
    return Trace(
        t_ms=np.cumsum(gaps),
        source=draw(st.lists(st.integers(0, n_sources - 1), min_size=n, max_size=n)),
        prompt_tokens=draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n)),
        output_tokens=draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n)),
        sources=[f"fn{i}" for i in range(n_sources)],
        name="h",
        duration_ms=draw(st.lists(st.floats(0, 1e6), min_size=n, max_size=n)),
    )


@settings(max_examples=60, deadline=None)
@given(traces(), st.floats(0.001, 1000), st.integers(0, 2**32))
def test_time_scaling_keeps_order_sources_and_sizes(trace: Trace, factor: float, seed: int) -> None:
    out = trace.scaled(time=factor, seed=seed)
    assert len(out) == len(trace)
    assert np.allclose(out.t_ms, trace.t_ms * factor)
    assert np.array_equal(out.source, trace.source)
    assert np.array_equal(out.prompt_tokens, trace.prompt_tokens)
    assert out.duration_ms is not None and trace.duration_ms is not None
    assert np.allclose(out.duration_ms, trace.duration_ms * factor)


@settings(max_examples=60, deadline=None)
@given(traces(), st.floats(0.05, 6), st.integers(0, 2**32))
def test_rate_scaling_stays_sorted_in_span_and_keeps_source_mix(
    trace: Trace, rate: float, seed: int
) -> None:
    out = trace.scaled(rate=rate, seed=seed)
    assert np.all(np.diff(out.t_ms) >= 0)
    if len(out):
        assert out.t_ms[0] >= trace.t_ms[0] and out.t_ms[-1] <= trace.t_ms[-1]
    # every copy or survivor is one of the original arrivals' (source, sizes)
    original = set(zip(trace.source.tolist(), trace.prompt_tokens.tolist(), strict=True))
    assert set(zip(out.source.tolist(), out.prompt_tokens.tolist(), strict=True)) <= original
    if rate >= 1:
        # each arrival keeps at least floor(rate) copies
        assert len(out) >= int(rate) * len(trace)
        assert len(out) <= (int(rate) + 1) * len(trace)
    else:
        assert len(out) <= len(trace)
    assert np.array_equal(out.t_ms, trace.scaled(rate=rate, seed=seed).t_ms)  # seeded


@settings(max_examples=60, deadline=None)
@given(traces(), st.integers(1, 8), st.sampled_from(["one-to-one", "striped", "power-law"]))
def test_mapping_keeps_times_and_stays_in_range(trace: Trace, adapters: int, mode: str) -> None:
    active = int(np.count_nonzero(trace.counts_by_source()))
    try:
        out = map_to_adapters(trace, adapters, mode=mode)  # type: ignore[arg-type]
    except TraceError:
        assert mode == "one-to-one" and active > adapters
        return
    assert out.sources == [str(i) for i in range(adapters)]
    assert np.array_equal(out.t_ms, trace.t_ms)
    if len(out):
        assert int(out.source.min()) >= 0 and int(out.source.max()) < adapters
    if mode == "one-to-one":
        # a bijection on active sources: same number of distinct ids, same multiset of counts
        assert sorted(out.counts_by_source()[:active].tolist(), reverse=True) == sorted(
            trace.counts_by_source()[trace.counts_by_source() > 0].tolist(), reverse=True
        )
        assert list(out.counts_by_source()[:active]) == sorted(
            out.counts_by_source()[:active], reverse=True
        )
    if mode == "striped":
        # same-source arrivals stay together on one adapter
        for s in set(trace.source.tolist()):
            assert len(set(out.source[trace.source == s].tolist())) == 1


@given(st.sampled_from([0.0, -1.0, float("nan"), float("inf")]))
def test_bad_scale_factors_are_refused(factor: float) -> None:
    trace = Trace(
        t_ms=[0.0], source=[0], prompt_tokens=[1], output_tokens=[1], sources=["a"], name="x"
    )
    for kwargs in ({"time": factor}, {"rate": factor}):
        try:
            trace.scaled(**kwargs)
        except TraceError:
            continue
        raise AssertionError(f"{kwargs} was accepted")
