"""The shared half of the rate limiter: exact sliding logs in Redis, changed by one Lua script.

Layout, per rule and budget (the egress IP for REQUEST_WEIGHT, the account for ORDERS):

* ``{namespace}:{budget}:{rule.key}``: a sorted set, one member per admitted request, scored by
  the Redis server's time in microseconds; the member is ``<weight>:<unique token>`` so a request
  of weight 5 counts 5 and two requests never collide;
* ``{namespace}:{budget}:{rule.key}:used``: the sum of the weights in that set, kept beside it so a
  call costs O(members that expired) rather than a re-sum of up to 2,400 members;
* ``{namespace}:{budget}:pause``: the deadline (server microseconds) before which nothing may be
  sent, written after a 429/418 and read by every replica.

Every key gets a TTL of about one window past its last write, so idle budgets disappear.

One script does every operation atomically, so N replicas see one log: it trims each rule's log
to the window ``(now - window, now]``, then either records the request in every rule or in none
and says how long to wait until the oldest members have freed enough room. It reads the clock
with ``TIME`` inside the script, so replicas whose clocks disagree still agree on the windows.
That needs Redis >= 5 (writes after ``TIME`` in a script; Debian 12 ships 7.0). One script call
touches the pause keys and every rule's keys, so on Redis Cluster they would all need one hash
slot: this targets a single Redis (or a primary with replicas).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from qtrader.exchange.limits import LimitKind, RateLimitRule, RequestCost

# What "Redis cannot keep the budget" looks like on a call: unreachable, timed out, still loading
# (a ConnectionError), a read-only replica during a failover, out of memory. The limiter falls back
# on these and only these: any other error (a script bug) must surface, not hide behind a fallback.
REDIS_DOWN: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ReadOnlyError,
    OutOfMemoryError,
)

# A short timeout: an acquire blocked on a hung Redis is worse than a conservative local share.
_SOCKET_TIMEOUT_S = 0.5

# Status codes returned by the script.
_ADMITTED, _PAUSED, _FULL = 0, 1, 2

_SCRIPT = """
-- KEYS: npause pause keys, then for each rule its log key and its used key.
-- ARGV: op, npause, nrules, token, then per rule window_us and limit, then the op's arguments.
local op = ARGV[1]
local npause = tonumber(ARGV[2])
local nrules = tonumber(ARGV[3])
local token = ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local window, limit, used, dirty, added = {}, {}, {}, {}, {}
for i = 1, nrules do
  window[i] = tonumber(ARGV[3 + 2 * i])
  limit[i] = tonumber(ARGV[4 + 2 * i])
end
local rest = 5 + 2 * nrules  -- index of the op's first argument

local function log_key(i) return KEYS[npause + 2 * i - 1] end
local function used_key(i) return KEYS[npause + 2 * i] end
local function weight_of(member) return tonumber(string.match(member, '^(%d+):')) end
local function int(x) return string.format('%.0f', x) end

-- Drop the members that left the window (score <= now - window) and load the rule's used sum.
local function trim(i)
  local cutoff = int(now - window[i])
  local expired = redis.call('ZRANGEBYSCORE', log_key(i), '-inf', cutoff)
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', log_key(i), '-inf', cutoff)
  end
  local raw = redis.call('GET', used_key(i))
  if redis.call('ZCARD', log_key(i)) == 0 then
    used[i] = 0
    if raw then redis.call('DEL', used_key(i)) end
  elseif raw then
    used[i] = tonumber(raw)
    for _, m in ipairs(expired) do used[i] = used[i] - weight_of(m) end
    dirty[i] = #expired > 0
  else
    -- The sum is missing (flushed by hand?): recount, the log is the truth.
    used[i] = 0
    for _, m in ipairs(redis.call('ZRANGE', log_key(i), 0, -1)) do
      used[i] = used[i] + weight_of(m)
    end
    dirty[i] = true
  end
end

local function add(i, weight, score, member)
  redis.call('ZADD', log_key(i), int(score), int(weight) .. ':' .. member)
  used[i] = used[i] + weight
  dirty[i] = true
  added[i] = true
end

-- Microseconds until the oldest members have freed `need` units of rule i.
local function wait_for(i, need)
  local freed, start = 0, 0
  while true do
    local batch = redis.call('ZRANGE', log_key(i), start, start + 99, 'WITHSCORES')
    if #batch == 0 then return window[i] end
    for j = 1, #batch, 2 do
      freed = freed + weight_of(batch[j])
      if freed >= need then return tonumber(batch[j + 1]) + window[i] - now end
    end
    start = start + 100
  end
end

local function save()
  for i = 1, nrules do
    local ttl = int(math.ceil(window[i] / 1000) + 1000)
    if added[i] then
      redis.call('SET', used_key(i), int(used[i]), 'PX', ttl)
      redis.call('PEXPIRE', log_key(i), ttl)
    elseif dirty[i] and used[i] > 0 then
      redis.call('SET', used_key(i), int(used[i]), 'KEEPTTL')
    end
  end
end

local function reply(status, wait)
  local out = {status, wait}
  for i = 1, nrules do out[2 + i] = used[i] end
  return out
end

local function pause_left()
  local left = 0
  for p = 1, npause do
    local deadline = tonumber(redis.call('GET', KEYS[p]) or '0')
    if deadline - now > left then left = deadline - now end
  end
  return left
end

for i = 1, nrules do trim(i) end

if op == 'acquire' then
  local paused = pause_left()
  if paused > 0 then save() return reply(1, math.ceil(paused)) end
  local wait = 0
  for i = 1, nrules do
    local cost = tonumber(ARGV[rest + i - 1])
    if cost > 0 and used[i] + cost > limit[i] then
      local w = wait_for(i, used[i] + cost - limit[i])
      if w > wait then wait = w end
    end
  end
  if wait > 0 then save() return reply(2, math.ceil(wait)) end
  for i = 1, nrules do
    local cost = tonumber(ARGV[rest + i - 1])
    if cost > 0 then add(i, cost, now, token) end
  end
elseif op == 'observe' then
  -- The server counted more than we did: add the difference, so used = max(ours, server's).
  for i = 1, nrules do
    local seen = tonumber(ARGV[rest + i - 1])
    if seen > used[i] then add(i, seen - used[i], now, token .. ':observed') end
  end
elseif op == 'pause' then
  local deadline = now + tonumber(ARGV[rest])
  local px = int(math.ceil((deadline - now) / 1000) + 1000)
  for p = 1, npause do
    local current = tonumber(redis.call('GET', KEYS[p]) or '0')
    if current < deadline then redis.call('SET', KEYS[p], int(deadline), 'PX', px) end
  end
  save()
  return reply(1, math.ceil(pause_left()))
elseif op == 'merge' then
  -- Admissions made in-process while Redis was away, each as (rule, age in us, weight).
  local count = tonumber(ARGV[rest])
  for e = 0, count - 1 do
    local i = tonumber(ARGV[rest + 1 + 3 * e])
    local age = tonumber(ARGV[rest + 2 + 3 * e])
    local weight = tonumber(ARGV[rest + 3 + 3 * e])
    if age < window[i] then add(i, weight, now - age, token .. ':' .. e) end
  end
else
  return redis.error_reply('unknown rate limiter op ' .. tostring(op))
end
save()
return reply(0, 0)
"""


@dataclass(frozen=True)
class SharedResult:
    """What the script answered: admitted or not, how long to wait, each rule's used count."""

    admitted: bool
    paused_s: float  # > 0 when a shared pause is in force
    wait_s: float  # > 0 when some rule has no room yet
    used: dict[RateLimitRule, int]


@dataclass(frozen=True)
class MergeEntry:
    rule: RateLimitRule
    age_s: float
    weight: int


class RedisBudget:
    """One process's handle on the shared budgets of a set of rules."""

    def __init__(
        self,
        client: Redis,
        *,
        limits: Mapping[RateLimitRule, int],
        egress_id: str,
        account_id: str,
        namespace: str,
    ) -> None:
        self._client = client
        self._rules = tuple(limits)
        self._index = {rule: i for i, rule in enumerate(self._rules, start=1)}
        # One pause key per budget (deduplicated when both ids are the same): a 429 on the IP and
        # a -1015 on the account both stop every replica that shares either.
        pauses = (f"{namespace}:{egress_id}:pause", f"{namespace}:{account_id}:pause")
        self._pause_keys = list(dict.fromkeys(pauses))
        rule_keys: list[str] = []
        for rule in self._rules:
            budget = egress_id if rule.kind is LimitKind.REQUEST_WEIGHT else account_id
            log = f"{namespace}:{budget}:{rule.key}"
            rule_keys += [log, f"{log}:used"]
        self._keys = self._pause_keys + rule_keys
        self._counts = [str(len(self._pause_keys)), str(len(self._rules))]
        self._rule_args: list[str] = []
        for rule in self._rules:
            self._rule_args += [str(rule.window_ms * 1000), str(limits[rule])]
        self._script = client.register_script(_SCRIPT)
        # Unique member names across processes and calls: pid + random + a counter.
        self._prefix = f"{os.getpid()}-{os.urandom(4).hex()}"
        self._counter = itertools.count()

    @classmethod
    def connect(cls, url: str, **kwargs: Any) -> RedisBudget:
        """A client that fails fast: short timeouts and one immediate retry on a fresh connection
        (a server restart leaves a dead pooled connection; one retry is enough to replace it)."""
        client = Redis.from_url(
            url,
            socket_timeout=_SOCKET_TIMEOUT_S,
            socket_connect_timeout=_SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1),
        )
        return cls(client, **kwargs)

    async def ping(self) -> None:
        await self._client.ping()

    async def acquire(self, cost: RequestCost) -> SharedResult:
        return await self._call("acquire", [str(cost.against(rule)) for rule in self._rules])

    async def observe(self, seen: Mapping[RateLimitRule, int]) -> dict[RateLimitRule, int]:
        args = [str(seen.get(rule, -1)) for rule in self._rules]
        return (await self._call("observe", args)).used

    async def pause(self, duration_s: float) -> SharedResult:
        """Pause every replica for ``duration_s`` from now (server time); never shortens a pause."""
        return await self._call("pause", [str(math.ceil(max(duration_s, 0.0) * 1e6))])

    async def merge(self, entries: Sequence[MergeEntry]) -> dict[RateLimitRule, int]:
        args = [str(len(entries))]
        for entry in entries:
            args += [str(self._index[entry.rule]), str(int(entry.age_s * 1e6)), str(entry.weight)]
        return (await self._call("merge", args)).used

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, op: str, args: list[str]) -> SharedResult:
        token = f"{self._prefix}-{next(self._counter)}"
        header = [op, *self._counts, token]
        raw = await self._script(keys=self._keys, args=header + self._rule_args + args)
        status, wait_us, *used = (int(x) for x in raw)
        return SharedResult(
            admitted=status == _ADMITTED,
            paused_s=wait_us / 1e6 if status == _PAUSED else 0.0,
            wait_s=wait_us / 1e6 if status == _FULL else 0.0,
            used=dict(zip(self._rules, used, strict=True)),
        )
