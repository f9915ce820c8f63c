"""The benchmark's outputs: one table on stdout, JSON, and a PNG chart."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# (figure, target, higher is better)
TARGETS = {
    "writes c=64 / ceiling": (0.35, True),
    "reads spread c=64 / ceiling": (0.6, True),
    "writes hung Redis / normal": (0.5, True),
    "large: writes c=64 / small": (0.85, True),
    "large: reads spread / small": (0.85, True),
    "large: /stats ms": (50, False),
    "projection events/s": (15000, True),
    "visibility lag p99 ms": (50, False),
    "rebuild commands/s": (50000, True),
    "/health p99 ms (writes c=64)": (5, False),
}
# The blue/green rebuild at scale (rebuild_scale.py), at each size it runs.
# The commands/s goal is the rebuild's own (alone); under load it is shown with no target.
for _size in (100_000, 1_000_000, 10_000_000):
    TARGETS[f"rebuild {_size:,} alone: commands/s"] = (100_000, True)
    TARGETS[f"rebuild {_size:,}: read p99 during / without"] = (2.0, False)


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The table: each figure with its reference point, the ratio, p50/p99 and its target."""
    refs = results["reference"]
    insert = refs["pgbench_insert_c16"]["rate"]
    select = refs["pgbench_select_c16"]["rate"]
    xadd = (refs.get("redis_xadd_c16") or {}).get("rate")
    table: list[dict[str, Any]] = []

    def add(
        name: str,
        value: float,
        ref_name: str,
        ref: float | None,
        p50: Any = "",
        p99: Any = "",
        extra: str = "",
    ) -> None:
        target = TARGETS.get(name)
        met = ""
        if target is not None:
            met = "yes" if (value >= target[0] if target[1] else value <= target[0]) else "NO"
        table.append(
            {
                "figure": name,
                "value": round(value, 3) if abs(value) < 10 else round(value, 1),
                "reference": ref_name,
                "reference_value": round(ref, 1) if ref else None,
                "ratio": round(value / ref, 3) if ref else None,
                "p50_ms": p50,
                "p99_ms": p99,
                "target": target[0] if target else None,
                "met": met,
                "note": extra,
            }
        )

    add(
        "pgbench INSERT/s c=16 (1 row/tx)",
        insert,
        "-",
        None,
        p50=refs["pgbench_insert_c16"]["latency_avg_ms"],
        extra="p50 column: pgbench average",
    )
    add(
        "pgbench SELECT/s c=16 (by key)",
        select,
        "-",
        None,
        p50=refs["pgbench_select_c16"]["latency_avg_ms"],
        extra="p50 column: pgbench average",
    )
    if xadd:
        x = refs["redis_xadd_c16"]
        add(
            "redis-benchmark XADD/s c=16",
            xadd,
            "-",
            None,
            x.get("p50_latency_ms", ""),
            x.get("p99_latency_ms", ""),
        )
    ceiling = results["api_ceiling"]
    add(
        "API GET /health/s c=64 (no DB)",
        ceiling["rate"],
        "-",
        None,
        ceiling["p50_ms"],
        ceiling["p99_ms"],
        "one uvicorn worker's HTTP ceiling here (answered below the framework)",
    )
    for clients, figure in results["writes"].items():
        add(
            f"writes/s c={clients}",
            figure["rate"],
            "pgbench INSERT",
            insert,
            figure["p50_ms"],
            figure["p99_ms"],
        )
    for name, figure in results["reads"].items():
        add(
            f"reads/s {name} c=64",
            figure["rate"],
            "pgbench SELECT",
            select,
            figure["p50_ms"],
            figure["p99_ms"],
            "read_count exact" if figure["read_count_exact"] else "read_count NOT exact",
        )
    proj = results["projection"]
    add(
        "projection events/s",
        proj["rate"],
        "pgbench INSERT",
        insert,
        extra=f"{proj['events']} events drained in {proj['seconds']} s",
    )
    lag = results["lag"]
    add(
        "visibility lag p99 ms",
        lag["p99_ms"],
        "-",
        None,
        lag["p50_ms"],
        lag["p99_ms"],
        f"at {lag['write_rate']} writes/s (half peak); poll {lag['poll_interval_ms']} ms",
    )
    reb = results["rebuild"]
    add(
        "rebuild commands/s",
        reb["rate"],
        "pgbench INSERT",
        insert,
        extra=f"{reb['commands']} commands, {reb['wall_seconds']} s incl. "
        f"{reb['interpreter_start_seconds']} s start; {reb['rate_excluding_start']}/s without",
    )
    ceiling_rate = ceiling["rate"]
    w64 = results["writes"].get(64) or results["writes"].get("64")
    add(
        "writes c=64 / ceiling",
        w64["rate"] / ceiling_rate,
        f"/health c=64 ({ceiling_rate:.0f}/s)",
        None,
        w64["p50_ms"],
        w64["p99_ms"],
        f"{w64.get('api_cpu_us_per_request')} µs API CPU per write vs "
        f"{ceiling.get('api_cpu_us_per_request')} per /health; batch {w64.get('mean_batch')}",
    )
    spread = results["reads"]["spread"]
    add(
        "reads spread c=64 / ceiling",
        spread["rate"] / ceiling_rate,
        f"/health c=64 ({ceiling_rate:.0f}/s)",
        None,
        spread["p50_ms"],
        spread["p99_ms"],
        f"{spread.get('api_cpu_us_per_request')} µs API CPU per read",
    )
    cores = results.get("cores") or os.cpu_count() or 1
    shares = (results.get("processes") or {}).get("cpu", {})
    for label, phase, figure in (
        ("writes c=64", "writes-64", w64),
        ("reads spread", "reads-spread", spread),
    ):
        bound = _cpu_bound(shares.get(phase, {}), figure, cores)
        if bound is not None:
            add(
                f"{label}: CPU bound / ceiling",
                bound["rate"] / ceiling_rate,
                f"/health c=64 ({ceiling_rate:.0f}/s)",
                None,
                extra=f"{bound['machine_us']} µs of our processes' CPU per request: at most"
                f" {bound['machine_rate']:.0f}/s on {cores} cores; the API's"
                f" {bound['api_us']} µs: at most {bound['api_rate']:.0f}/s on its one core",
            )
    hung = results.get("hung_redis")
    if hung:
        add(
            "writes hung Redis / normal",
            hung["ratio"] or 0.0,
            f"writes c=64 ({hung['normal_rate']}/s)",
            None,
            hung["p50_ms"],
            hung["p99_ms"],
            f"{hung['rate']}/s while SIGSTOPped; {hung['queued_at_resume']} queued, published"
            f" {hung['published_after_resume_seconds']} s after SIGCONT",
        )
    for size, scale in (results.get("rebuild_scale") or {}).items():
        during, without = scale["during_rebuild"], scale["without_rebuild"]
        for which, ref_name, ref in (
            ("alone", "-", None),
            ("under_load", "the same rebuild alone", scale["rebuild_alone_rate"]),
        ):
            seen = scale.get(f"rebuild_{which}_seen") or {}
            load = f"{seen.get('load_avg_start', ['?'])[0]}-{seen.get('load_avg_end', ['?'])[0]}"
            add(
                f"rebuild {int(size):,} {which.replace('_', ' ')}: commands/s",
                scale[f"rebuild_{which}_rate"],
                ref_name,
                ref,
                extra=f"{scale[f'rebuild_{which}_seconds']} s, peak RSS"
                f" {scale[f'rebuild_{which}_peak_rss_mb']} MB; steps (s) "
                + " ".join(
                    f"{step} {value:g}"
                    for step, value in (scale.get(f"rebuild_{which}_steps") or {}).items()
                    if not step.startswith(("catch_up_", "swap_"))
                )
                + "; CPU s "
                + " ".join(f"{name} {value:g}" for name, value in seen.get("cpu_s", {}).items())
                + f"; load average {load}",
            )
        add(
            f"rebuild {int(size):,}: read p99 during / without",
            scale["read_p99_ratio"],
            f"reads without ({without['read_p99_ms']} ms)",
            None,
            during["read_p50_ms"],
            during["read_p99_ms"],
            f"writes {during['write_rate']}/s during vs {without['write_rate']}/s;"
            f" errors {during['errors']}",
        )
    large = results.get("large")
    if large:
        lr = results["reads-large"]["spread"]
        # The steady state, the transient right after the bulk load, writes to the seeded keys.
        for label, phase, figure, what in (
            (
                "large: writes c=64 / small",
                "writes-large",
                "write",
                f"{large['commands']:,} commands",
            ),
            (
                "large: writes while the load's ledger prunes",
                "writes-large-transient",
                "transient_write",
                "transient after the bulk load",
            ),
            (
                "large: writes to the seeded keys / small",
                "writes-large-seeded-keys",
                "seeded_keys_write",
                f"{large['keys']:,} keys at random",
            ),
        ):
            measured = results.get(phase, {}).get(64)
            if measured and f"{figure}_rate_ratio" in large:
                add(
                    label,
                    large[f"{figure}_rate_ratio"],
                    f"writes c=64 ({w64['rate']}/s)",
                    None,
                    measured["p50_ms"],
                    measured["p99_ms"],
                    f"{what}; p99 x{large[f'{figure}_p99_ratio']}",
                )
        add(
            "large: reads spread / small",
            large["read_rate_ratio"],
            f"reads spread ({spread['rate']}/s)",
            None,
            lr["p50_ms"],
            lr["p99_ms"],
            f"{large['keys']:,} keys; p99 x{large['read_p99_ratio']}",
        )
        for size in ("small", "large"):
            sw = large[size]["sweep"]
            st = large[size]["stats"]
            add(
                f"{size}: sweep page ms ({sw['candidates']} new)",
                sw["execution_ms"] or 0.0,
                "-",
                None,
                extra=f"index scan: {sw['uses_index']}",
            )
            add(
                f"{size}: /stats ms",
                st["p50_ms"],
                "-",
                None,
                st["p50_ms"],
                st["max_ms"],
                f"counts_estimated {st['counts_estimated']}",
            )
    health = results["health_during_writes"]
    add(
        "/health p99 ms (writes c=64)",
        health["p99_ms"],
        "-",
        None,
        health["p50_ms"],
        health["p99_ms"],
        f"{health['samples']} probes from a separate process",
    )
    return table


def _cpu_bound(
    shares: dict[str, float], figure: dict[str, Any], cores: int
) -> dict[str, Any] | None:
    """The most requests/s a phase could reach here, from what one request costs: our
    processes' CPU together (API, projector, both PostgreSQL, Redis) on all the cores, and the
    API's own on the one core its single worker runs on. The load generator is not counted
    (wrk is not sampled), so the bound is generous. None without CPU samples."""
    rate, api_us = figure.get("rate"), figure.get("api_cpu_us_per_request")
    if not shares or not rate or not api_us:
        return None
    machine_us = sum(v for k, v in shares.items() if k != "load-generator") / rate * 1e6
    machine_rate, api_rate = cores / machine_us * 1e6, 1e6 / api_us
    return {
        "machine_us": round(machine_us, 1),
        "machine_rate": machine_rate,
        "api_us": api_us,
        "api_rate": api_rate,
        "rate": min(machine_rate, api_rate),
    }


def _blank(value: Any) -> Any:
    return "" if value is None else value


def render_table(table: list[dict[str, Any]], processes: dict[str, Any]) -> str:
    """The table as aligned text (also valid Markdown)."""
    head = [
        "figure",
        "value",
        "reference",
        "ref value",
        "ratio",
        "p50 ms",
        "p99 ms",
        "target",
        "met",
    ]
    lines = [
        [
            r["figure"],
            r["value"],
            r["reference"],
            _blank(r["reference_value"]),
            _blank(r["ratio"]),
            r["p50_ms"],
            r["p99_ms"],
            r["target"] or "",
            r["met"],
        ]
        for r in table
    ]
    cells = [head, *[[str(c) for c in line] for line in lines]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    out = []
    for n, row in enumerate(cells):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out.append("")
    by_phase = processes.get("peak_rss_mb_by_phase", {})
    phases = [p for p in by_phase if not p.startswith("before-")]
    out.append("| peak RSS MB per phase | " + " | ".join(phases) + " |")
    out.append("|---" * (len(phases) + 1) + "|")
    for name in ("api", "projector", "redis"):
        peaks = [str(by_phase[p].get(name, "")) for p in phases]
        out.append(f"| {name} | " + " | ".join(peaks) + " |")
    out.append("")
    out.append("| process | peak RSS MB | CPU (cores) writes c=64 | reads spread | drain |")
    out.append("|---|---|---|---|---|")
    cpu = processes["cpu"]
    for name, rss in processes["peak_rss_mb"].items():
        shares = [
            str(cpu.get(phase, {}).get(name, ""))
            for phase in ("writes-64", "reads-spread", "drain")
        ]
        peak = f"{rss:.0f}" if rss else "-"
        out.append(f"| {name} | {peak} | " + " | ".join(shares) + " |")
    return "\n".join(out)


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Everything measured, as JSON."""
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def write_chart(path: Path, results: dict[str, Any]) -> None:
    """Throughput against concurrency (with the references) and lag percentiles, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = results["reference"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    clients = [int(c) for c in results["writes"]]
    left.plot(clients, [f["rate"] for f in results["writes"].values()], "o-", label="writes/s")
    for name, marker in (("spread", "s"), ("hot", "^")):
        left.plot([64], [results["reads"][name]["rate"]], marker, label=f"reads/s {name}")
    left.axhline(
        refs["pgbench_insert_c16"]["rate"], ls="--", color="gray", label="pgbench INSERT c=16"
    )
    left.axhline(
        refs["pgbench_select_c16"]["rate"], ls=":", color="gray", label="pgbench SELECT c=16"
    )
    left.axhline(3600, ls="-.", color="tab:red", lw=0.8, label="write target")
    left.axhline(5500, ls=(0, (1, 3)), color="tab:red", lw=0.8, label="read target")
    left.set_xscale("log", base=2)
    # Log scale: the pgbench SELECT reference is ten times the API's figures and would
    # otherwise flatten them against the axis.
    left.set_yscale("log")
    left.set_xticks(clients, [str(c) for c in clients])
    left.set_xlabel("concurrent clients")
    left.set_ylabel("requests per second")
    left.set_title("throughput vs concurrency (1 API process)")
    left.legend(fontsize=7)
    lag = results["lag"]
    names = ["p50", "p90", "p99", "p99.9", "max"]
    values = [lag["p50_ms"], lag["p90_ms"], lag["p99_ms"], lag["p99.9_ms"], lag["max_ms"]]
    right.bar(names, values, color="tab:blue")
    right.axhline(50, ls="--", color="tab:red", label="p99 target 50 ms")
    right.set_yscale("log")  # p50 is a few ms, the tail can be hundreds
    right.set_ylabel("ms")
    right.set_title(f"visibility lag at {lag['write_rate']:.0f} writes/s")
    right.legend(fontsize=7)
    fig.suptitle(f"cqrs-stack bench ({results['plan']}) — {results['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
