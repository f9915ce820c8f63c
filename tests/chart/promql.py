"""What a PromQL expression reads: its metric names and the label matchers it puts on them.

A small scanner, not a parser: strings, ranges, grouping clauses and calls are taken out, and
every identifier left is a metric name. It errs on the strict side: an identifier it does not
know as a keyword counts as a metric name, so a typo is reported, never skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "atan2",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        # Aggregations (also written `sum by (x) (...)`, with the call after the clause).
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_SELECTOR = re.compile(r'([A-Za-z_:][\w:]*)\s*\{((?:[^}"]|"(?:[^"\\]|\\.)*")*)\}')
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!=|!~|=)\s*("(?:[^"\\]|\\.)*")')
_CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.$:])([A-Za-z_:][\w:]*)(\s*\()?")
# Grafana's variable query: label_values(<selector>, <label>) or label_values(<label>).
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*?)(?:,\s*[A-Za-z_]\w*)?\)\s*$")


def metric_names(expr: str) -> set[str]:
    """Every metric name ``expr`` reads."""
    expr = _grafana_query(expr)
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _CLAUSE.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in KEYWORDS:
            continue
        names.add(name)
    return names


def selectors(expr: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(metric, {label: value}) of each selector with equality matchers in ``expr``."""
    for match in _SELECTOR.finditer(_grafana_query(expr)):
        matchers = {
            label: value[1:-1] for label, op, value in _MATCHER.findall(match.group(2)) if op == "="
        }
        yield match.group(1), matchers


def _grafana_query(expr: str) -> str:
    found = _LABEL_VALUES.match(expr)
    if found is None:
        return expr
    argument = found.group(1)
    # label_values(namespace): a label alone, no metric.
    return "" if re.fullmatch(r"\s*[A-Za-z_]\w*\s*", argument) and "{" not in argument else argument


def exported_names(families: Iterable[tuple[str, str, Iterable[str]]]) -> set[str]:
    """The series names a scrape offers, from (family name, type, sample names) triples:
    declared families count even before their first sample (a counter with labels has none
    until it is first incremented)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
        "unknown": ("",),
        "untyped": ("",),
        "info": ("_info",),
        "stateset": ("",),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    }
    names: set[str] = set()
    for family, kind, samples in families:
        names.update(f"{family}{suffix}" for suffix in suffixes.get(kind, ("",)))
        names.update(samples)
    return names


def unexported(exprs: Iterable[str], exported: set[str]) -> dict[str, set[str]]:
    """The metric names each expression reads that nothing exports ({} when all are)."""
    missing: dict[str, set[str]] = {}
    for expr in exprs:
        absent = metric_names(expr) - exported
        if absent:
            missing[expr] = absent
    return missing


def unmatched(
    exprs: Iterable[str], samples: Mapping[str, list[dict[str, str]]], target_labels: set[str]
) -> list[str]:
    """Equality matchers that no scraped sample of their metric satisfies (labels the scrape
    adds, in ``target_labels``, and Grafana variables are not checked)."""
    wrong = []
    for expr in exprs:
        for metric, matchers in selectors(expr):
            wanted = {k: v for k, v in matchers.items() if k not in target_labels and "$" not in v}
            if not wanted:
                continue
            if not any(
                all(labels.get(k) == v for k, v in wanted.items())
                for labels in samples.get(metric, [])
            ):
                wrong.append(f"{metric}{wanted} in {expr!r}")
    return wrong
