"""Small helpers over the dashboard and alert queries: list them, substitute Grafana's variables, and pull the
metric names out of a PromQL expression (enough of PromQL's grammar for the queries glmserve writes)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "glmserve" / "dashboards" / "glmserve.json"

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
             "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects (functions, aggregations and keywords excluded)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery windows
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue  # a function or aggregation call, or a keyword
        names.add(m.group(0))
    return names


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target."""
    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p["targets"]]


def variable_queries() -> list[str]:
    """The series selectors inside the templating variables' label_values(...) queries."""
    out = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", var["definition"])
            assert m, var["definition"]
            out.append(m.group(1))
    return out


def substitute(expr: str, rate_window: str = "1m") -> str:
    """What Grafana sends to Prometheus with every variable at "All"."""
    return (expr.replace("$__rate_interval", rate_window).replace("$namespace", ".*")
            .replace("$model_name", ".*"))
