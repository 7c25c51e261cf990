"""A real Redis Cluster of private redis-server processes on loopback ports.

Every node is its own process with its own data directory and cluster config file.
The cluster is created with ``redis-cli --cluster create``; every step that changes
it (start, failover, restart, slot migration) returns once every live node reports
``cluster_state:ok``, all of them agree on the slot map and the roles, and every
replica's link to its master is up."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis
import redis.client
import redis.cluster

from .servers import free_port, wait_for_port

T = TypeVar("T")

SLOTS = 16384
# Generous: on a loaded two-core machine a node can take seconds to start or sync.
DEADLINE = 30.0
# A node is failing after this long without answering, so a failover takes a couple of seconds.
NODE_TIMEOUT_MS = 1000

# (first slot, last slot, master id, replica ids): what CLUSTER SLOTS says, in order.
SlotRange = tuple[int, int, str, tuple[str, ...]]


class NotYet(Exception):
    """A condition the cluster does not meet yet; the message says which node and what."""


@dataclass(eq=False)
class ClusterNode:
    """One redis-server of the cluster. ``role`` and ``master_id`` are as the cluster last
    reported them (the harness refreshes them after every change it waits for)."""

    port: int
    bus_port: int
    dir: str
    proc: subprocess.Popen[bytes]
    node_id: str = ""
    role: str = "master"  # "master" or "replica"
    master_id: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def log(self) -> Path:
        return Path(self.dir) / "redis.log"

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the node's log and of what it wrote before opening it."""
        tail: list[str] = []
        for path in (Path(self.dir) / "console.log", self.log):
            if path.exists():
                tail += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(tail) or "(no log)"

    def __repr__(self) -> str:
        node_id = f" {self.node_id[:8]}" if self.node_id else ""
        state = "" if self.alive else ", dead"
        return f"<node 127.0.0.1:{self.port} {self.role}{node_id}{state}>"


@dataclass
class _View:
    """One node's CLUSTER NODES line about another node."""

    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: str  # the line's slot fields, as written


@dataclass
class _Killed:
    """What a node was just before it was killed."""

    slots: list[tuple[int, int]]
    replica_ids: set[str]


def command(client: redis.Redis, *args: Any) -> Any:
    """``client.execute_command(*args)``: a command by name, the reply as redis-py parses it."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _poll(what: str, check: Callable[[], T], timeout: float) -> T:
    """Call ``check`` until it returns instead of raising :class:`NotYet` (or a Redis or
    socket error); fail after ``timeout`` seconds naming the last reason it gave."""
    end = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (NotYet, redis.RedisError, OSError) as error:
            reason = str(error) if isinstance(error, NotYet) else _reason(error)
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not reached after {timeout:g}s; last: {reason}")
        time.sleep(0.05)


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (client ports and cluster bus ports)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _parse_nodes(text: str) -> tuple[str, dict[str, _View]]:
    """CLUSTER NODES: the answering node's own id and its view of every node by id."""
    myself = ""
    views: dict[str, _View] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        node_id, address, flags = fields[0], fields[1], frozenset(fields[2].split(","))
        port = int(address.split("@")[0].rsplit(":", 1)[1] or 0)
        if "myself" in flags:
            myself = node_id
        master = fields[3] if fields[3] != "-" else None
        views[node_id] = _View(port, flags - {"myself"}, master, " ".join(fields[8:]))
    return myself, views


def _parse_slots(reply: Any) -> tuple[SlotRange, ...]:
    """CLUSTER SLOTS as sorted (first, last, master id, sorted replica ids)."""
    ranges: list[SlotRange] = []
    for entry in reply:
        first, last, master, *replicas = entry
        ranges.append((int(first), int(last), str(master[2]), tuple(sorted(str(r[2]) for r in replicas))))
    return tuple(sorted(ranges))


def _owner(slot_map: tuple[SlotRange, ...], slot: int) -> str | None:
    for first, last, master, _ in slot_map:
        if first <= slot <= last:
            return master
    return None


class RedisCluster:
    """``masters`` shards of one master and ``replicas`` replicas each, every node a
    redis-server of its own on a free 127.0.0.1 port. ``options`` are extra redis-server
    command-line arguments for every node (``"--client-output-buffer-limit", "pubsub 64kb 32kb 1"``).

    Use :func:`start_cluster`, or call :meth:`start` and :meth:`stop` yourself."""

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        *options: str,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
        timeout: float = DEADLINE,
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        if replicas < 0:
            raise ValueError("replicas must be 0 or more")
        self.master_count = masters
        self.replica_count = replicas
        self.options = options
        self.node_timeout_ms = node_timeout_ms
        self.timeout = timeout
        self._nodes: list[ClusterNode] = []
        self._admins: dict[ClusterNode, redis.Redis] = {}
        self._handed_out: list[redis.Redis | redis.cluster.RedisCluster | redis.client.PubSub] = []
        self._killed: dict[ClusterNode, _Killed] = {}
        self._config: dict[str, str] = {}

    # -- what the tests read ------------------------------------------------------------

    @property
    def nodes(self) -> list[ClusterNode]:
        """Every node, killed ones included, in the order they were started."""
        return list(self._nodes)

    @property
    def urls(self) -> list[str]:
        """``redis://127.0.0.1:PORT`` of every live node."""
        return [node.url for node in self._nodes if node.alive]

    @property
    def seed_url(self) -> str:
        """The URL of a live master (the first one started that still is one): where a
        cluster client starts to discover the cluster."""
        for node in self._nodes:
            if node.alive and node.role == "master":
                return node.url
        raise RuntimeError("no live master in the cluster")

    def masters(self) -> list[ClusterNode]:
        """The live masters, in the order of the first slot each serves."""
        slot_map = self._refresh()
        first: dict[str, int] = {}
        for start, _, master, _ in slot_map:
            first.setdefault(master, start)
        live = [n for n in self._nodes if n.alive and n.role == "master"]
        return sorted(live, key=lambda n: first.get(n.node_id, SLOTS))

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        """The live replicas of ``master``."""
        self._refresh()
        return [n for n in self._nodes if n.alive and n.role == "replica" and n.master_id == master.node_id]

    def keyslot(self, key: str | bytes) -> int:
        """The hash slot of ``key``, as the cluster computes it (CLUSTER KEYSLOT)."""
        return int(command(self._admin(self._live()[0]), "CLUSTER", "KEYSLOT", key))

    def master_for_slot(self, slot: int) -> ClusterNode:
        """The master serving ``slot``."""
        owner = _owner(self._refresh(), slot)
        if owner is None:
            raise LookupError(f"no master serves slot {slot}")
        return self._by_id(owner)

    def master_for_key(self, key: str | bytes) -> ClusterNode:
        """The master serving the slot of ``key``."""
        return self.master_for_slot(self.keyslot(key))

    def client_for(self, node: ClusterNode, **kwargs: Any) -> redis.Redis:
        """A plain client of ``node`` (closed by :meth:`stop` if not closed before);
        ``kwargs`` go to ``redis.Redis``."""
        client = redis.Redis(host="127.0.0.1", port=node.port, **kwargs)
        self._handed_out.append(client)
        return client

    def pubsub_for(self, node: ClusterNode, **kwargs: Any) -> redis.client.PubSub:
        """A pub/sub connection to ``node`` (closed by :meth:`stop` if not closed before);
        ``kwargs`` go to ``redis.Redis``."""
        pubsub: redis.client.PubSub = self.client_for(node, **kwargs).pubsub()  # type: ignore[no-untyped-call]
        self._handed_out.append(pubsub)
        return pubsub

    def cluster_client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A cluster client discovering the cluster from a live master (closed by :meth:`stop`
        if not closed before); ``kwargs`` go to ``redis.cluster.RedisCluster``."""
        master = next(n for n in self._nodes if n.alive and n.role == "master")
        client = redis.cluster.RedisCluster(host="127.0.0.1", port=master.port, **kwargs)
        self._handed_out.append(client)
        return client

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> RedisCluster:
        """Start every node, create the cluster and wait until it is settled."""
        for exe in ("redis-server", "redis-cli"):
            if shutil.which(exe) is None:
                raise RuntimeError(
                    f"{exe} is not installed: run 'make system-deps' "
                    "(apt-get install redis-server, which brings redis-cli with redis-tools)"
                )
        count = self.master_count * (1 + self.replica_count)
        try:
            ports = _free_ports(2 * count)
            for port, bus_port in zip(ports[:count], ports[count:], strict=True):
                node_dir = tempfile.mkdtemp(prefix="sse-redis-cluster-")
                self._nodes.append(ClusterNode(port, bus_port, node_dir, self._launch(port, bus_port, node_dir)))
            for node in self._nodes:
                self._wait_listening(node)
                node.node_id = str(command(self._admin(node), "CLUSTER", "MYID"))
            self._create()
            self.wait_settled()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every node, close every client handed out and remove the data directories."""
        for client in self._handed_out:
            client.close()
        self._handed_out.clear()
        for admin in self._admins.values():
            admin.close()
        self._admins.clear()
        for node in self._nodes:
            if node.alive:
                node.proc.kill()
            node.proc.wait(10)
        for node in self._nodes:
            shutil.rmtree(node.dir, ignore_errors=True)
        self._nodes.clear()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _launch(self, port: int, bus_port: int, node_dir: str) -> subprocess.Popen[bytes]:
        exe = shutil.which("redis-server") or "redis-server"
        args = [
            exe,
            "--port", str(port),
            "--cluster-port", str(bus_port),
            "--bind", "127.0.0.1",
            "--dir", node_dir,
            "--logfile", "redis.log",
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--save", "",
            "--appendonly", "no",
            # A replica's first sync starts at once, not after the default 5 s wait for more replicas.
            "--repl-diskless-sync-delay", "0",
            *self.options,
        ]  # fmt: skip
        for name, value in self._config.items():
            args += [f"--{name}", value]
        # Until the log file is open (a bad option, a port in use), redis-server writes to stderr.
        with open(Path(node_dir) / "console.log", "ab") as console:
            return subprocess.Popen(args, cwd=node_dir, stdout=console, stderr=console)

    def _wait_listening(self, node: ClusterNode) -> None:
        try:
            wait_for_port(node.port, deadline=self.timeout, proc=node.proc)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{node} did not start: {error}\n{node.log_tail()}") from None

    def _create(self) -> None:
        command = [
            shutil.which("redis-cli") or "redis-cli",
            "--cluster",
            "create",
            *(f"127.0.0.1:{node.port}" for node in self._nodes),
            "--cluster-replicas",
            str(self.replica_count),
            "--cluster-yes",
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=2 * self.timeout, check=False)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"redis-cli --cluster create did not finish in {error.timeout:g}s") from None
        if done.returncode != 0:
            output = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
            raise RuntimeError(f"redis-cli --cluster create failed ({done.returncode}):\n{output}")

    # -- faults -------------------------------------------------------------------------

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL the node's process (no shutdown, no goodbye to its clients or peers)."""
        if not node.alive:
            raise ValueError(f"{node} is not running")
        slot_map = self._refresh()
        self._killed[node] = _Killed(
            slots=[(first, last) for first, last, master, _ in slot_map if master == node.node_id],
            replica_ids={n.node_id for n in self._nodes if n.alive and n.master_id == node.node_id},
        )
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        admin = self._admins.pop(node, None)
        if admin is not None:
            admin.close()

    def wait_failover(self, killed_master: ClusterNode, timeout: float | None = None) -> ClusterNode:
        """Wait until one of the killed master's replicas serves all its slots and the
        cluster is settled again (every live node ``ok``, agreeing, the dead one ``fail``
        everywhere); return the promoted replica."""
        before = self._killed.get(killed_master)
        if before is None or killed_master.alive:
            raise ValueError(f"{killed_master} was not killed with kill()")
        if not before.slots or not before.replica_ids:
            raise ValueError(f"{killed_master} served no slots or had no replica: nothing fails over")

        def promoted() -> ClusterNode:
            slot_map = self._settled()
            owners = {_owner(slot_map, first) for first, _ in before.slots}
            owners |= {_owner(slot_map, last) for _, last in before.slots}
            if len(owners) != 1 or not owners <= before.replica_ids:
                raise NotYet(f"the slots of {killed_master} are served by {owners}, not by one of its replicas")
            return self._by_id(str(owners.pop()))

        return _poll(f"failover of {killed_master}", promoted, timeout or self.timeout)

    def restart(self, node: ClusterNode, timeout: float | None = None) -> ClusterNode:
        """Start a killed node again on its port and directory (its data is gone: nothing is
        saved) and wait until it has rejoined and the cluster is settled. A master that failed
        over comes back as a replica of the one that replaced it."""
        if node.alive:
            raise ValueError(f"{node} is running")
        node.proc = self._launch(node.port, node.bus_port, node.dir)
        self._wait_listening(node)
        self._killed.pop(node, None)
        self.wait_settled(timeout)
        return node

    # -- changes ------------------------------------------------------------------------

    def migrate_slot(self, slot: int, target_master: ClusterNode, batch: int = 100) -> int:
        """Move ``slot`` and its keys to ``target_master`` live, the way ``redis-cli --cluster
        reshard`` does; return how many keys moved, once every node agrees on the new owner."""
        source = self.master_for_slot(slot)
        if target_master.role != "master" or not target_master.alive:
            raise ValueError(f"{target_master} is not a live master")
        if source is target_master:
            return 0
        target_admin, source_admin = self._admin(target_master), self._admin(source)
        command(target_admin, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        command(source_admin, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_master.node_id)
        moved = 0
        with redis.Redis(host="127.0.0.1", port=source.port, socket_timeout=self.timeout) as keys_client:
            while keys := command(keys_client, "CLUSTER", "GETKEYSINSLOT", slot, batch):
                command(
                    keys_client,
                    "MIGRATE",
                    "127.0.0.1",
                    target_master.port,
                    "",
                    0,
                    int(self.timeout * 1000),
                    "KEYS",
                    *keys,
                )
                moved += len(keys)
        # The new owner first, then the old one, then everybody else (as the cluster spec says).
        others = [n for n in self._nodes if n.alive and n.role == "master" and n not in (source, target_master)]
        for node in [target_master, source, *others]:
            command(self._admin(node), "CLUSTER", "SETSLOT", slot, "NODE", target_master.node_id)

        def moved_everywhere() -> None:
            owner = _owner(self._settled(), slot)
            if owner != target_master.node_id:
                raise NotYet(f"slot {slot} is served by {owner}, not {target_master}")

        _poll(f"migration of slot {slot} to {target_master}", moved_everywhere, self.timeout)
        return moved

    def config_set(self, name: str, value: str) -> None:
        """CONFIG SET on every live node (and on nodes restarted later)."""
        for node in self._live():
            self._admin(node).config_set(name, value)
        self._config[name] = value

    def command_stats(self, include_replicas: bool = False) -> dict[str, int]:
        """Calls per command (``"spublish"``, ``"evalsha"``, ``"cluster|slots"``) summed over
        the live masters (INFO commandstats); the harness's own commands are counted too."""
        totals: dict[str, int] = {}
        for node in self._live():
            if node.role == "master" or include_replicas:
                stats: dict[str, Any] = self._admin(node).info("commandstats")
                for name, values in stats.items():
                    command = name.removeprefix("cmdstat_")
                    totals[command] = totals.get(command, 0) + int(values["calls"])
        return totals

    def reset_stats(self) -> None:
        """CONFIG RESETSTAT on every live node."""
        for node in self._live():
            self._admin(node).config_resetstat()

    # -- waiting ------------------------------------------------------------------------

    def wait_settled(self, timeout: float | None = None) -> None:
        """Wait until every live node reports ``cluster_state:ok``, knows every node, sees the
        live ones healthy and the dead ones ``fail``, all agree on the slot map and the roles,
        no slot is migrating, and every live replica's link to its master is up."""
        _poll("a settled cluster", self._settled, timeout or self.timeout)

    def _settled(self) -> tuple[SlotRange, ...]:
        """The agreed slot map, or :class:`NotYet` naming the first node and condition that fails."""
        live = self._live()
        dead = {n.node_id for n in self._nodes if not n.alive}
        agreed: tuple[SlotRange, ...] | None = None
        agreed_roles: dict[str, str | None] | None = None
        for node in live:
            admin = self._admin(node)
            info = str(command(admin, "CLUSTER", "INFO"))
            fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
            if fields.get("cluster_state") != "ok":
                raise NotYet(f"{node} reports cluster_state:{fields.get('cluster_state')}")
            myself, views = _parse_nodes(str(command(admin, "CLUSTER", "NODES")))
            if myself != node.node_id:
                raise NotYet(f"{node} says its id is {myself}")
            missing = {n.node_id for n in self._nodes} - views.keys()
            if missing:
                raise NotYet(f"{node} does not know {sorted(missing)}")
            for other_id, view in views.items():
                if other_id in dead:
                    if "fail" not in view.flags:
                        raise NotYet(f"{node} sees dead {self._by_id(other_id)} as {','.join(sorted(view.flags))}")
                elif view.flags & {"fail", "fail?", "handshake", "noaddr"}:
                    raise NotYet(f"{node} sees {self._by_id(other_id)} as {','.join(sorted(view.flags))}")
            if "[" in views[myself].slots:
                raise NotYet(f"{node} has a slot migrating or importing: {views[myself].slots}")
            roles = {i: v.master_id for i, v in views.items() if i not in dead}
            slot_map = _parse_slots(command(admin, "CLUSTER", "SLOTS"))
            if agreed is None or agreed_roles is None:
                agreed, agreed_roles = slot_map, roles
            elif slot_map != agreed:
                raise NotYet(f"{node} and {live[0]} disagree on the slot map: {slot_map} != {agreed}")
            elif roles != agreed_roles:
                raise NotYet(f"{node} and {live[0]} disagree on the roles: {roles} != {agreed_roles}")
            if views[myself].master_id is not None:
                replication: dict[str, Any] = admin.info("replication")
                if replication.get("master_link_status") != "up" or replication.get("master_sync_in_progress"):
                    raise NotYet(f"replica {node}'s link to its master is {replication.get('master_link_status')}")
        if agreed is None or agreed_roles is None:
            raise NotYet("no node is running")
        served = sum(last - first + 1 for first, last, _, _ in agreed)
        if served != SLOTS:
            raise NotYet(f"only {served} of {SLOTS} slots are served")
        for node in self._nodes:
            if node.node_id in agreed_roles:
                node.master_id = agreed_roles[node.node_id]
                node.role = "master" if node.master_id is None else "replica"
        return agreed

    def _refresh(self) -> tuple[SlotRange, ...]:
        """The slot map and roles as the first live node that answers sees them, now."""
        errors: list[str] = []
        for node in self._live():
            try:
                admin = self._admin(node)
                _, views = _parse_nodes(str(command(admin, "CLUSTER", "NODES")))
                slot_map = _parse_slots(command(admin, "CLUSTER", "SLOTS"))
            except (redis.RedisError, OSError) as error:
                errors.append(f"{node}: {_reason(error)}")
                continue
            for known in self._nodes:
                view = views.get(known.node_id)
                if view is not None and known.alive:
                    known.master_id = view.master_id
                    known.role = "master" if view.master_id is None else "replica"
            return slot_map
        raise RuntimeError(f"no live node answers: {errors}")

    def _live(self) -> list[ClusterNode]:
        live = [node for node in self._nodes if node.alive]
        if not live:
            raise RuntimeError("no node of the cluster is running")
        return live

    def _by_id(self, node_id: str) -> ClusterNode:
        for node in self._nodes:
            if node.node_id == node_id:
                return node
        raise LookupError(f"no node has id {node_id}")

    def _admin(self, node: ClusterNode) -> redis.Redis:
        admin = self._admins.get(node)
        if admin is None:
            admin = redis.Redis(
                host="127.0.0.1", port=node.port, decode_responses=True, socket_timeout=5, socket_connect_timeout=5
            )
            self._admins[node] = admin
        return admin


@contextmanager
def start_cluster(masters: int = 3, replicas: int = 1, *options: str, **settings: Any) -> Iterator[RedisCluster]:
    """A started :class:`RedisCluster`, stopped on exit; ``settings`` are its keyword arguments
    (``node_timeout_ms``, ``timeout``)."""
    cluster = RedisCluster(masters, replicas, *options, **settings).start()
    try:
        yield cluster
    finally:
        cluster.stop()
