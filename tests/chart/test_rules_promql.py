"""The chart's alert expressions evaluated by Prometheus' own PromQL engine on the scenarios of
tests/chart/promql_scenarios (promqltest scripts: ``load`` series, ``eval`` what an alert's
expression returns; ``${Alert}`` stands for the rendered expression of that alert, defaults).

Needs the promqltest runner built from tests/chart/promqltest (Prometheus' module, pinned in
its go.mod): in that folder ``GOFLAGS=-mod=mod go test -c -o /some/dir/promqltest .``, then
``PROMQLTEST=/some/dir/promqltest``. Without it the test is skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.chart.chart import one, render

SCENARIOS = sorted((Path(__file__).parent / "promql_scenarios").glob("*.test"))
SERVED = ("monitoring.coreos.com/v1", "monitoring.coreos.com/v1/PrometheusRule")
RUNNER = os.environ.get("PROMQLTEST", "")
RUN_TIMEOUT = 60


def alert_exprs() -> dict[str, str]:
    """Each alert's expression with the default values, on one line (an eval line is one)."""
    docs = render(None, "monitoring.prometheusRule.enabled=true", api_versions=SERVED)
    rules = [r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    return {r["alert"]: " ".join(r["expr"].split()) for r in rules}


@pytest.mark.skipif(not RUNNER or not Path(RUNNER).is_file(), reason="PROMQLTEST unset")
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.stem)
def test_alert_expressions_on_prometheus_engine(scenario: Path, tmp_path: Path) -> None:
    exprs = alert_exprs()

    def expr(match: re.Match[str]) -> str:
        return exprs[match.group(1)]

    script = tmp_path / scenario.name
    script.write_text(re.sub(r"\$\{(\w+)\}", expr, scenario.read_text()))
    done = subprocess.run(
        [RUNNER, "-test.run", "TestScript"],
        env={**os.environ, "SCRIPT": str(script)},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
