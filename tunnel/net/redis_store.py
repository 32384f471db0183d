"""The fleet-wide limit store (``[limits] store = "redis://..."``): per-client buckets and
tunnel counters in one Redis, so every instance and worker enforces one limit.

Each operation is one Lua script, so it is atomic however many instances race: the token
bucket refills and takes in one step, and ``acquire`` checks every cap and adds the holder to
all of them, or to none. Time inside the scripts is Redis's own ``TIME``, so instances whose
clocks disagree still share one bucket; the ``now`` that ``take`` receives is ignored.

A counter is a sorted set of holders scored by when they expire. A live instance pushes the
expiry of its holders forward every ``ttl / 3`` (``keep_alive``); the holders of one that
crashed are dropped within ``ttl`` by the next ``acquire`` on that key, so no slot leaks for
good. Keys of one call may land in different hash slots: this wants one Redis server (with
replicas if you like), not Redis Cluster.

redis-py's asyncio client cannot run under trio, so its synchronous client runs in a few
worker threads (``trio.to_thread``) and the event loop never waits on the network. Every
failure, whether refused, timed out or an error answer, becomes ``StoreUnavailable`` within
about ``timeout`` (one immediate retry on a dropped connection, none on a timeout).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from tunnel.logs import LOGGER_NAME, fields
from tunnel.policy.limits import Rate, StoreUnavailable

log = logging.getLogger(LOGGER_NAME)

T = TypeVar("T")

KEY_PREFIX = "tunnel:"
"""Before every key this store writes, so a shared Redis database keeps ours apart."""
THREADS = 4
"""Worker threads (and so Redis connections) per store: calls are short, so a few suffice."""
REFRESH_BATCH = 500
"""(key, holder) pairs per refresh script, so one call never holds Redis for long."""

# KEYS[1] = bucket; ARGV = rate per second, burst. Returns the seconds to wait, as a string
# (Redis would truncate a Lua number to an integer).
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = burst
  stamp = now
end
if now > stamp then
  tokens = math.min(burst, tokens + (now - stamp) * rate)
  stamp = now
end
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'stamp', string.format('%.17g', stamp))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1)
return string.format('%.17g', wait)
"""

# KEYS = counters; ARGV = holder, ttl in ms, then one cap per key. Returns 0 when the holder
# was added to every counter, else the 1-based index of the first counter at its cap.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= tonumber(ARGV[i + 2]) then
    return i
  end
end
local ttl = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[1])
  redis.call('PEXPIRE', key, ttl)
end
return 0
"""

# KEYS = counters; ARGV = ttl in ms, then one holder per key. Pushes the expiry of holders
# still present; one already expired or released stays gone (XX), so a cap is never overshot.
_REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZADD', key, 'XX', 'CH', now + ttl, ARGV[i + 1]) > 0 then
    redis.call('PEXPIRE', key, ttl)
  end
end
return 0
"""


def shown_url(url: str) -> str:
    """The URL without its password, fit for a log line or an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


class RedisStore:
    """A ``LimitStore`` kept in Redis; ``instance`` names this process among the fleet."""

    def __init__(self, url: str, *, instance: str, ttl: float = 30.0, timeout: float = 0.5) -> None:
        if ttl <= 0 or timeout <= 0:
            raise ValueError("ttl and timeout must be positive")
        self.url = shown_url(url)
        self.instance = instance
        self.ttl = ttl
        self.timeout = timeout
        self._ttl_ms = max(1, round(ttl * 1000))
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, (redis.ConnectionError,)),
        )
        self._take = self._client.register_script(_TAKE)
        self._acquire = self._client.register_script(_ACQUIRE)
        self._refresh = self._client.register_script(_REFRESH)
        self._limiter = trio.CapacityLimiter(THREADS)
        self._live: dict[str, tuple[str, ...]] = {}
        """Holders this instance acquired and has not released: what ``keep_alive`` refreshes."""
        self._closed = False

    @property
    def live(self) -> int:
        """Holders of this instance that currently hold slots."""
        return len(self._live)

    async def take(self, bucket: str, rate: Rate, burst: int, now: float) -> float:
        """0.0 when a token was taken, else the seconds until the next one (``now`` unused:
        Redis's clock is the one every instance shares)."""
        if rate.count <= 0 or rate.per <= 0:
            raise ValueError(
                f"a bucket needs a rate above 0, got {rate}; 0 is off: skip the bucket"
            )
        if burst < 1:
            raise ValueError(f"a bucket holds at least 1 token, got burst {burst}")
        keys = [KEY_PREFIX + bucket]
        args: list[str | int] = [repr(rate.per_second), burst]
        answer = await self._call(lambda: self._take(keys=keys, args=args), "take a token")
        return max(0.0, float(answer))

    async def acquire(self, holder: str, counters: Sequence[tuple[str, int]]) -> str | None:
        """All or nothing: None when ``holder`` now counts in every counter, else the key of
        the first counter at its cap (and nothing was taken)."""
        if not counters:
            return None
        member = self._member(holder)
        keys = [KEY_PREFIX + key for key, _ in counters]
        args: list[str | int] = [member, self._ttl_ms, *(cap for _, cap in counters)]
        answer = await self._call(
            lambda: self._acquire(keys=keys, args=args), "acquire tunnel slots"
        )
        full = int(answer)
        if full:
            return counters[full - 1][0]
        self._live[member] = tuple(keys)
        return None

    async def release(self, holder: str, keys: Sequence[str]) -> None:
        """Give the slots back. A holder the store cannot reach is forgotten all the same:
        no longer kept alive, it expires within ``ttl``."""
        member = self._member(holder)
        self._live.pop(member, None)
        if not keys:
            return
        stored = [KEY_PREFIX + key for key in keys]

        def remove() -> None:
            with self._client.pipeline(transaction=False) as pipe:
                for key in stored:
                    pipe.zrem(key, member)
                pipe.execute()

        await self._call(remove, "release tunnel slots")

    async def refresh(self) -> None:
        """Push the expiry of every live holder ``ttl`` past Redis's now, in one round trip."""
        pairs = [(key, member) for member, keys in self._live.items() for key in keys]
        if not pairs:
            return

        def push() -> None:
            with self._client.pipeline(transaction=False) as pipe:
                for start in range(0, len(pairs), REFRESH_BATCH):
                    batch = pairs[start : start + REFRESH_BATCH]
                    self._refresh(
                        keys=[key for key, _ in batch],
                        args=[self._ttl_ms, *(member for _, member in batch)],
                        client=pipe,
                    )
                pipe.execute()

        await self._call(push, "keep tunnel slots alive")

    async def keep_alive(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Refresh this instance's holders every ``ttl / 3`` until cancelled; a refresh that
        fails is logged and tried again next turn (two may fail before any slot expires)."""
        task_status.started()
        while True:
            await trio.sleep(self.ttl / 3)
            try:
                await self.refresh()
            except StoreUnavailable as error:
                log.warning(
                    "could not keep tunnel slots alive in the limit store",
                    extra=fields(store=self.url, error=str(error), tunnels=len(self._live)),
                )

    async def aclose(self) -> None:
        """Close the connections; later calls raise ``StoreUnavailable``."""
        if self._closed:
            return
        self._closed = True
        await trio.to_thread.run_sync(self._client.close, limiter=self._limiter)

    def _member(self, holder: str) -> str:
        return f"{self.instance}/{holder}"

    async def _call(self, work: Callable[[], T], doing: str) -> T:
        """Run ``work`` in a worker thread; any failure becomes ``StoreUnavailable``."""
        if self._closed:
            raise StoreUnavailable(f"could not {doing}: the limit store {self.url} is closed")
        try:
            return await trio.to_thread.run_sync(work, limiter=self._limiter)
        except redis.TimeoutError as error:
            raise StoreUnavailable(
                f"could not {doing}: the limit store {self.url} did not answer within "
                f"{self.timeout:g}s"
            ) from error
        except redis.ConnectionError as error:
            raise StoreUnavailable(
                f"could not {doing}: cannot reach the limit store {self.url} ({error})"
            ) from error
        except (redis.RedisError, OSError) as error:
            raise StoreUnavailable(
                f"could not {doing}: the limit store {self.url} answered with an error ({error})"
            ) from error
