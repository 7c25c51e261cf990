"""Profile our app with py-spy during the per-user scenario and say where each event's
time goes.

``python -m bench.profile`` starts the app as the runner does (one uvicorn worker),
attaches ``py-spy record`` to it, runs the per-user load (each client on its own
``user:{k}`` channel, events to each in turn), and prints the server's CPU per event
split into stages by the frames py-spy sampled. The flame graph and the raw stacks go
to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.run import ROOT, env_for, load, server

STAGES = [
    # (stage, (file, function) of a frame that puts a sample in it); the first that matches wins.
    ("write: uvicorn's send (transport.write)", ("httptools_impl.py", "send")),
    ("write: Starlette's send wrappers", ("starlette/", "")),
    ("deliver: writer task, buffer take", ("writer.py", "")),
    ("deliver: the client's buffer (push)", ("client.py", "push")),
    ("frame: id line and Frame", ("wire.py", "frame")),
    ("deliver: fan-out to the channel's clients", ("service.py", "_deliver")),
    ("publish: backend (history, ids)", ("memory.py", "publish_nowait")),
    ("publish: publisher dispatch", ("publishing.py", "")),
    ("encode: event and data lines", ("wire.py", "frame_payload")),
    ("encode: data as text", ("wire.py", "encode_data")),
    ("validate: event name, id, size", ("service.py", "_encode")),
    ("validate: channel name", ("service.py", "check_channel")),
    ("publish: broadcast / send_to", ("service.py", "broadcast")),
    ("publish: broadcast / send_to", ("service.py", "send_to")),
    ("bench app: payload, json.dumps, user lookup", ("common.py", "")),
    ("bench app: payload, json.dumps, user lookup", ("ours.py", "")),
    ("heartbeat", ("service.py", "_heartbeat")),
]


def stage_of(stack: str) -> str:
    """The stage of one sampled stack (py-spy's ``function (file:line)`` frames)."""
    frames = stack.split(";")
    for stage, (path, function) in STAGES:
        for frame in frames:
            if path in frame and (not function or frame.startswith(f"{function} (")):
                return stage
    return "other: event loop, the load's HTTP requests, GC"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", default="ours")
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"profile-{args.app}-users.txt"
    spec = {"scenario": "users", "clients": args.users, "events": args.events, "interval": 0.0, "size": 64}
    with server(args.app, env_for(args.app, {"HEARTBEAT": "15"}, tune_gc=True)) as port:
        pid = httpx.get(f"http://127.0.0.1:{port}/stats").json()["pid"]
        command = [spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--format", "raw", "-o", str(raw)]
        spying = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # py-spy attaches
        result = load({**spec, "host": "127.0.0.1", "port": port, "deadline": 300}, 600)
        spying.send_signal(signal.SIGINT)
        spying.wait(60)
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[stage_of(stack)] += int(count)
    total = sum(counts.values())
    per_event = result["cpu_us_per_event"]
    print(json.dumps(result))
    print(f"\n{args.app}, {args.users} users, {args.events} events: {per_event:.1f} us of server CPU per event")
    print(f"{total} samples (py-spy counts the thread's active samples only); each stage's share of them:\n")
    for stage, count in counts.most_common():
        share = count / total
        print(f"  {stage:50} {100 * share:5.1f} %  {share * per_event:6.1f} us")
    print(f"\nraw stacks: {raw} (a flame graph: py-spy record --format flamegraph)")


if __name__ == "__main__":
    main()
