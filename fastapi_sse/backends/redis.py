"""The Redis backend: many workers on many hosts share channels, ids and history.

One ``INCR`` counter numbers every event, so ids increase across channels and
workers. Storing an event in its channel's history and announcing it with
``PUBLISH`` happen in one Lua script, so a client resuming on any worker never sees
live an event that history lacks, or the reverse. Each worker holds one
subscription connection (a ``PUBLISH`` per channel reaches only the workers whose
clients listen to it) and publishes through a connection pool.

When the subscription connection is lost, the worker reconnects with backoff,
subscribes again, and reads from history what its channels missed before it lets
live messages through again; what history lost is reported to the service, which
closes those channels' clients so that they resume and receive the ``gap`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import uuid
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, NoScriptError, RedisError, ResponseError
from redis.retry import Retry as BlockingRetry

from fastapi_sse._names import CLIENT_CHANNEL_PREFIX, worker_of
from fastapi_sse.backends.base import Backend, Coordination, Message, Publication, Replay, Sink
from fastapi_sse.errors import BackendError

if TYPE_CHECKING:
    from fastapi_sse.settings import SSESettings

logger = logging.getLogger("fastapi_sse.redis")

MIN_REDIS_VERSION = (5, 0)
"""Oldest Redis this backend runs on (``ZPOPMIN``, effect replication of scripts)."""

# Channels whose last stored event is older than the TTL have lost their whole
# history (the key expired). Record the newest such seq as the floor below which a
# cursor may have missed events on a channel we no longer know.
_SWEEP = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function sweep(k_live, k_last, k_trim, k_floor, k_dead, cutoff, now)
  -- Channels whose history expired whole keep their trim mark (their last seq)
  -- for one more TTL, so one starting afresh still reports what it lost.
  local dead = redis.call('ZRANGEBYSCORE', k_dead, '-inf', cutoff, 'LIMIT', 0, 256)
  if #dead > 0 then
    redis.call('ZREM', k_dead, unpack(dead))
    redis.call('HDEL', k_trim, unpack(dead))
  end
  local old = redis.call('ZRANGEBYSCORE', k_live, '-inf', cutoff, 'LIMIT', 0, 256)
  if #old == 0 then return end
  local floor = tonumber(redis.call('GET', k_floor) or '0')
  for _, c in ipairs(old) do
    local last = redis.call('HGET', k_last, c) or '0'
    if tonumber(last) > floor then floor = tonumber(last) end
    redis.call('HSET', k_trim, c, last)
    redis.call('ZADD', k_dead, now, c)
  end
  redis.call('SET', k_floor, string.format('%d', floor))
  redis.call('ZREM', k_live, unpack(old))
  redis.call('HDEL', k_last, unpack(old))
end
local function expire_entries(k_hist, k_trim, channel, cutoff)
  while true do
    local first = redis.call('ZRANGE', k_hist, 0, 0, 'WITHSCORES')
    if #first == 0 then return end
    local ts = tonumber(string.match(first[1], '^%d+:(%d+):'))
    if ts > cutoff then return end
    redis.call('ZREMRANGEBYRANK', k_hist, 0, 0)
    redis.call('HSET', k_trim, channel, first[2])
  end
end
"""

# A counter that is missing (a new Redis, or one that restarted without its data)
# starts at the server's time in microseconds, so ids keep increasing past any
# cursor a client still holds; everything before that start counts as forgotten.
# KEYS: seq, floor
_START = """
local function start_counter(k_seq, k_floor)
  if redis.call('EXISTS', k_seq) == 0 then
    local t = redis.call('TIME')
    local start = string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))
    redis.call('SET', k_seq, start)
    redis.call('SET', k_floor, start)
  end
end
"""

_INIT = (
    _START
    + """
start_counter(KEYS[1], KEYS[2])
return redis.call('GET', KEYS[1])
"""
)

# The id index is a hash of fields "<channel>\n<id>" (ids hold no LF) whose value is
# the seq, or 'r' once the id was published twice on that channel; the id times
# sorted set scores each field by its last use, to expire it and cap the index.
# ``count`` is the size of the id times set (read once per batch, kept up to date).
_ID_INDEX = """
local function expire_ids(k_ids, k_times, cutoff)
  local old = redis.call('ZRANGEBYSCORE', k_times, '-inf', cutoff, 'LIMIT', 0, 256)
  if #old > 0 then
    redis.call('ZREM', k_times, unpack(old))
    redis.call('HDEL', k_ids, unpack(old))
  end
end
local function index_id(k_ids, k_times, id, sseq, now, channels, cap, count)
  for _, channel in ipairs(channels) do
    local field = channel .. '\\n' .. id
    if redis.call('HSETNX', k_ids, field, sseq) == 0 then redis.call('HSET', k_ids, field, 'r') end
    count = count + redis.call('ZADD', k_times, now, field)
  end
  local extra = count - cap
  if extra > 0 then
    local gone = redis.call('ZPOPMIN', k_times, extra)
    for i = 1, #gone, 2 do redis.call('HDEL', k_ids, gone[i]) end
    count = count - #gone / 2
  end
  return count
end
"""

# One call stores and announces a batch of events, in order, atomically: one INCRBY
# numbers them (seqs first..first+n-1), each is PUBLISHed in that order, and the work
# per channel (trimming, expiry, the channel's marks) and per batch (sweeps) is done
# once. History entries are members "seq:ms:<id length>:<id><payload>" scored by seq,
# so one ZRANGEBYSCORE answers a replay; ms (server time) lets a replay expire entries
# one by one. The token key holds the first seq while a re-send of the same batch can
# arrive (redis-py's retry after a lost reply, the outbox's after a failure): the
# batch is then not stored again. The caller deletes token keys once it has the
# reply, in a later call (the keys after the batch's own).
# KEYS: seq, last, live, trim, floor, ids, id times, dead, token, then the worker
#       backlog keys the events name, then the token keys to delete
# ARGV: history size, ttl ms, id index size, token ttl ms, events, token keys to delete,
#       the events, the prefix of history keys (a channel's is the prefix and its name)
#       The events: for each, a header (struct '>BHHHIHH': store, the index in KEYS of
#       its worker backlog (one client's events) or 0, then
#       the lengths of channel, id, payload and pubsub channel, and the number of
#       channels its id is indexed under), those four strings, then each indexed
#       channel as a '>H' length and its bytes
_PUBLISH = (
    _SWEEP
    + _START
    + _ID_INDEX
    + """
local k_seq, k_last, k_live, k_trim, k_floor = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local k_ids, k_times, k_dead, k_token = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local forget = tonumber(ARGV[6])
if forget > 0 then redis.call('DEL', unpack(KEYS, #KEYS - forget + 1, #KEYS)) end
local done = redis.call('GET', k_token)
if done then return tonumber(done) end
local size, ttl, id_cap, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5])
start_counter(k_seq, k_floor)
local first = redis.call('INCRBY', k_seq, n) - n + 1
redis.call('SET', k_token, string.format('%d', first), 'PX', ARGV[4])
local now = now_ms()
local cutoff = now - ttl
local snow = string.format('%d', now)
sweep(k_live, k_last, k_trim, k_floor, k_dead, cutoff, now)
expire_ids(k_ids, k_times, cutoff)
local id_count = nil
local histories, history_order, backlogs, backlog_order = {}, {}, {}, {}
local blob, pos, history_prefix = ARGV[7], 1, ARGV[8]
local sub, unpack_header = string.sub, struct.unpack
for seq = first, first + n - 1 do
  local store, key, cl, il, pl, rl, indexed
  store, key, cl, il, pl, rl, indexed, pos = unpack_header('>BHHHIHH', blob, pos)
  local channel = sub(blob, pos, pos + cl - 1)
  local id = sub(blob, pos + cl, pos + cl + il - 1)
  pos = pos + cl + il
  local payload = sub(blob, pos, pos + pl - 1)
  local route = sub(blob, pos + pl, pos + pl + rl - 1)
  pos = pos + pl + rl
  local sseq = string.format('%d', seq)
  if store == 1 and size > 0 then
    local h = histories[channel]
    if h == nil then
      h = {channel = channel, members = {}}
      histories[channel] = h
      table.insert(history_order, channel)
    end
    local eid = id
    if eid == '' then eid = sseq end
    table.insert(h.members, seq)
    table.insert(h.members, sseq .. ':' .. snow .. ':' .. #eid .. ':' .. eid .. payload)
    h.last = sseq
  end
  -- Ids of events kept out of history (send_to) are indexed too, under the channels
  -- their recipient reads: a client that resumes from one is at a known position.
  if id ~= '' then
    local channels = {}
    for j = 1, indexed do
      local length
      length, pos = unpack_header('>H', blob, pos)
      channels[j] = sub(blob, pos, pos + length - 1)
      pos = pos + length
    end
    if id_count == nil then id_count = redis.call('ZCARD', k_times) end
    id_count = index_id(k_ids, k_times, id, sseq, now, channels, id_cap, id_count)
  end
  local message = sseq .. '\\n' .. #id .. '\\n' .. #channel .. '\\n' .. id .. channel .. payload
  if key > 0 then
    -- Events for one client are kept out of history but in a short backlog of their
    -- worker, so that a worker cut off from Redis can catch up on them too.
    if backlogs[key] == nil then
      backlogs[key] = {}
      table.insert(backlog_order, key)
    end
    table.insert(backlogs[key], message)
  end
  redis.call('PUBLISH', route, message)
end
if #history_order > 0 then
  local channels, live, last = {}, {}, {}
  for i, channel in ipairs(history_order) do
    local h = histories[channel]
    channels[i] = channel
    table.insert(live, now)
    table.insert(live, h.channel)
    table.insert(last, h.channel)
    table.insert(last, h.last)
  end
  -- A channel seen for the first time in two TTLs may have had a history that expired
  -- whole: it starts with the floor as its trim mark. A channel in the dead set always
  -- has a trim mark (sweep sets both), and leaves that set now.
  local marks, fresh, known = redis.call('HMGET', k_trim, unpack(channels)), {}, {}
  local floor = redis.call('GET', k_floor) or '0'
  for i, channel in ipairs(channels) do
    if marks[i] then
      table.insert(known, channel)
    else
      table.insert(fresh, channel)
      table.insert(fresh, floor)
    end
  end
  if #known > 0 then redis.call('ZREM', k_dead, unpack(known)) end
  if #fresh > 0 then redis.call('HSET', k_trim, unpack(fresh)) end
  for _, channel in ipairs(history_order) do
    local h, hist = histories[channel], history_prefix .. channel
    redis.call('ZADD', hist, unpack(h.members))
    local count = redis.call('ZCARD', hist)
    if count > size then
      local cut = redis.call('ZRANGE', hist, count - size - 1, count - size - 1, 'WITHSCORES')
      redis.call('ZREMRANGEBYRANK', hist, 0, count - size - 1)
      redis.call('HSET', k_trim, h.channel, cut[2])
    end
    redis.call('PEXPIRE', hist, ttl)
  end
  redis.call('ZADD', k_live, unpack(live))
  redis.call('HSET', k_last, unpack(last))
end
local cap = size
if cap < 1 then cap = 1 end
for _, key in ipairs(backlog_order) do
  redis.call('LPUSH', KEYS[key], unpack(backlogs[key]))
  redis.call('LTRIM', KEYS[key], 0, cap - 1)
  redis.call('PEXPIRE', KEYS[key], ttl)
end
return first
"""
)

# KEYS: seq, last, live, trim, floor, dead, then one history key per channel
# ARGV: after, ttl ms, then the channels
# Returns the head, the gaps, the entries after the cursor and each channel's floor
# (its history is complete after it), so that one read serves later cursors too.
_REPLAY = (
    _SWEEP
    + """
local after, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_ms()
local cutoff = now - ttl
sweep(KEYS[3], KEYS[2], KEYS[4], KEYS[5], KEYS[6], cutoff, now)
local floor = tonumber(redis.call('GET', KEYS[5]) or '0')
local gaps, found, floors = {}, {}, {}
for i = 3, #ARGV do
  local channel, hist = ARGV[i], KEYS[i + 4]
  expire_entries(hist, KEYS[4], channel, cutoff)
  local trim = redis.call('HGET', KEYS[4], channel)
  local held = redis.call('EXISTS', hist) == 1
  local mark = tonumber(trim or '0')
  if not held then
    mark = floor
    if trim then mark = math.max(tonumber(trim), tonumber(redis.call('HGET', KEYS[2], channel) or '0')) end
  end
  table.insert(floors, string.format('%d', mark))
  if mark > after then
    table.insert(gaps, channel)
  elseif held then
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', hist, '(' .. ARGV[1], '+inf')) do
      table.insert(found, channel)
      table.insert(found, m)
    end
  end
end
return {redis.call('GET', KEYS[1]) or '0', gaps, found, floors}
"""
)

# KEYS: the group. ARGV: member, limit, evict, presence key prefix.
# Members are "<owner>.<rest>"; those of owners whose presence key expired are dropped.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local owner = string.match(m, '^([^.]+)%.')
  if owner == nil or redis.call('EXISTS', ARGV[4] .. owner) == 0 then
    redis.call('ZREM', KEYS[1], m)
  end
end
local evicted = {}
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[2]) + 1
if over > 0 then
  if ARGV[3] ~= '1' then return false end
  local popped = redis.call('ZPOPMIN', KEYS[1], over)
  for i = 1, #popped, 2 do table.insert(evicted, popped[i]) end
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
return evicted
"""


_HEADER = struct.Struct(">BHHHIHH")
_LENGTH = struct.Struct(">H")
"""How the events of a script call are packed into one argument (see ``_PUBLISH``)."""

_SCRIPT_EVENTS = 2000
_SCRIPT_BYTES = 2 * 2**20
"""At most this many events (and payload bytes) per call of the publish script: Redis
runs nothing else while a script runs (about 35 ms for 2,000 events here), and the
script unpacks two values per event into one command, under Lua's limit of 8,000."""

_INLINE_EVENTS = 64
"""Batches up to this size are sent from the event loop; larger ones from a thread."""

_DELIVER_BATCH = 256
"""Messages the subscription reader delivers before it lets the streams' writer run."""

_NAMES_MAX = 50_000
"""Channels whose encoded names and routes are kept for the next publishes."""

_FORGET_MAX = 10_000
"""Token keys remembered for deletion; beyond, they expire on their own."""


def _chunks(publications: Sequence[Publication]) -> list[Sequence[Publication]]:
    """The batch cut into script calls (always the same cut for the same batch)."""
    chunks: list[Sequence[Publication]] = []
    start = size = 0
    for i, p in enumerate(publications):
        if i > start and (i - start >= _SCRIPT_EVENTS or size + len(p.payload) > _SCRIPT_BYTES):
            chunks.append(publications[start:i])
            start, size = i, 0
        size += len(p.payload)
    chunks.append(publications[start:])
    return chunks


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def _parse_member(channel: str, member: bytes) -> Message:
    seq, _, rest = member.partition(b":")
    _, _, rest = rest.partition(b":")
    length, _, rest = rest.partition(b":")
    cut = int(length)
    return Message(int(seq), channel, rest[:cut].decode(), rest[cut:])


def _parse_published(data: bytes) -> Message:
    seq, id_length, channel_length, rest = data.split(b"\n", 3)
    a, b = int(id_length), int(channel_length)
    event_id = rest[:a].decode()
    return Message(int(seq), rest[a : a + b].decode(), event_id or seq.decode(), rest[a + b :])


class RedisBackend(Backend, Coordination):
    """Channels, ids and history shared by every worker connected to one Redis.

    Build it with :meth:`from_settings` (``SSE_BACKEND=redis`` does it for you).
    Every key and channel starts with ``key_prefix``, so several services (or test
    runs) can share one Redis.
    """

    remote = True

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "sse:",
        history_size: int = 1000,
        history_ttl: float = 3600.0,
        id_index_size: int = 100_000,
        timeout: float = 5.0,
        max_connections: int = 50,
        max_backoff: float = 5.0,
        health_interval: float = 5.0,
    ) -> None:
        self.url = url
        self.prefix = key_prefix
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.id_index_size = id_index_size
        self.timeout = timeout
        self.max_connections = max_connections
        self.max_backoff = max_backoff
        self.health_interval = health_interval
        self._redis: aioredis.Redis | None = None
        self._subscriber: aioredis.Redis | Any = None
        self._sink: Sink | None = None
        self.coordination = self
        self._routes: dict[str, int] = {}  # Redis channel -> listened channels routed to it
        self._listened: dict[str, int] = {}  # channel -> seq it has been live since
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._pubsub: Any = None
        self._lock = asyncio.Lock()
        self._ready: asyncio.Future[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._last_seq = 0
        self._burst = 0  # messages delivered since the reader last let the writer run
        self._closing = False
        # Publish tokens: one per script call, named by its batch (see _PUBLISH); the
        # prefix is drawn at start, in the process that publishes. Redis keeps a token
        # until its reply arrives (the next call deletes it), or for as long as history
        # when it never does.
        self._token_prefix = ""
        self._acknowledged: list[str] = []
        self._names: dict[str, tuple[bytes, bytes, str | None]] = {}
        self._blocking: redis.Redis | Any = None
        self._token_ttl_ms = round(max(history_ttl, 2 * timeout + 1) * 1000)
        k = key_prefix
        self._k_seq, self._k_last, self._k_live = k + "seq", k + "last", k + "live"
        self._k_trim, self._k_floor, self._k_dead = k + "trim", k + "floor", k + "dead"
        self._k_ids, self._k_id_times = k + "ids", k + "idtimes"
        self._k_workers, self._k_sys = k + "workers", k + "sys"

    @classmethod
    def from_settings(cls, settings: SSESettings) -> RedisBackend:
        """A backend configured by ``SSE_REDIS_*`` and the history settings."""
        return cls(
            settings.redis_url,
            key_prefix=settings.redis_key_prefix,
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
            id_index_size=settings.redis_id_index_size,
            timeout=settings.redis_timeout,
            max_connections=settings.redis_max_connections,
            max_backoff=settings.redis_max_backoff,
            health_interval=settings.redis_health_interval,
        )

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, sink: Sink) -> None:
        """Check the server (reachable, credentials, scripting, version), then open the
        subscription connection. Raises :class:`BackendError` saying what to fix."""
        where = _redact(self.url)
        try:
            # One retry: a pooled connection may be stale after Redis restarted. A
            # burst of callers beyond the pool waits for a connection instead of failing.
            client = aioredis.Redis.from_pool(
                aioredis.BlockingConnectionPool.from_url(
                    self.url,
                    max_connections=self.max_connections,
                    timeout=self.timeout,
                    retry=Retry(NoBackoff(), 1),
                    socket_timeout=self.timeout,
                    socket_connect_timeout=self.timeout,
                )
            )
            # The subscription connection has its own single-connection pool and no
            # retries: a silent reconnect inside redis-py would skip the catch-up.
            self._subscriber = aioredis.Redis.from_url(
                self.url,
                retry=Retry(NoBackoff(), 0),
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                max_connections=1,
            )
        except ValueError as exc:
            raise BackendError(f"SSE_REDIS_URL {where!r} is not a Redis URL: {exc}") from None
        try:
            await client.ping()
            info = await client.info("server")
            version = tuple(int(p) for p in str(info.get("redis_version", "0.0")).split(".")[:2])
            if version < MIN_REDIS_VERSION:
                raise BackendError(
                    f"Redis at {where} is version {info.get('redis_version')}; the redis backend needs "
                    f"{'.'.join(map(str, MIN_REDIS_VERSION))} or newer"
                )
            await client.eval("return 1", 0)
            self._init_script = client.register_script(_INIT)
            self._last_seq = int(await self._init_script([self._k_seq, self._k_floor]))
        except AuthenticationError as exc:
            await client.aclose()
            await self._subscriber.aclose()
            raise BackendError(
                f"Redis at {where} refused the credentials ({exc}): fix the user/password in SSE_REDIS_URL"
            ) from None
        except (NoPermissionError, ResponseError) as exc:
            await client.aclose()
            await self._subscriber.aclose()
            if "auth" in str(exc).lower():
                raise BackendError(
                    f"Redis at {where} needs a password ({exc}): put it in SSE_REDIS_URL "
                    "(redis://:password@host:port/0)"
                ) from None
            raise BackendError(
                f"Redis at {where} does not allow what the backend needs ({exc}): it must allow "
                "EVAL/EVALSHA, PUBLISH/SUBSCRIBE and the keys under SSE_REDIS_KEY_PREFIX"
            ) from None
        except BackendError:
            await client.aclose()
            await self._subscriber.aclose()
            raise
        except (RedisError, OSError) as exc:
            await client.aclose()
            await self._subscriber.aclose()
            raise BackendError(
                f"cannot reach Redis at {where} ({exc}): check SSE_REDIS_URL and that the server is running"
            ) from None
        self._redis = client
        # Publishing runs in a thread on its own pool: waiting for Redis there does not
        # wait for turns of an event loop busy delivering (and the GIL is free meanwhile).
        self._blocking = redis.Redis.from_pool(
            redis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=self.max_connections,
                timeout=self.timeout,
                retry=BlockingRetry(NoBackoff(), 1),
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
            )
        )
        self._closing = False
        self._token_prefix = uuid.uuid4().hex[:12] + ":"
        self._publish_script = client.register_script(_PUBLISH)
        self._replay_script = client.register_script(_REPLAY)
        self._claim_script = client.register_script(_CLAIM)
        self._sink = sink
        self._ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.get_running_loop().create_task(self._run())
        try:
            async with asyncio.timeout(self.timeout * 2):
                await asyncio.shield(self._ready)
        except Exception:
            await self.close()
            raise

    async def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader], timeout=self.timeout)
            self._reader = None
        if self._redis is not None:
            await self._redis.aclose()
            await self._subscriber.aclose()
            self._blocking.close()
            self._redis = None
        self._sink = None

    # -- subscriptions -----------------------------------------------------------------

    def _route(self, channel: str) -> str:
        # A client's channel travels on its worker's Redis channel, so a worker holds
        # one subscription for all its clients instead of one per client.
        worker = worker_of(channel)
        if worker is not None:
            return self.prefix + "w:" + worker
        return self.prefix + "c:" + channel

    def _backlog(self, channel: str) -> str | None:
        """The backlog key of the worker that holds a client channel's client."""
        route = self._route(channel)
        worker_route = self.prefix + "w:"
        return self.prefix + "wb:" + route[len(worker_route) :] if route.startswith(worker_route) else None

    async def listen(self, channels: Collection[str]) -> None:
        """Subscribe (once per Redis channel) and return when Redis has confirmed it;
        raises :class:`BackendError` while Redis is unreachable."""
        fresh: list[str] = []
        waits: list[asyncio.Future[None]] = []
        async with self._lock:
            pubsub = self._pubsub
            if pubsub is None:
                raise BackendError(f"not connected to Redis at {_redact(self.url)}; reconnecting")
            new = [c for c in channels if c not in self._listened]
            for channel in new:
                route = self._route(channel)
                self._routes[route] = self._routes.get(route, 0) + 1
                if self._routes[route] == 1:
                    fresh.append(route)
                    future = asyncio.get_running_loop().create_future()
                    self._waiting.setdefault(route, []).append(future)
                    waits.append(future)
                self._listened[channel] = self._last_seq
            try:
                if fresh:
                    await pubsub.subscribe(*fresh)
            except (RedisError, OSError) as exc:
                self._forget(new)
                raise BackendError(f"could not subscribe on Redis at {_redact(self.url)}: {exc}") from exc
        try:
            if waits:
                async with asyncio.timeout(self.timeout):
                    await asyncio.gather(*waits)
        except (BackendError, TimeoutError) as exc:
            # Not live: forget them, so that the service's retry subscribes again.
            self._forget(new)
            raise BackendError(f"Redis did not confirm the subscription: {exc or 'timed out'}") from exc
        tracked = [c for c in new if not c.startswith(CLIENT_CHANNEL_PREFIX)]
        if tracked:
            # Events before this point are not this worker's to catch up on later.
            with contextlib.suppress(BackendError):
                head = await self.head()
                for channel in tracked:
                    if channel in self._listened:
                        self._listened[channel] = max(self._listened[channel], head)

    def _forget(self, channels: Collection[str]) -> None:
        for channel in channels:
            if self._listened.pop(channel, None) is None:
                continue
            route = self._route(channel)
            count = self._routes.get(route, 0) - 1
            if count > 0:
                self._routes[route] = count
            else:
                self._routes.pop(route, None)
                for future in self._waiting.pop(route, ()):
                    future.cancel()

    async def unlisten(self, channels: Collection[str]) -> None:
        async with self._lock:
            before = set(self._routes)
            self._forget(channels)
            gone = sorted(before - set(self._routes))
            if gone and self._pubsub is not None:
                with contextlib.suppress(RedisError, OSError):
                    await self._pubsub.unsubscribe(*gone)

    # -- publishing and history -----------------------------------------------------------

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise BackendError("the redis backend is not started")
        return self._redis

    async def publish(
        self, channel: str, payload: bytes, event_id: str | None, *, store: bool, index: Collection[str] = ()
    ) -> Message:
        return (await self.publish_many([Publication(channel, payload, event_id, store, index)]))[0]

    async def publish_many(self, publications: Sequence[Publication]) -> list[Message]:
        """Store and announce a batch in one round trip: one script call per
        ``_SCRIPT_EVENTS`` events, pipelined. Sent again with the same publication keys
        (after a failure), the calls that already ran are not stored again."""
        self._client()
        if not publications:
            return []
        chunks = _chunks(publications)
        forget, self._acknowledged = self._acknowledged, []
        try:
            if len(publications) <= _INLINE_EVENTS:
                # A few events: one call from the loop costs less than a thread hop.
                calls = [self._script_call(chunks[0])]
                calls[0][1][5] = len(forget)
                calls[0][0].extend(forget)
                firsts = [await self._publish_script(*calls[0])]
            else:
                # Built in the thread too: the event loop goes on with its streams.
                calls, firsts = await asyncio.to_thread(self._build_and_send, chunks, forget)
        except (RedisError, OSError) as exc:
            # The token keys may not have been deleted: the next call deletes them.
            self._acknowledged = forget + self._acknowledged
            raise BackendError(
                f"could not publish to channel {publications[0].channel!r} on Redis at {_redact(self.url)}: {exc}"
            ) from exc
        if len(self._acknowledged) < _FORGET_MAX:
            self._acknowledged += [keys[8] for keys, _ in calls]
        messages = []
        for chunk, first in zip(chunks, firsts, strict=True):
            seq = int(first)
            for p in chunk:
                messages.append(Message(seq, p.channel, p.event_id or str(seq), p.payload))
                seq += 1
        return messages

    def _build_and_send(
        self, chunks: list[Sequence[Publication]], forget: list[str]
    ) -> tuple[list[tuple[list[Any], list[Any]]], list[Any]]:
        """In a thread: the script calls of a batch (the first also deletes the token
        keys ``forget``), and their first seqs once run in one round trip."""
        calls = [self._script_call(chunk) for chunk in chunks]
        calls[0][1][5] = len(forget)
        calls[0][0].extend(forget)
        return calls, self._send(calls)

    def _send(self, calls: list[tuple[list[Any], list[Any]]]) -> list[Any]:
        """Run the script calls in one round trip, by hash; load the script once more
        if Redis lost it (calls that ran before are recognised by their tokens).
        Returns each call's first seq."""
        sha = self._publish_script.sha
        for attempt in range(2):
            try:
                if len(calls) == 1:
                    keys, args = calls[0]
                    return [self._blocking.evalsha(sha, len(keys), *keys, *args)]
                with self._blocking.pipeline(transaction=False) as pipe:
                    for keys, args in calls:
                        pipe.evalsha(sha, len(keys), *keys, *args)
                    return list(pipe.execute())
            except NoScriptError:
                if attempt:
                    raise
                self._blocking.script_load(_PUBLISH)
        raise AssertionError("unreachable")  # pragma: no cover

    def _script_call(self, chunk: Sequence[Publication]) -> tuple[list[Any], list[Any]]:
        """KEYS and ARGV of one call of the publish script (see ``_PUBLISH``)."""
        keys: list[Any] = [
            self._k_seq,
            self._k_last,
            self._k_live,
            self._k_trim,
            self._k_floor,
            self._k_ids,
            self._k_id_times,
            self._k_dead,
            # Named by the batch's first publication and its length: the same batch
            # sent again has the same token.
            f"{self.prefix}done:{self._token_prefix}{chunk[0].key}:{len(chunk)}",
        ]
        args: list[Any] = [
            self.history_size,
            round(self.history_ttl * 1000),
            self.id_index_size,
            self._token_ttl_ms,
            len(chunk),
            0,
        ]
        positions: dict[str, int] = {}
        names = self._names
        parts: list[bytes] = []
        for p in chunk:
            channel = p.channel
            found = names.get(channel)
            if found is None:
                if len(names) >= _NAMES_MAX:
                    names.clear()
                found = names[channel] = (channel.encode(), self._route(channel).encode(), self._backlog(channel))
            name, route, backlog = found
            position = 0
            if backlog is not None and not p.store:
                position = positions.get(backlog, 0)
                if not position:
                    keys.append(backlog)
                    position = positions[backlog] = len(keys)
            if p.event_id is None:
                header = _HEADER.pack(p.store, position, len(name), 0, len(p.payload), len(route), 0)
                parts += (header, name, p.payload, route)
                continue
            event_id = p.event_id.encode()
            # The channels the id resolves through (see Backend.publish), each once.
            indexed = [c.encode() for c in dict.fromkeys([channel, *p.index] if p.store else p.index)]
            header = _HEADER.pack(p.store, position, len(name), len(event_id), len(p.payload), len(route), len(indexed))
            parts += (header, name, event_id, p.payload, route)
            for c in indexed:
                parts += (_LENGTH.pack(len(c)), c)
        args += (b"".join(parts), self.prefix + "h:")
        return keys, args

    async def head(self) -> int:
        try:
            return int(await self._client().get(self._k_seq) or 0)
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not read from Redis at {_redact(self.url)}: {exc}") from exc

    async def resolve(self, event_id: str, channels: Collection[str]) -> int | None:
        fields = [c + "\n" + event_id for c in dict.fromkeys(channels)]
        try:
            values: list[bytes | None] = await self._client().hmget(self._k_ids, fields) if fields else []  # type: ignore[assignment]
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not read from Redis at {_redact(self.url)}: {exc}") from exc
        found = {v for v in values if v is not None}
        if found:
            # One message among the client's channels, else unknown (see Backend.resolve).
            return int(found.pop()) if len(found) == 1 and b"r" not in found else None
        if event_id.isascii() and event_id.isdigit():
            value = int(event_id)
            return value if value <= await self.head() else None
        return None

    async def replay(self, channels: Collection[str], after: int | None) -> Replay:
        names = list(dict.fromkeys(channels))
        if after is None:
            return Replay((), await self.head(), frozenset(names))
        keys = [self._k_seq, self._k_last, self._k_live, self._k_trim, self._k_floor, self._k_dead]
        keys += [self.prefix + "h:" + c for c in names]
        try:
            head, gaps, found, floors = await self._replay_script(keys, [after, round(self.history_ttl * 1000), *names])
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not read history from Redis at {_redact(self.url)}: {exc}") from exc
        messages = [_parse_member(found[i].decode(), found[i + 1]) for i in range(0, len(found), 2)]
        messages.sort(key=lambda m: m.seq)
        floor_of = dict(zip(names, map(int, floors), strict=True))
        return Replay(messages, int(head), frozenset(g.decode() for g in gaps), floor_of)

    # -- presence and shared limits ---------------------------------------------------------

    async def announce(self, worker_id: str, info: bytes, ttl: float) -> bool:
        """Register a worker and its opaque ``info`` for ``ttl`` seconds; False when its
        registration was gone (first call, expired, or Redis lost its data)."""
        try:
            async with self._client().pipeline(transaction=False) as pipe:
                pipe.set(self.prefix + "wk:" + worker_id, info, px=max(1, round(ttl * 1000)), get=True)
                pipe.sadd(self._k_workers, worker_id)
                previous, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not register worker on Redis at {_redact(self.url)}: {exc}") from exc
        return previous is not None

    async def withdraw(self, worker_id: str) -> None:
        """Remove a worker's registration (at shutdown)."""
        async with self._client().pipeline(transaction=False) as pipe:
            pipe.delete(self.prefix + "wk:" + worker_id)
            pipe.srem(self._k_workers, worker_id)
            await pipe.execute()

    async def peers(self) -> dict[str, bytes]:
        """The ``info`` of every worker whose registration has not expired."""
        client = self._client()
        try:
            members: set[bytes] = await client.smembers(self._k_workers)  # type: ignore[assignment]
            workers = sorted(w.decode() for w in members)
            infos: list[bytes | None] = (
                await client.mget([self.prefix + "wk:" + w for w in workers]) if workers else []  # type: ignore[assignment]
            )
            dead = [w for w, info in zip(workers, infos, strict=True) if info is None]
            if dead:
                await client.srem(self._k_workers, *dead)
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not read workers from Redis at {_redact(self.url)}: {exc}") from exc
        return {w: info for w, info in zip(workers, infos, strict=True) if info is not None}

    async def claim(self, group: str, member: str, limit: int, *, evict: bool) -> list[str] | None:
        """Add ``member`` (``<worker_id>.<rest>``) to a group capped at ``limit`` across
        every worker. When the group is full, remove and return its oldest members
        if ``evict``, else refuse and return None. Members of workers whose
        registration expired do not count."""
        try:
            result = await self._claim_script(
                [self.prefix + "g:" + group], [member, limit, "1" if evict else "0", self.prefix + "wk:"]
            )
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not update a shared limit on Redis at {_redact(self.url)}: {exc}") from exc
        if result is None:
            return None
        return [m.decode() for m in result]

    async def release(self, group: str, member: str) -> None:
        """Remove ``member`` from a group made by :meth:`claim`."""
        try:
            await self._client().zrem(self.prefix + "g:" + group, member)
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not update a shared limit on Redis at {_redact(self.url)}: {exc}") from exc

    async def reclaim(self, groups: dict[str, list[str]]) -> None:
        """Put members back in their groups where Redis lost them (``ZADD NX``: members
        still there keep their place), oldest first."""
        if not groups:
            return
        try:
            # Redis's clock, as the claim script uses: restored members stay older than newcomers.
            seconds, micros = await self._client().time()
            now = seconds * 1000 + micros // 1000
            async with self._client().pipeline(transaction=False) as pipe:
                for group, members in groups.items():
                    start = now - len(members)
                    pipe.zadd(self.prefix + "g:" + group, {m: start + i for i, m in enumerate(members)}, nx=True)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not restore shared limits on Redis at {_redact(self.url)}: {exc}") from exc

    # -- the subscription connection --------------------------------------------------------

    async def _run(self) -> None:
        """Hold the subscription connection: connect, catch up, read; on any failure
        start again after a growing delay."""
        delay = 0.05
        first = True
        while not self._closing:
            pubsub: Any = self._subscriber.pubsub()
            try:
                pending = await self._connect(pubsub, catch_up=not first)
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(None)
                if not first:
                    self.reconnects += 1
                    logger.warning("reconnected to Redis at %s", _redact(self.url))
                first = False
                delay = 0.05
                for message in pending:
                    self._on_message(message)
                self._burst = len(pending)
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    return
                self.errors += 1
                if first and self._ready is not None and not self._ready.done():
                    self._ready.set_exception(BackendError(f"cannot subscribe on Redis at {_redact(self.url)}: {exc}"))
                    return
                logger.warning(
                    "lost the Redis subscription connection to %s (%s); reconnecting in %.2fs",
                    _redact(self.url),
                    exc,
                    delay,
                )
            finally:
                self._pubsub = None
                for futures in self._waiting.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(BackendError("the Redis subscription connection was lost"))
                self._waiting.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)

    async def _connect(self, pubsub: Any, *, catch_up: bool) -> list[dict[str, Any]]:
        """Subscribe to every routed channel, wait for Redis to confirm, then deliver
        from history what the listened channels missed. Returns live messages read
        meanwhile, to be handled after the catch-up."""
        async with self._lock:
            await self._init_script([self._k_seq, self._k_floor])
            routes = [self._k_sys, *self._routes]
            await pubsub.subscribe(*routes)
            unconfirmed = {r.encode() for r in routes}
            pending: list[dict[str, Any]] = []
            async with asyncio.timeout(self.timeout):
                while unconfirmed:
                    message = await pubsub.get_message(timeout=self.timeout)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        unconfirmed.discard(message["channel"])
                    elif message["type"] == "message":
                        pending.append(message)
            if catch_up:
                await self._catch_up()
            self._pubsub = pubsub
        return pending

    async def _catch_up(self) -> None:
        """Deliver, in order, what history holds after the last delivered seq on every
        listened channel; report the channels whose history no longer reaches back."""
        by_after: dict[int, list[str]] = {}
        for channel, since in self._listened.items():
            if not channel.startswith(CLIENT_CHANNEL_PREFIX):
                by_after.setdefault(max(since, self._last_seq), []).append(channel)
        messages: list[Message] = []
        gaps: set[str] = set()
        for after, channels in by_after.items():
            replay = await self.replay(channels, after)
            messages.extend(replay.messages)
            gaps |= replay.gaps
        worker_route = self.prefix + "w:"
        for route in self._routes:
            if not route.startswith(worker_route):
                continue
            cap = max(self.history_size, 1)
            raw = await self._client().lrange(self.prefix + "wb:" + route[len(worker_route) :], 0, -1)
            backlog = [_parse_published(item) for item in raw if isinstance(item, bytes)]
            missed = [m for m in backlog if m.seq > self._last_seq]
            messages.extend(missed)
            if len(backlog) >= cap and len(missed) == len(backlog):
                # The backlog overflowed while this worker was cut off: some events for
                # its clients may be gone. Their clients resume (and replay channels).
                gaps.update(c for c in self._listened if c.startswith(CLIENT_CHANNEL_PREFIX))
        messages.sort(key=lambda m: m.seq)
        for done, message in enumerate(messages, 1):
            self._handle(message)
            if not done % _DELIVER_BATCH:
                await self._settle()
        if gaps:
            logger.warning(
                "history no longer holds what %d channel(s) missed while Redis was unreachable; "
                "their clients are closed so that they resume",
                len(gaps),
            )
            if self._sink is not None:
                self._sink.lost(sorted(gaps))

    async def _read(self, pubsub: Any) -> None:
        probe_sent = False
        while True:
            message = await pubsub.get_message(timeout=self.health_interval)
            if message is None:
                if probe_sent:
                    raise ConnectionError(f"Redis did not answer PING within {self.health_interval}s")
                await pubsub.ping()
                probe_sent = True
                continue
            probe_sent = False
            self._on_message(message)
            self._burst += 1
            if self._burst >= _DELIVER_BATCH:
                # Data already buffered is read without suspending: let the writer
                # write this batch before the next one.
                await self._settle()

    async def _settle(self) -> None:
        self._burst = 0
        await (self._sink.settle() if self._sink is not None else asyncio.sleep(0))

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "message":
            self._handle(_parse_published(message["data"]))
        elif kind == "subscribe":
            for future in self._waiting.pop(message["channel"].decode(), ()):
                if not future.done():
                    future.set_result(None)

    def _handle(self, message: Message) -> None:
        # After a reconnection the catch-up has already delivered these.
        if message.seq <= self._last_seq:
            return
        self._last_seq = message.seq
        if self._sink is not None:
            self._sink.deliver(message)
