"""What ``vajra bench engine`` prints, and section (d) gathered from the others' samples."""

from __future__ import annotations

from typing import Any


def kv_memory_section(result: dict[str, Any]) -> dict[str, Any]:
    """(d): the ``kv_stats()`` summaries of (a)'s levels and (f)'s two engines (null where the
    engine has no ``kv_stats()``)."""
    a = result.get("a_concurrency") or {}
    f = result.get("f_comparison") or {}
    return {
        "current_by_concurrency": {
            str(level["concurrency"]): level.get("kv") for level in a.get("levels", [])
        },
        "f_current": (f.get("current") or {}).get("kv"),
        "f_baseline": (f.get("baseline") or {}).get("kv"),
        "note": "live_fraction_mean: live tokens x bytes per token / allocated KV bytes, mean "
        "over steps; null: the engine has no kv_stats()",
    }


def section_errors(value: Any, path: str = "") -> list[str]:
    """Every ``"error"`` entry in the result, as ``path: message``."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "error" and item:
                found.append(f"{path}: {item}")
            else:
                found += section_errors(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += section_errors(item, f"{path}[{i}]")
    return found


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A short table of the headline figures."""
    meta = result.get("meta", {})
    lines = [
        f"engine bench: {meta.get('device')} {meta.get('dtype')}, model {meta.get('model')} "
        f"({meta.get('model_shape') or 'given'}), {meta.get('seconds')} s in all"
    ]
    a = result.get("a_concurrency")
    if isinstance(a, dict) and "levels" in a:
        lines.append("(a) in flight | output tok/s | ITL p50 ms | ITL p99 ms | TTFT p50 ms")
        for lv in a["levels"]:
            cut = " (cut short)" if lv.get("cut_short") else ""
            lines.append(
                f"    {lv['concurrency']:>4} | {lv['output_tok_s']:>10} | {lv['itl_p50_ms']} | "
                f"{lv['itl_p99_ms']} | {lv['ttft_p50_ms']}{cut}"
            )
    b = result.get("b_context")
    if isinstance(b, dict) and "current" in b:
        rows, gb_s = b["current"].get("rows"), b["current"].get("bandwidth_gb_s")
        lines.append(
            f"(b) context | decode step p50 ms of {rows} rows: current | baseline | bandwidth "
            f"floor at {gb_s} GB/s (current / floor)"
        )
        base = {e["context"]: e for e in b["baseline"].get("contexts", [])}
        for e in b["current"].get("contexts", []):
            other = base.get(e["context"], {})
            extra = {"eager_step_p50_ms": "graphs off", "outside_model_ms": "outside the model"}
            lines.append(
                f"    {e['context']:>6} | {e.get('step_p50_ms')} | {other.get('step_p50_ms')} | "
                f"{e.get('floor_ms')} ({e.get('vs_floor')}x)"
                + "".join(f"; {text} {e[key]}" for key, text in extra.items() if key in e)
            )
    c = result.get("c_prefill_interference")
    if isinstance(c, dict) and "current" in c:
        for kind in ("current", "baseline"):
            e = c[kind]
            lines.append(
                f"(c) {kind}: TTFT {e.get('long_prompt_tokens')}-token prompt p50 "
                f"{e.get('ttft_p50_ms')} ms; streams' ITL p50/p99 before "
                f"{e.get('itl_before_p50_ms')}/{e.get('itl_before_p99_ms')} ms, during "
                f"{e.get('itl_during_p50_ms')}/{e.get('itl_during_p99_ms')} ms"
            )
    d = result.get("d_kv_memory")
    if isinstance(d, dict):
        fractions = {
            k: [(v or {}).get("live_fraction_mean"), (v or {}).get("live_fraction_of_used_mean")]
            for k, v in d.get("current_by_concurrency", {}).items()
        }
        baseline = (d.get("f_baseline") or {}).get("live_fraction_mean")
        lines.append(
            f"(d) live KV / [allocated, blocks in use], current by concurrency {fractions}; "
            f"baseline live / allocated {baseline}"
        )
    e_ = result.get("e_prefix_cache")
    if isinstance(e_, dict) and "current" in e_:
        cur, base = e_["current"], e_["baseline"]
        lines.append(
            f"(e) prefix hit rate {cur.get('hit_rate')} (shared prompt tokens {cur.get('shared_prompt_token_fraction')}); "
            f"TTFT p50 current {cur.get('ttft_p50_ms')} ms, baseline {base.get('ttft_p50_ms')} ms"
        )
    f = result.get("f_comparison")
    if isinstance(f, dict) and "current" in f:
        rates = {
            k: (f.get(k) or {}).get("output_tok_s")
            for k in ("static_generate", "transformers_cb", "baseline", "current")
        }
        lines.append(
            f"(f) tok/s at {f['concurrency']} in flight: {rates}; current/baseline "
            f"{f.get('current_vs_baseline')}, current/static {f.get('current_vs_static_generate')}"
        )
    g = result.get("g_adapters")
    if isinstance(g, dict) and "results" in g:
        for e in g["results"]:
            lines.append(
                f"(g) {e['adapters']} adapters: {e['adapters_tok_s']} tok/s vs base "
                f"{e['base_tok_s']} ({e['adapters_vs_base']}x; weights-bound "
                f"{e.get('weights_bound_vs_base')}x)"
            )
    for error in section_errors(result):
        lines.append(f"ERROR {error}")
    return lines
