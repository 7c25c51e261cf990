"""Medians, spreads and ratios of saved runs: the figures docs/performance.md quotes.

``python -m bench.spread RESULTS.json [MORE.json ...] [--against ours]`` prints, for
every scenario, size and app, the median of each figure with the lowest and highest
run, and each app's median as a ratio to the ``--against`` app's. Every file must come
from runs where the apps took turns (``bench.run`` rotates them), so ratios compare
figures taken side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

FIGURES = [
    ("events_per_s", "events/s", 1, "{:,.0f}"),
    ("latency_p99", "p99 ms", 1000, "{:,.0f}"),
    ("one_broadcast_s", "one broadcast ms", 1000, "{:,.0f}"),
    ("rss_per_conn", "KB/conn", 1 / 1024, "{:.1f}"),
    ("objects_per_conn", "objs/conn", 1, "{:.0f}"),
    ("heap_per_conn", "JS heap KB/conn", 1 / 1024, "{:.1f}"),
    ("cpu_us_per_event", "CPU us/event", 1, "{:.1f}"),
    ("connect_per_s", "conn/s", 1, "{:,.0f}"),
]


def merged(paths: list[str]) -> dict[str, dict[str, dict[str, list[dict[str, Any]]]]]:
    raw: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    for path in paths:
        for scenario, labels in json.loads(Path(path).read_text())["raw"].items():
            for label, apps in labels.items():
                for app, rows in apps.items():
                    raw.setdefault(scenario, {}).setdefault(label, {}).setdefault(app, []).extend(rows)
    return raw


def table(raw: dict[str, Any], against: str) -> str:
    lines: list[str] = []
    for scenario, labels in raw.items():
        for label, apps in labels.items():
            keys = [f for f in FIGURES if any(f[0] in r for rows in apps.values() for r in rows)]
            lines += ["", f"**{scenario} {label}**", ""]
            lines.append("| app | runs | " + " | ".join(title for _, title, _, _ in keys) + " |")
            lines.append("|---|---:|" + "---:|" * len(keys))
            base = {
                k: statistics.median(r[k] for r in apps[against])
                for k, *_ in keys
                if against in apps and all(k in r for r in apps[against])
            }
            for app, rows in apps.items():
                cells = []
                for key, _, scale, form in keys:
                    values = [r[key] for r in rows if key in r]
                    if not values:
                        cells.append("-")
                        continue
                    median = statistics.median(values)
                    cell = form.format(median * scale)
                    if len(values) > 1:
                        cell += f" ({form.format(min(values) * scale)}-{form.format(max(values) * scale)})"
                    if app != against and base.get(key):
                        cell += f" **{median / base[key]:.2f}x**"
                    cells.append(cell)
                lines.append(f"| {app} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines).strip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="JSON files written by bench.run (latest.json, bench-*.json)")
    parser.add_argument("--against", default="ours", help="the app every ratio divides by")
    args = parser.parse_args()
    print(table(merged(args.results), args.against))


if __name__ == "__main__":
    main()
