"""One Redis against a Redis Cluster: the same scenarios on two uvicorn workers of
``bench/apps/cluster.py`` on ONE local redis-server (``SSE_BACKEND=redis``) and on a
local Redis Cluster of 3 masters with a replica each (``SSE_BACKEND=redis-cluster``),
the two taking turns in every round (which goes first alternates). The load client
(``bench/cluster_load.py``) runs in its own process; everything is on 127.0.0.1.

1. Fan-out: ``--subscribers`` streams of one channel split over the two workers,
   ``--broadcasts`` broadcasts paced one at a time (each published once the one before
   reached every stream): delivered events/s, the time one broadcast takes to reach
   all (p50) and the p99 delivery latency.
2. Many channels: ``--channels`` channels (``user:<k>``, spread over the masters by
   their hash slots), ``--per-channel`` streams each, a burst of ``--burst`` events per
   channel as fire-and-forget ``broadcast`` calls from one worker: delivered events/s.
3. Per publish: one publisher, ``--publishes`` awaited publishes one after another:
   p50 of the HTTP request and of the await in the worker, Redis commands per publish.
4. Per resume: a stream on three channels (on the cluster, on three different masters)
   misses ``--missed`` events per channel, then resumes with its ``Last-Event-ID``:
   median time from the request to the last replayed event, Redis commands per resume.

Redis commands are ``INFO commandstats`` summed over the masters (one Redis: the
server), just before and just after; commands that scripts run count one each. The
script time is the ``usec`` Redis reports for its script calls (the commands they run
included): what a master spends executing them, without the network I/O around them.

Usage: ``python -m bench.cluster [--rounds 3] [--subscribers 1000] ...``; prints each
round, a table of medians (range of the rounds in brackets, the ratio cluster / one
Redis paired within each round) and, last, one JSON line. Nothing is judged here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

from redis.crc import key_slot

from bench.run import load, raise_fd_limit_in_child
from tests.helpers.redis import start_redis
from tests.helpers.redis_cluster import RedisCluster
from tests.helpers.servers import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
APP = "bench.apps.cluster:app"
RESULTS = ROOT / "bench" / "results"
MODES = {"redis": "one Redis", "cluster": "cluster"}
SCENARIOS = ("fanout", "channels", "publish", "resume")

# (key, label, how it is shown)
FIGURES = [
    ("fanout_events_per_s", "fan-out: delivered events/s", "rate"),
    ("fanout_one_broadcast_s", "fan-out: one broadcast reaches all, p50", "ms"),
    ("fanout_p99_s", "fan-out: delivery latency p99", "ms"),
    ("channels_events_per_s", "many channels: delivered events/s", "rate"),
    ("channels_script_calls_per_event", "many channels: script calls per published event", "fraction"),
    ("channels_script_us_per_event", "many channels: Redis script time per published event", "us"),
    ("publish_p50_s", "awaited publish: HTTP request p50", "ms"),
    ("publish_await_p50_s", "awaited publish: await in the worker p50", "ms"),
    ("commands_per_publish", "Redis commands per publish", "count"),
    ("script_us_per_publish", "Redis script time per publish", "us"),
    ("resume_s", "resume: request to last replayed event", "ms"),
    ("commands_per_resume", "Redis commands per resume", "count"),
    ("script_us_per_resume", "Redis script time per resume", "us"),
]


def _show(value: float, how: str) -> str:
    if how == "rate":
        return f"{value:,.0f}"
    if how == "ms":
        return f"{value * 1000:.2f} ms" if value < 0.01 else f"{value * 1000:.1f} ms"
    if how == "fraction":
        return f"{value:.3f}"
    if how == "us":
        return f"{value:.1f} us"
    return f"{value:.1f}"


@contextmanager
def workers(env: dict[str, str], log_path: Path, count: int = 2) -> Iterator[list[int]]:
    """``count`` uvicorn processes of the app (uvloop, httptools), each on its own port;
    their output goes to ``log_path``."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    procs: list[subprocess.Popen[bytes]] = []
    with log_path.open("ab") as log:
        try:
            for port in ports:
                command = [sys.executable, "-m", "uvicorn", APP, "--host", "127.0.0.1", "--port", str(port)]
                command += ["--log-level", "warning", "--loop", "uvloop", "--http", "httptools", "--no-access-log"]
                full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
                proc = subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=full_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=raise_fd_limit_in_child,
                )
                procs.append(proc)
            for port, proc in zip(ports, procs, strict=True):
                wait_for_port(port, deadline=30, proc=proc)
            yield ports
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def env_for(mode: str, url: str, prefix: str, args: argparse.Namespace) -> dict[str, str]:
    """The workers' settings: the backend, a key prefix of the run's own, and the
    periodic work (heartbeats, worker stats, subscription probes) far apart, so that
    the commands counted are those of what is measured. Both set-ups get
    ``--redis-connections`` connections per worker (the default of the setting, 50)."""
    return {
        "SSE_BACKEND": "redis" if mode == "redis" else "redis-cluster",
        "SSE_REDIS_URL": url,
        "SSE_REDIS_KEY_PREFIX": prefix,
        "SSE_REDIS_MAX_CONNECTIONS": str(args.redis_connections),
        "SSE_MAX_CONNECTIONS": "100000",
        "SSE_HEARTBEAT_INTERVAL": "60",
        "SSE_PRESENCE_INTERVAL": "60",
        "SSE_REDIS_HEALTH_INTERVAL": "60",
        "SSE_DRAIN_WINDOW": "0",
    }


def spread(cluster: RedisCluster, names: list[str]) -> dict[int, list[str]]:
    """``names`` by the port of the master that owns their hash tag's slot (a channel's
    tag is its name)."""
    by_port: dict[int, list[str]] = {m.port: [] for m in cluster.masters()}
    for name in names:
        by_port[cluster.master_for_slot(key_slot(name.encode())).port].append(name)
    return by_port


def one_round(
    mode: str, url: str, redis_ports: list[int], args: argparse.Namespace, plan: dict[str, Any], failures: list[str]
) -> dict[str, Any]:
    """Every scenario once on two fresh workers of ``mode``."""
    prefix = f"bench-cluster:{uuid.uuid4().hex[:8]}:"
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        ports = stack.enter_context(workers(env_for(mode, url, prefix, args), args.out / "cluster-servers.log"))
        for scenario in SCENARIOS:
            spec = {**plan, "scenario": scenario, "ports": ports, "redis_ports": redis_ports}
            try:
                results.update(load(spec, timeout=args.deadline * 3, client="bench.cluster_load"))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                reason = str(exc).strip().splitlines()[-1]
                failures.append(f"{MODES[mode]} {scenario}: {reason}")
                print(f"  {MODES[mode]:9} {scenario}: FAILED ({reason})", flush=True)
    return results


def summary(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Median and range of every figure per mode, and of the paired ratio."""
    out: dict[str, Any] = {"medians": {}, "ranges": {}, "ratio": {}, "ratio_range": {}}
    for key, _, _ in FIGURES:
        for mode in MODES:
            values = [r[mode][key] for r in rounds if key in r.get(mode, {})]
            if values:
                out["medians"].setdefault(mode, {})[key] = statistics.median(values)
                out["ranges"].setdefault(mode, {})[key] = [min(values), max(values)]
        ratios = [
            r["cluster"][key] / r["redis"][key]
            for r in rounds
            if key in r.get("cluster", {}) and r.get("redis", {}).get(key)
        ]
        if ratios:
            out["ratio"][key] = statistics.median(ratios)
            out["ratio_range"][key] = [min(ratios), max(ratios)]
    for what in ("publish_commands", "resume_commands"):
        for mode in MODES:
            seen = [r[mode][what] for r in rounds if what in r.get(mode, {})]
            names = sorted({n for s in seen for n in s}, key=lambda n: -statistics.median(s.get(n, 0) for s in seen))
            out.setdefault(what, {})[mode] = {n: statistics.median(s.get(n, 0) for s in seen) for n in names}
    return out


def table(result: dict[str, Any]) -> str:
    medians, ranges = result["medians"], result["ranges"]
    rows = [("figure", *MODES.values(), "cluster / one Redis")]
    for key, label, how in FIGURES:
        cells = [label]
        for mode in MODES:
            if key in medians.get(mode, {}):
                low, high = ranges[mode][key]
                shown = _show(medians[mode][key], how)
                unit = " ms" if how == "ms" else " us" if how == "us" else ""
                cells.append(f"{shown} ({_show(low, how).removesuffix(unit)}-{_show(high, how)})")
            else:
                cells.append("-")
        if key in result["ratio"]:
            low, high = result["ratio_range"][key]
            cells.append(f"{result['ratio'][key]:.2f}x ({low:.2f}-{high:.2f})")
        else:
            cells.append("-")
        rows.append(tuple(cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def breakdown(result: dict[str, Any]) -> str:
    lines = []
    for what, per in (("publish_commands", "publish"), ("resume_commands", "resume")):
        for mode, label in MODES.items():
            counts = result.get(what, {}).get(mode, {})
            listed = ", ".join(f"{name} {n:.2f}" for name, n in counts.items()) or "-"
            lines.append(f"  per {per}, {label}: {listed}")
    return "\n".join(lines)


def worker_output(log_path: Path, offset: int) -> dict[str, int]:
    """What the workers wrote to the log since ``offset``, each distinct line counted
    (client ids, node addresses and numbers masked), the most frequent first."""
    with log_path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    counts: dict[str, int] = {}
    for line in text.splitlines():
        line = re.sub(r"[0-9a-f]{12}\.[0-9a-f]{32}", "<client>", line.strip())
        line = re.sub(r"127\.0\.0\.1:\d+", "<node>", line)
        line = re.sub(r"\d+", "<n>", line)
        if line:
            counts[line] = counts.get(line, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:10])


def versions(redis_version: str) -> dict[str, str]:
    found = {"python": sys.version.split()[0], "redis-server": redis_version}
    for name in ("redis", "fastapi", "uvicorn", "uvloop", "httptools"):
        found[name] = version(name)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--subscribers", type=int, default=1000, help="fan-out: streams of the channel")
    parser.add_argument("--broadcasts", type=int, default=20, help="fan-out: paced broadcasts")
    parser.add_argument("--channels", type=int, default=300, help="many channels: how many")
    parser.add_argument("--per-channel", type=int, default=3, help="many channels: streams per channel")
    parser.add_argument("--burst", type=int, default=20, help="many channels: events per channel in the burst")
    parser.add_argument("--publishes", type=int, default=1000, help="per publish: awaited publishes")
    parser.add_argument("--resumes", type=int, default=10, help="per resume: measured resumes per round")
    parser.add_argument("--missed", type=int, default=100, help="per resume: events missed on each channel")
    parser.add_argument("--size", type=int, default=64, help="padding of each payload, bytes")
    parser.add_argument(
        "--redis-connections",
        type=int,
        default=50,
        help="SSE_REDIS_MAX_CONNECTIONS of the workers (the setting's default)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of the JSON result and the workers' log")
    parser.add_argument("--deadline", type=float, default=120.0, help="longest wait of any step, seconds")
    args = parser.parse_args()
    started = time.monotonic()
    plan = {
        "subscribers": args.subscribers,
        "broadcasts": args.broadcasts,
        "channels": args.channels,
        "per_channel": args.per_channel,
        "burst": args.burst,
        "publishes": args.publishes,
        "resumes": args.resumes,
        "missed": args.missed,
        "size": args.size,
        "deadline": args.deadline,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "cluster-servers.log"
    log_path.touch()
    logged = log_path.stat().st_size
    single = start_redis()
    cluster = RedisCluster(3, 1)
    rounds: list[dict[str, dict[str, Any]]] = []
    failures: list[str] = []
    try:
        cluster.start()
        masters = cluster.masters()
        by_master = spread(cluster, [f"user:{k}" for k in range(args.channels)])
        rooms = spread(cluster, [f"room{k}" for k in range(200)])
        plan["resume_channels"] = [names[0] for names in rooms.values()]
        targets = {
            "redis": (single.url, [single.port]),
            "cluster": (masters[0].url, [m.port for m in masters]),
        }
        redis_version = str(cluster.client_for(masters[0]).info("server")["redis_version"])
        print(
            f"Redis Cluster benchmark: {args.rounds} round(s); one redis-server against a cluster of "
            f"{len(masters)} masters with a replica each; 2 workers each",
            flush=True,
        )
        print(
            f"  {args.channels} channels over the masters: {' · '.join(str(len(v)) for v in by_master.values())}; "
            f"resume channels {', '.join(plan['resume_channels'])} (one per master)",
            flush=True,
        )
        for number in range(args.rounds):
            order = list(MODES)[number % 2 :] + list(MODES)[: number % 2]
            found: dict[str, dict[str, Any]] = {}
            for mode in order:
                url, redis_ports = targets[mode]
                found[mode] = one_round(mode, url, redis_ports, args, plan, failures)
                shown = ", ".join(f"{k}={v:.4g}" for k, v in found[mode].items() if isinstance(v, int | float))
                print(f"round {number + 1} {MODES[mode]:9}: {shown}", flush=True)
            rounds.append(found)
    finally:
        cluster.stop()
        single.proc.kill()
        single.proc.wait(10)
    result = summary(rounds)
    seconds = time.monotonic() - started
    print()
    print(table(result))
    print("\nRedis commands (medians of the rounds):")
    print(breakdown(result))
    lost = [r[m].get("channels_lost", 0) for r in rounds for m in r]
    if any(lost):
        print(f"\nevents not delivered in the many-channels burst, per run: {lost}")
    warnings = worker_output(log_path, logged)
    if warnings:
        print("\nwhat the workers logged (count, line with ids and ports masked):")
        print("\n".join(f"  {count:6} {line}" for line, count in warnings.items()))
    if failures:
        print("\nfailed runs (left out of the medians):\n" + "\n".join(f"  {f}" for f in failures))
    print(f"\n{seconds:.0f} s in all; the workers' output is in {log_path}")
    report = {
        "versions": versions(redis_version),
        "cpus": os.cpu_count(),
        "plan": plan,
        "seconds": seconds,
        **result,
        "rounds": rounds,
        "failures": failures,
        "worker_output": warnings,
    }
    (args.out / "cluster-latest.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
