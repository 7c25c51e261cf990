"""The benchmark still runs: ``python -m bench.run --smoke`` with tiny sizes.

Nothing here judges speed (that is what ``make bench`` and docs/performance.md are
for): each run only has to complete and report a row for every app it measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers.paths import ROOT

from bench.peers import servers
from bench.run import APPS as ALL_APPS


def available(scenario: str) -> set[str]:
    """The apps the smoke run measures in ``scenario`` on this machine (a peer whose
    server is not installed, Node for instance, is skipped)."""
    return {
        app
        for app, target in ALL_APPS.items()
        if servers.applies(app, scenario, smoke=True) and not servers.missing(target)
    }


def run_bench(out: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(out), "--chart", str(out / "bench.png"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def rows(stdout: str) -> set[tuple[str, str, str]]:
    """(scenario, size, app) of every line of the final table."""
    found = set()
    for line in stdout.splitlines():
        cells = line.split()
        if len(cells) > 3 and not line.startswith(" ") and cells[0] != "scenario":
            found.add((cells[0], cells[1], cells[2]))
    return found


def test_fanout_and_single_client_report_every_app(tmp_path: Path) -> None:
    stdout = run_bench(tmp_path, "--scenarios", "fanout,single,paced", "--sizes", "20")
    table = rows(stdout)
    assert {"ours", "straightforward", "builtin"} == available("fanout")
    assert {"ours", "straightforward", "ours-middleware", "floor"} <= available("paced")
    for scenario, size in (("fanout", "20"), ("single", "1"), ("paced", "20")):
        for app in available(scenario):
            assert (scenario, size, app) in table
    report = json.loads((tmp_path / "latest.json").read_text())
    medians = report["summary"]["fanout"]["20"]["median"]
    assert set(medians) == available("fanout")
    assert all(m["events_per_s"] > 0 for m in medians.values())
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")


def test_every_other_scenario_completes(tmp_path: Path) -> None:
    wanted = "users,idle,stalled,heartbeat,redis,redis_burst,redis_users"
    stdout = run_bench(tmp_path, "--apps", "ours", "--scenarios", wanted)
    scenarios = {scenario for scenario, _, _ in rows(stdout)}
    expected = {"users", "idle", "stalled", "heartbeat"}
    try:
        import fastapi_sse.backends.redis  # noqa: F401
    except ImportError:
        assert "redis     skipped" in stdout
    else:
        expected |= {"redis", "redis_burst", "redis_users"}
    assert expected <= scenarios
    report = json.loads((tmp_path / "latest.json").read_text())
    assert report["summary"]["stalled"]["20+2"]["median"]["ours"]["stalled"] == 2
    burst = report["summary"].get("redis_burst", {}).get("20x200", {}).get("median", {}).get("ours")
    if burst is not None:
        assert burst["lost"] == 0 and burst["publish_failures"] == 0 and burst["stored"] == 200
    per_user = report["summary"].get("redis_users", {}).get("20x40", {}).get("median", {})
    for name in per_user:
        assert per_user[name]["lost"] == 0 and per_user[name]["delivered"] == 40


def test_the_runs_benchmark_runs_and_reports_every_figure() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.runs", "--viewers", "5", "--tokens", "20", "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    medians = json.loads(done.stdout.splitlines()[-1])["medians"]
    assert set(medians) == {"run", "channel", "resume_s", "cancel_s"}
    assert all(value > 0 for value in medians.values())


STORM_SMOKE = ("--streams", "20", "--drain-window", "0.2", "--retry", "0.2", "--repeats", "1")


def test_the_reconnect_storm_benchmark_runs_and_moves_every_stream() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.storm", *STORM_SMOKE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    for medians in (result["medians"], result["baseline"]):
        assert medians["moved"] == 10 and medians["not_exactly_once"] == 0


CLUSTER_SMOKE = (
    *("--rounds", "1", "--subscribers", "20", "--broadcasts", "3", "--channels", "12", "--per-channel", "2"),
    *("--burst", "3", "--publishes", "20", "--resumes", "2", "--missed", "10", "--deadline", "30"),
)


def test_the_cluster_benchmark_runs_and_prints_every_figure(tmp_path: Path) -> None:
    from bench.cluster import FIGURES, MODES

    done = subprocess.run(
        [sys.executable, "-m", "bench.cluster", *CLUSTER_SMOKE, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    report = json.loads(lines[-1])
    assert report["failures"] == []
    for key, label, _ in FIGURES:
        # A row per figure: both set-ups and their ratio, none left blank.
        row = next(line for line in lines if line.startswith(label))
        assert " - " not in f"{row} " and row.rstrip().endswith(")"), row
        assert all(key in report["medians"][mode] for mode in MODES) and key in report["ratio"]
    for per in ("publish", "resume"):
        for name in MODES.values():
            assert any(line.strip().startswith(f"per {per}, {name}: ") and "evalsha" in line for line in lines)
    assert all(found[mode]["channels_lost"] == 0 for found in report["rounds"] for mode in MODES)
    assert (tmp_path / "cluster-latest.json").exists()
