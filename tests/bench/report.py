"""The benchmark's outputs: one table on stdout, JSON, and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# (figure, target, higher is better)
TARGETS = {
    "writes/s c=64": (3600, True),
    "reads/s spread c=64": (5500, True),
    "reads/s hot c=64": (5500, True),
    "projection events/s": (15000, True),
    "visibility lag p99 ms": (50, False),
    "rebuild commands/s": (50000, True),
    "/health p99 ms (writes c=64)": (5, False),
}


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
                "value": round(value, 1),
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
