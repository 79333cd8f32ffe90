#!/usr/bin/env python3
"""Checks the example Grafana dashboard (k8s/grafana/tessera-dashboard.json), offline.

- it is a dashboard Grafana imports: a title, a uid, a `datasource` template variable that
  every panel and query uses, panels inside the 24-column grid without overlaps, unique
  `refId`s per panel, every query non-empty with balanced brackets;
- every metric a query reads is one Tessera records: its name (without the `_bucket`,
  `_sum` or `_count` of a histogram) is written as a string literal in the Rust sources, and
  a `_bucket` series belongs to a `*_seconds` histogram (the only metrics the exporter gives
  buckets, libs/server/src/edge.rs).

Usage: scripts/check_dashboard.py [DASHBOARD]
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRIC = re.compile(r"\btessera_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_sum", "_count")


def fail(message: str) -> None:
    print(f"check_dashboard: {message}", file=sys.stderr)
    sys.exit(1)


def recorded_metrics() -> set[str]:
    names: set[str] = set()
    for source in list(ROOT.glob("services/**/*.rs")) + list(ROOT.glob("libs/**/*.rs")):
        names.update(re.findall(r'"(tessera_[a-z0-9_]+)"', source.read_text()))
    return names


def balanced(expr: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for ch in expr:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "k8s/grafana/tessera-dashboard.json"
    try:
        dashboard = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{path}: {e}")
    for key in ("title", "uid", "panels", "templating"):
        if key not in dashboard:
            fail(f"{path}: no {key!r}")
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    if "datasource" not in variables:
        fail("no `datasource` template variable")
    recorded = recorded_metrics()
    taken: set[tuple[int, int]] = set()
    read: set[str] = set()
    for panel in dashboard["panels"]:
        title = panel.get("title", "?")
        grid = panel["gridPos"]
        if grid["x"] < 0 or grid["x"] + grid["w"] > 24:
            fail(f"panel {title!r} leaves the 24-column grid: {grid}")
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        if cells & taken:
            fail(f"panel {title!r} overlaps another: {grid}")
        taken |= cells
        if panel["type"] == "row":
            continue
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            fail(f"panel {title!r} does not use the datasource variable")
        refs = [t["refId"] for t in panel.get("targets", [])]
        if not refs or len(refs) != len(set(refs)):
            fail(f"panel {title!r}: no queries or repeated refIds {refs}")
        for target in panel["targets"]:
            expr = target.get("expr", "")
            if not expr.strip() or not balanced(expr):
                fail(f"panel {title!r}: unusable query {expr!r}")
            for name in METRIC.findall(expr):
                base = name
                for suffix in SUFFIXES:
                    if name.endswith(suffix) and name[: -len(suffix)] in recorded:
                        base = name[: -len(suffix)]
                if name.endswith("_bucket") and not base.endswith("_seconds"):
                    fail(f"panel {title!r}: {name} has no buckets (only *_seconds histograms do)")
                if base not in recorded:
                    fail(f"panel {title!r}: {name} is not a metric Tessera records")
                read.add(base)
    print(f"check_dashboard: {path.relative_to(ROOT)}: {len(dashboard['panels'])} panels, "
          f"{len(read)} metrics, all recorded")


if __name__ == "__main__":
    main()
