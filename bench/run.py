"""Run the benchmark: every scenario against every app, repeated, medians and ratios.

``python -m bench.run`` (``make bench``) runs the full suite; ``--smoke`` runs tiny
sizes in seconds (``make bench-smoke``). Each run starts the app in its own uvicorn
process (one worker, uvloop, httptools) and the load client in another, both on
127.0.0.1. Results: a table on the terminal, JSON in ``bench/results/`` and a chart.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import raise_fd_limit  # noqa: E402
from bench.peers import servers as peers  # noqa: E402
from tests.helpers.redis import start_redis  # noqa: E402
from tests.helpers.servers import free_port, wait_for_port  # noqa: E402

APPS = {
    "ours": "bench.apps.ours:app",
    "straightforward": "bench.baselines.straightforward:app",
    "builtin": "bench.baselines.builtin:app",
    "ours-middleware": "bench.apps.ours:app",
    "better-sse": "node:app.mjs",
    "aiohttp-sse": "aiohttp:bench.peers.aiohttp_sse_app",
    "floor": "bench.peers.floor_app:app",
    "uvicorn-idle": "bench.peers.idle_app:app",
    "ours-granian": "granian:bench.apps.ours:app",
    "ours-hypercorn": "hypercorn:bench.apps.ours:app",
}
BASELINE = "straightforward"
REDIS_BASELINE = "memory-1-worker"


def most_connections(wanted: int = 20_000) -> int:
    """``wanted``, or fewer when this machine's file-descriptor limit cannot hold them
    (raising the hard limit needs privileges a container may not have)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard >= wanted + 100:
        return wanted
    return hard - 100


def raise_fd_limit_in_child() -> None:
    """``preexec_fn`` of the servers and load clients: room for tens of thousands of sockets."""
    raise_fd_limit(65536)


SERVER_LOG = ROOT / "bench" / "results" / "servers.log"


@contextmanager
def server(app: str, env: dict[str, str], workers: int = 1) -> Iterator[int]:
    """Serve one app; its output goes to ``bench/results/servers.log`` (the baselines
    print tracebacks when streams are cut at shutdown)."""
    port = free_port()
    command = peers.command(APPS[app], port, workers)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **peers.ENV.get(app, {}), **env}
    SERVER_LOG.parent.mkdir(parents=True, exist_ok=True)
    log = SERVER_LOG.open("ab")
    log.write(f"--- {app} {' '.join(command[2:])}\n".encode())
    log.flush()
    proc = subprocess.Popen(
        command, cwd=ROOT, env=full_env, preexec_fn=raise_fd_limit_in_child, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for_port(port, deadline=30, proc=proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def load(spec: dict[str, Any], timeout: float, client: str = "bench.loadgen") -> dict[str, Any]:
    """Run the load client (the module ``client``) with ``spec``; its JSON result."""
    done = subprocess.run(
        [sys.executable, "-m", client, json.dumps(spec)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=raise_fd_limit_in_child,
    )
    if done.returncode:
        raise RuntimeError(f"load client failed for {spec['scenario']}: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def plan(smoke: bool, sizes: list[int]) -> list[tuple[str, str, dict[str, Any], dict[str, str]]]:
    """(scenario, label, load spec, server env) for every measurement."""
    quick = {"HEARTBEAT": "15"}
    runs: list[tuple[str, str, dict[str, Any], dict[str, str]]] = []
    for n in sizes:
        spec = {
            "scenario": "fanout",
            "clients": n,
            "events": 5 if smoke else 20,
            "interval": 0.0,
            "singles": 1 if smoke else 3,
            "size": 64,
        }
        runs.append(("fanout", f"{n}", spec, quick))
    for n in sizes:
        paced = {"scenario": "paced", "clients": n, "events": 3 if smoke else 20, "size": 64}
        runs.append(("paced", f"{n}", paced, quick))
    users = 20 if smoke else 5000
    runs.append(
        (
            "users",
            f"{users}",
            {"scenario": "users", "clients": users, "events": users * (1 if smoke else 4), "interval": 0.0, "size": 64},
            quick,
        )
    )
    runs.append(("single", "1", {"scenario": "single", "events": 200 if smoke else 50_000, "size": 64}, quick))
    idle = 20 if smoke else 10_000
    runs.append(("idle", f"{idle}", {"scenario": "idle", "clients": idle}, quick))
    readers, stalled = (20, 2) if smoke else (1000, 100)
    events = 20 if smoke else 200
    for count in (0, stalled):
        spec = {
            "scenario": "stalled",
            "clients": readers,
            "stalled": count,
            "events": events,
            "interval": 0.02,
            "size": 256,
            "fill_events": 20 if smoke else 500,
            "fill_size": 8192,
        }
        runs.append(("stalled", f"{readers}+{count}", spec, quick))
    beat = 20 if smoke else most_connections()
    window = 1.0 if smoke else 6.0
    runs.append(
        (
            "heartbeat",
            f"{beat}",
            {"scenario": "heartbeat", "clients": beat, "window": window},
            {"HEARTBEAT": "1" if smoke else "2"},
        )
    )
    return runs


def env_for(app: str, extra: dict[str, str], tune_gc: bool) -> dict[str, str]:
    beat = extra.get("HEARTBEAT", "15")
    env = {"BENCH_HEARTBEAT": beat, "SSE_HEARTBEAT_INTERVAL": beat, "SSE_MAX_CONNECTIONS": "100000"}
    if tune_gc:
        env["BENCH_TUNE_GC"] = "1"
    return env


def median_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float))]
    return {k: statistics.median(r[k] for r in rows) for k in keys}


def measure(spec: dict[str, Any], timeout: float, what: str, failures: list[str]) -> dict[str, Any] | None:
    """One load run; a run that fails (an app that cannot hold the load) is reported
    and recorded, and the benchmark goes on."""
    try:
        return load(spec, timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        reason = str(exc).strip().splitlines()[-1]
        failures.append(f"{what}: {reason}")
        print(f"  {what}: FAILED ({reason})", flush=True)
        return None


def run(args: argparse.Namespace, failures: list[str]) -> dict[str, Any]:
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else ([20, 50] if args.smoke else [1000, 5000, 10_000, most_connections()])
    )
    apps = [app for app in args.apps.split(",") if not _skipped(app)]
    wanted = set(args.scenarios.split(",")) if args.scenarios else None
    raw: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    timeout = 60 if args.smoke else 900
    for scenario, label, spec, extra in plan(args.smoke, sizes):
        if wanted and scenario not in wanted:
            continue
        for repeat in range(args.repeats):
            # Rotate the order of the apps: none always runs first on a cold machine.
            order = apps[repeat % len(apps) :] + apps[: repeat % len(apps)]
            for app in order:
                if not peers.applies(app, scenario, smoke=args.smoke):
                    continue
                what = f"{scenario:9} {label:>9} {app:15} run {repeat + 1}"
                with server(app, env_for(app, extra, args.tune_gc)) as port:
                    spec_here = {**spec, "host": "127.0.0.1", "port": port, "deadline": timeout / 2}
                    result = measure(spec_here, timeout, what, failures)
                if result is None:
                    continue
                raw.setdefault(scenario, {}).setdefault(label, {}).setdefault(app, []).append(result)
                print(f"  {what}: {_brief(result)}", flush=True)
        partial = Path(args.partial or Path(args.out) / "partial.json")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"raw": raw, "failures": failures}, indent=1))
    if not wanted or "redis" in wanted:
        raw.update(run_redis(args, timeout, failures))
    if not wanted or "redis_burst" in wanted:
        raw.update(run_redis_burst(args, timeout, failures))
    if not wanted or "redis_users" in wanted:
        raw.update(run_redis_users(args, timeout, failures))
    return raw


def run_redis_users(args: argparse.Namespace, timeout: float, failures: list[str]) -> dict[str, Any]:
    """Per-user notifications through Redis: two uvicorn processes of our app (one worker
    each, on ports of their own so the load client splits the users exactly) on one
    redis-server, user ``k`` streaming ``user:<k>`` from worker ``k % 2``, and every
    event a fire-and-forget ``broadcast("user:<k>")`` from the first worker, one user
    after another: back to back (the rate it sustains; the latency is then the queue's),
    and one every millisecond, one event per user (the latency of the path). Beside it,
    in the same run, the in-memory single worker with every user; the pair alternates
    which goes first."""
    if importlib.util.find_spec("fastapi_sse.backends.redis") is None:
        print("  redis_users skipped: fastapi_sse.backends.redis is not available in this checkout", flush=True)
        return {}
    users, rounds = (20, 2) if args.smoke else (2000, 5)
    # (label, events, seconds between two publishes)
    steps = [(f"{users}x{users * rounds}", users * rounds, 0.0), (f"{users}@1ms", users, 0.001)]
    redis = start_redis()
    out: dict[str, Any] = {"redis_users": {}}
    try:
        for repeat, (label, events, interval) in itertools.product(range(args.repeats), steps):
            pair = [(REDIS_BASELINE, 1), ("redis-2-workers", 2)]
            for name, workers in pair[repeat % 2 :] + pair[: repeat % 2]:
                prefix = f"bench:users:{repeat}:{time.time_ns()}:"
                env = {**env_for("ours", {}, args.tune_gc)}
                if workers > 1:
                    env.update({"SSE_BACKEND": "redis", "SSE_REDIS_URL": redis.url, "SSE_REDIS_KEY_PREFIX": prefix})
                what = f"redis_users {label:>9} {name:15} run {repeat + 1}"
                with ExitStack() as stack:
                    ports = [stack.enter_context(server("ours", env)) for _ in range(workers)]
                    spec = {
                        "scenario": "redis_users",
                        "clients": users,
                        "events": events,
                        "interval": interval,
                        "size": 64,
                        "host": "127.0.0.1",
                        "port": ports[0],
                        "ports": ports,
                        "deadline": timeout / 2,
                    }
                    result = measure(spec, timeout, what, failures)
                if result is None:
                    continue
                out["redis_users"].setdefault(label, {}).setdefault(name, []).append(result)
                print(f"  {what}: {_brief(result)}", flush=True)
            _print_pair(out["redis_users"].get(label, {}), label, repeat)
    finally:
        redis.proc.kill()
        redis.proc.wait(10)
    return out


def run_redis_burst(args: argparse.Namespace, timeout: float, failures: list[str]) -> dict[str, Any]:
    """The "Redis publish burst": one worker on Redis, one stream per ``user:<k>`` channel
    (the load client's raw sockets count what each receives), 100,000 fire-and-forget
    ``broadcast`` calls; beside it, in the same run, the same events published one
    awaited call at a time (the old outbox) and the library's script run from a bare
    redis-py pipeline (the floor)."""
    if importlib.util.find_spec("fastapi_sse.backends.redis") is None:
        print("  redis_burst skipped: fastapi_sse.backends.redis is not available in this checkout", flush=True)
        return {}
    users, events, baseline = (20, 200, 50) if args.smoke else (5000, 100_000, 20_000)
    redis = start_redis()
    out: dict[str, Any] = {"redis_burst": {}}
    try:
        for repeat, streams in itertools.product(range(args.repeats), (users, 0)):
            # With a stream per channel (the scenario), and without any: publishing alone.
            label = f"{streams}x{events}"
            prefix = f"bench:{repeat}:{time.time_ns()}:"
            env = {"SSE_BACKEND": "redis", "SSE_REDIS_URL": redis.url, "SSE_REDIS_KEY_PREFIX": prefix}
            what = f"redis_burst {label:>9} {'ours':15} run {repeat + 1}"
            with server("ours", {**env_for("ours", {}, args.tune_gc), **env}) as port:
                spec = {
                    "scenario": "publish_burst",
                    "clients": streams,
                    "users": users,
                    "events": events,
                    "baseline_events": baseline,
                    "size": 64,
                    "host": "127.0.0.1",
                    "port": port,
                    "redis_url": redis.url,
                    "redis_prefix": prefix,
                    "deadline": timeout / 2,
                }
                result = measure(spec, timeout, what, failures)
            if result is None:
                continue
            out["redis_burst"].setdefault(label, {}).setdefault("ours", []).append(result)
            print(f"  {what}: {_brief(result)}", flush=True)
    finally:
        redis.proc.kill()
        redis.proc.wait(10)
    return out


def _print_pair(runs: dict[str, list[dict[str, Any]]], label: str, repeat: int) -> None:
    """Redis over memory within one pair of runs: delivered events/s and p99 latency."""
    ours, base = runs.get("redis-2-workers", []), runs.get(REDIS_BASELINE, [])
    if len(ours) == len(base) == repeat + 1:
        rate = ours[-1]["events_per_s"] / base[-1]["events_per_s"]
        p99 = ours[-1]["latency_p99"] / base[-1]["latency_p99"]
        what = f"redis_users {label:>9} run {repeat + 1}"
        print(f"  {what}: redis/memory events/s {rate:.2f}x, p99 {p99:.1f}x", flush=True)


def _skipped(app: str) -> bool:
    """Leave out, saying why, an app whose server or packages are not on this machine."""
    why = peers.missing(APPS[app])
    if why:
        print(f"  {app:15} skipped: {why}", flush=True)
    return why is not None


def run_redis(args: argparse.Namespace, timeout: float, failures: list[str]) -> dict[str, Any]:
    """In-memory single worker against Redis with two workers, same load, at two rates:
    an event every 10 ms, which saturates a 2-core machine running two workers,
    redis-server and the load client, and every 50 ms, which leaves the cores idle
    between events so the latency is the path's, not the scheduler's queue."""
    if importlib.util.find_spec("fastapi_sse.backends.redis") is None:
        print("  redis     skipped: fastapi_sse.backends.redis is not available in this checkout", flush=True)
        return {}
    n = 20 if args.smoke else 1000
    intervals = [0.01] if args.smoke else [0.01, 0.05]
    redis = start_redis()
    out: dict[str, Any] = {"redis": {}}
    try:
        for repeat in range(args.repeats):
            for interval in intervals:
                size = f"{n}@{interval * 1000:.0f}ms"
                spec = {
                    "scenario": "fanout",
                    "clients": n,
                    "events": 10 if args.smoke else 100,
                    "interval": interval,
                    "singles": 1 if args.smoke else 3,
                    "size": 64,
                }
                for label, workers, env in (
                    (REDIS_BASELINE, 1, {}),
                    (
                        "redis-2-workers",
                        2,
                        {"SSE_BACKEND": "redis", "SSE_REDIS_URL": redis.url},
                    ),
                ):
                    what = f"redis     {size:>9} {label:15} run {repeat + 1}"
                    with server("ours", {**env_for("ours", {}, args.tune_gc), **env}, workers) as port:
                        spec_here = {
                            **spec,
                            "host": "127.0.0.1",
                            "port": port,
                            "workers": workers,
                            "deadline": timeout / 2,
                        }
                        result = measure(spec_here, timeout, what, failures)
                    if result is None:
                        continue
                    out["redis"].setdefault(size, {}).setdefault(label, []).append(result)
                    print(f"  {what}: {_brief(result)}", flush=True)
    finally:
        redis.proc.kill()
        redis.proc.wait(10)
    return out


def _brief(result: dict[str, Any]) -> str:
    keys = (
        "events_per_s",
        "one_broadcast_s",
        "latency_p99",
        "rss_per_conn",
        "cpu_fraction",
        "rss_growth",
        "publish_per_s",
        "floor_per_s",
        "baseline_per_s",
        "vs_floor",
        "vs_baseline",
        "lost",
        "publish_failures",
    )
    return " ".join(f"{k}={result[k]:.4g}" for k in keys if k in result)


COLUMNS = [
    ("events_per_s", "events/s", "{:,.0f}"),
    ("one_broadcast_s", "1 bcast ms", "ms"),
    ("latency_p50", "p50 ms", "ms"),
    ("latency_p99", "p99 ms", "ms"),
    ("latency_max", "max ms", "ms"),
    ("connect_per_s", "conn/s", "{:,.0f}"),
    ("rss_per_conn", "KB/conn", "kb"),
    ("objects_per_conn", "objs/conn", "{:.1f}"),
    ("gc_full_max", "full GC ms", "ms"),
    ("rss_growth", "RSS growth MB", "mb"),
    ("cpu_fraction", "CPU %", "pct"),
    ("cpu_us_per_ping", "us/ping", "{:.1f}"),
    ("publish_per_s", "publish/s", "{:,.0f}"),
    ("stored", "stored", "{:,.0f}"),
    ("delivered", "delivered", "{:,.0f}"),
    ("lost", "lost", "{:,.0f}"),
    ("publish_failures", "failures", "{:,.0f}"),
    ("floor_per_s", "floor/s", "{:,.0f}"),
    ("vs_floor", "x floor", "{:.2f}"),
    ("baseline_per_s", "1-by-1/s", "{:,.0f}"),
    ("vs_baseline", "x 1-by-1", "{:.1f}"),
    ("cpu_us_per_event", "CPU us/event", "{:.1f}"),
    ("heap_per_conn", "JS heap KB/conn", "kb"),
]


def _fmt(value: float, how: str) -> str:
    if how == "ms":
        return f"{value * 1000:.1f}"
    if how == "kb":
        return f"{value / 1024:.1f}"
    if how == "mb":
        return f"{value / 2**20:.1f}"
    if how == "pct":
        return f"{value * 100:.1f}"
    return how.format(value)


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians per (scenario, label, app), and each app's ratio to the straightforward one."""
    summary: dict[str, Any] = {}
    for scenario, labels in raw.items():
        for label, apps in labels.items():
            medians = {app: median_of(rows) for app, rows in apps.items()}
            entry: dict[str, Any] = {"median": medians, "runs": {app: len(rows) for app, rows in apps.items()}}
            # The Redis scenario compares against the in-memory single worker instead.
            base_app = BASELINE if BASELINE in medians else REDIS_BASELINE
            base = medians.get(base_app)
            if base:
                entry["baseline"] = base_app
                entry["ratio"] = {
                    app: {k: (v / base[k] if base.get(k) else None) for k, v in m.items()} for app, m in medians.items()
                }
            summary.setdefault(scenario, {})[label] = entry
    return summary


def table(summary: dict[str, Any]) -> str:
    lines = []
    for scenario, labels in summary.items():
        for label, entry in labels.items():
            medians = entry["median"]
            keys = [c for c in COLUMNS if any(c[0] in m for m in medians.values())]
            header = f"{'scenario':10} {'size':>9} {'app':16}" + "".join(f" {title:>13}" for _, title, _ in keys)
            if not lines or lines[-1] != header:
                lines += ["", header]
            for app, values in medians.items():
                cells = "".join(f" {_fmt(values[k], how) if k in values else '-':>13}" for k, _, how in keys)
                lines.append(f"{scenario:10} {label:>9} {app:16}{cells}")
    return "\n".join(lines)


def markdown(summary: dict[str, Any]) -> str:
    """The table of medians as Markdown, each app's ratio to the straightforward app
    in brackets (what docs/performance.md quotes)."""
    lines = []
    for scenario, labels in summary.items():
        for label, entry in labels.items():
            medians, ratios = entry["median"], entry.get("ratio", {})
            keys = [c for c in COLUMNS if any(c[0] in m for m in medians.values())]
            lines += ["", f"**{scenario} {label}**", ""]
            lines.append("| app | " + " | ".join(title for _, title, _ in keys) + " |")
            lines.append("|---|" + "---:|" * len(keys))
            for app, values in medians.items():
                cells = []
                for key, _, how in keys:
                    if key not in values:
                        cells.append("-")
                        continue
                    cell = _fmt(values[key], how)
                    ratio = ratios.get(app, {}).get(key)
                    if ratio is not None and app != entry.get("baseline"):
                        cell += f" ({ratio:.2f}x)"
                    cells.append(cell)
                lines.append(f"| {app} | " + " | ".join(cells) + " |")
    return "\n".join(lines).strip() + "\n"


def chart(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fanout = summary.get("fanout", {})
    if not fanout:
        return
    sizes = sorted(fanout, key=int)
    apps = sorted({app for entry in fanout.values() for app in entry["median"]}, key=list(APPS).index)
    panels = [
        ("events_per_s", "delivered events/s", 1),
        ("one_broadcast_s", "one broadcast to all (ms)", 1000),
        ("latency_p99", "p99 latency, burst (ms)", 1000),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    for axis, (key, title, scale) in zip(axes, panels, strict=True):
        for app in apps:
            xs = [int(s) for s in sizes if app in fanout[s]["median"]]
            ys = [fanout[s]["median"][app][key] * scale for s in sizes if app in fanout[s]["median"]]
            axis.plot(xs, ys, marker="o", label=app)
        axis.set_title(title)
        axis.set_xlabel("subscribers of one channel")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(loc="center right")
    figure.suptitle("Fan-out on one uvicorn worker (uvloop, httptools), 2 cores, medians")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    found = {"python": sys.version.split()[0]}
    for name in ("fastapi", "starlette", "sse-starlette", "uvicorn", "uvloop", "httptools", "pydantic-core"):
        found[name] = version(name)
    found.update(peers.versions())
    return found


def from_file(path: str) -> None:
    """Print the tables of a saved run again (``python -m bench.run --show FILE``)."""
    summary = json.loads(Path(path).read_text())["summary"]
    print(table(summary))
    print()
    print(markdown(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run: checks that everything still works")
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs of every measurement (default 3; 1 with --smoke)"
    )
    parser.add_argument("--sizes", default="", help="fan-out subscriber counts, comma-separated")
    parser.add_argument("--apps", default=",".join(APPS), help="apps to measure, comma-separated")
    parser.add_argument(
        "--scenarios",
        default="",
        help="only these scenarios (fanout,paced,users,single,idle,stalled,heartbeat,redis,redis_burst,redis_users)",
    )
    parser.add_argument(
        "--tune-gc", action=argparse.BooleanOptionalAction, default=True, help="fastapi_sse.tune_gc() in our app"
    )
    parser.add_argument(
        "--partial", default="", help="raw results written after each scenario (default: OUT/partial.json)"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory of the JSON results")
    parser.add_argument(
        "--chart",
        default="",
        help="PNG chart path (default: next to the JSON; the full run also writes docs/img/bench.png)",
    )
    parser.add_argument("--show", default="", help="print the tables of a saved JSON result and exit")
    args = parser.parse_args()
    if args.show:
        from_file(args.show)
        return
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 3
    started = time.time()
    print(f"benchmark: apps={args.apps} repeats={args.repeats}{' (smoke)' if args.smoke else ''}", flush=True)
    failures: list[str] = []
    raw = run(args, failures)
    summary = summarise(raw)
    print(table(summary))
    if failures:
        print("\nfailed runs (left out of the medians):\n" + "\n".join(f"  {f}" for f in failures))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {
        "versions": versions(),
        "cpus": os.cpu_count(),
        "smoke": args.smoke,
        "repeats": args.repeats,
        "seconds": time.time() - started,
        "summary": summary,
        "raw": raw,
        "failures": failures,
    }
    (out / f"bench-{stamp}.json").write_text(json.dumps(report, indent=1))
    (out / "latest.json").write_text(json.dumps(report, indent=1))
    failed = "".join(f"\n- failed, left out: {f.strip()}" for f in failures)
    (out / "latest.md").write_text(markdown(summary) + (f"\n{failed.strip()}\n" if failed else ""))
    charts = [Path(args.chart)] if args.chart else [out / "bench.png"]
    if not args.smoke and not args.chart and not args.sizes and not args.scenarios:
        charts.append(ROOT / "docs" / "img" / "bench.png")
    for path in charts:
        chart(summary, path)
    print(f"\nresults: {out / 'latest.json'}  chart: {', '.join(str(p) for p in charts)}")


if __name__ == "__main__":
    main()
