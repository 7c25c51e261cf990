"""Profile our app with py-spy during the per-user scenario (or the paced fan-out) and
say where each event's time goes.

``python -m bench.profile`` starts the app as the runner does (one uvicorn worker),
attaches ``py-spy record`` to it, runs the per-user load (each client on its own
``user:{k}`` channel, events to each in turn), and prints the server's CPU per event
split into stages by the frames py-spy sampled. ``--scenario paced`` profiles the
fan-out instead (``--users`` subscribers of one channel, ``--events`` broadcasts, each
published once the one before reached everyone); its figure is per delivery. The raw
stacks go to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.run import ROOT, env_for, server

STAGES = [
    # (stage, (path, function) of a frame; "" is any function of the file)
    ("write: uvicorn's send, transport.write", ("httptools_impl.py", "send")),
    ("write: Starlette's send wrappers", ("starlette/", "")),
    ("deliver: writer task (take the buffer, call send)", ("_writer.py", "")),
    ("deliver: the client's buffer (push)", ("fastapi_sse/client.py", "")),
    ("frame: id line (wire.frame)", ("wire.py", "frame")),
    ("deliver: fan-out to the channel's clients", ("_delivery.py", "deliver")),
    ("publish: memory backend (history, ids)", ("backends/memory.py", "")),
    ("publish: publisher dispatch", ("_publishing.py", "")),
    ("publish: service (running check)", ("service.py", "_publish_nowait")),
    ("publish: service (running check)", ("service.py", "_require_running")),
    ("encode: event and data lines (frame_payload)", ("wire.py", "frame_payload")),
    ("encode: data as text", ("wire.py", "encode_data")),
    ("validate: event name and id", ("wire.py", "")),
    ("validate: event size", ("_admission.py", "encode")),
    ("validate: channel name", ("_admission.py", "check_channel")),
    ("validate: client known (send_to)", ("_cluster.py", "reachable")),
    ("validate: client known (send_to)", ("_cluster.py", "to_client")),
    ("validate: event and channel", ("_admission.py", "event")),
    ("publish: broadcast / send_to", ("service.py", "broadcast")),
    ("publish: broadcast / send_to", ("service.py", "send_to")),
    ("bench app: payload, json.dumps, finding the service", ("bench/apps/", "")),
    ("bench app: payload, json.dumps, finding the service", ("fastapi_sse/dependencies.py", "")),
    ("bench app: payload, json.dumps, finding the service", ("json/", "")),
    ("heartbeat", ("service.py", "_heartbeat")),
]


def stage_of(stack: str) -> str:
    """The stage of one sampled stack: that of its innermost frame a stage names
    (py-spy's frames read ``Class.function (path:line)``, outermost first)."""
    for frame in reversed(stack.split(";")):
        name, _, where = frame.partition(" (")
        name = name.rsplit(".", 1)[-1]
        for stage, (path, function) in STAGES:
            if path in where and (not function or name == function):
                return stage
    return "event loop (uvloop, the task switches)"


REQUEST = "run_asgi ("
"""A frame of an HTTP request's handling: the load's /stats and /publish_users, not per event."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", default="ours")
    parser.add_argument("--scenario", choices=("users", "paced"), default="users")
    parser.add_argument("--users", type=int, default=None, help="clients (default 5,000; 10,000 paced)")
    parser.add_argument("--events", type=int, default=None, help="events (default 200,000; 200 broadcasts paced)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paced = args.scenario == "paced"
    args.users = args.users or (10_000 if paced else 5000)
    args.events = args.events or (200 if paced else 200_000)
    raw = out / f"profile-{args.app}-{args.scenario}.txt"
    spec: dict[str, object] = {"scenario": args.scenario, "clients": args.users, "events": args.events, "size": 64}
    if not paced:
        spec["interval"] = 0.0
    with server(args.app, env_for(args.app, {"HEARTBEAT": "15"}, tune_gc=True)) as port:
        stats = f"http://127.0.0.1:{port}/stats"
        pid = httpx.get(stats).json()["pid"]
        load = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen", json.dumps({**spec, "host": "127.0.0.1", "port": port})],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            text=True,
        )
        # Sample from the moment every stream is open: the connects are not the events' cost.
        while httpx.get(stats).json()["clients"] < args.users:
            if load.poll() is not None:
                raise SystemExit("the load client ended before every stream was open")
            time.sleep(0.05)
        command = [spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--format", "raw", "-o", str(raw)]
        spying = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        output, _ = load.communicate(timeout=600)
        spying.send_signal(signal.SIGINT)
        spying.wait(60)
    result = json.loads(output.strip().splitlines()[-1])
    counts: Counter[str] = Counter()
    requests = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if REQUEST in stack:
            requests += int(count)
        else:
            counts[stage_of(stack)] += int(count)
    total = sum(counts.values())
    per_event = result["cpu_us_per_event"]
    print(json.dumps(result))
    what = f"{args.users} subscribers, {args.events} broadcasts" if paced else f"{args.users} users"
    unit = "delivery" if paced else "event"
    if not paced:
        what += f", {args.events} events"
    print(f"\n{args.app}, {what}: {per_event:.1f} us of server CPU per {unit}")
    print(f"{total} samples of the events' work ({requests} more in the load's HTTP requests, left out):\n")
    for stage, count in counts.most_common():
        share = count / total
        print(f"  {stage:55} {100 * share:5.1f} %  {share * per_event:6.1f} us")
    print(f"\nraw stacks: {raw} (a flame graph: py-spy record --format flamegraph)")


if __name__ == "__main__":
    main()
