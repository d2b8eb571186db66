"""The Lua scripts: every state change of a redis-backed queue or channel is one of these.

A script runs alone on the server (nothing else executes while it does), so each one
is one atomic step: "add these records if there is room", "take up to n records", and
so on. Time is always the server's (``TIME``), never a client's, so leases mean the
same thing to every host. docs/redis.md describes the keys and what each script does;
this module is the normative text.

Every script gets the same eight keys, all sharing the hash tag ``{NAME}`` so that a
Redis Cluster keeps them in one slot::

    KEYS[1] M      shmchan:{NAME}:m      hash: the queue's settings and counters
    KEYS[2] S      shmchan:{NAME}:s      stream: the records; consumer group "g"
    KEYS[3] ITEMS  shmchan:{NAME}:items  list: wakeup hints for waiting consumers
    KEYS[4] SPACE  shmchan:{NAME}:space  list: wakeup hints for producers waiting for room
    KEYS[5] DONE   shmchan:{NAME}:done   list: wakeup hints for join()
    KEYS[6] H      shmchan:{NAME}:h      zset: holders of an unnamed queue (id -> lease deadline, ms)
    KEYS[7] W      shmchan:{NAME}:w      zset: a channel's writers (id -> lease deadline, ms)
    KEYS[8] R      shmchan:{NAME}:r      zset: a channel's readers (id -> lease deadline, ms)

Status codes (negative integers, or the first element of a reply array) are the
constants below.
"""

from __future__ import annotations

import hashlib
from typing import Final

KEY_SUFFIXES: Final = ("m", "s", "items", "space", "done", "h", "w", "r")
GROUP: Final = "g"
"""The one consumer group every stream has."""
SHARED_CONSUMER: Final = "-"
"""The group consumer of handles that acknowledge at once (their pending list stays empty)."""
SCHEMA: Final = "1"
"""Field ``v`` of the settings hash: the version of this key layout."""

OK: Final = 1
GONE: Final = -1  # the settings hash is missing: removed, expired, or the server lost its data
BROKEN: Final = -2  # a send, and no reader lease is left
FENCED: Final = -3  # a writer whose lease lapsed after the readers saw the end of the stream
EOF: Final = -4  # nothing left and no writer lease: the end of the stream
TOO_MANY: Final = -5  # task_done() without an unfinished task
WRONG_KIND: Final = -6  # a queue opened as a channel or the other way round
EXISTS: Final = -7  # create() found the name taken
FOREIGN: Final = -8  # the settings hash is not shmchan's (wrong schema version)
SKIP: Final = 2  # a second take of a pipeline whose first take answered (see TAKE)

TOKENS: Final = 64
"""The most wakeup hints a list keeps (each wakes one waiter; waiters also re-check
every slice, so a hint that is dropped costs latency, never correctness)."""


def keys(name: str) -> list[str]:
    return [f"shmchan:{{{name}}}:{suffix}" for suffix in KEY_SUFFIXES]


_PRELUDE: Final = f"""
local M, S, ITEMS, SPACE, DONE, H, W, R = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local G = '{GROUP}'
local TOKENS = {TOKENS}
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function num(v)
  return tonumber(v) or 0
end
-- records put and not yet taken (taken = delivered, even if not yet acknowledged)
local function queued(redeliver)
  local n = redis.call('XLEN', S)
  if redeliver > 0 then
    n = n - redis.call('XPENDING', S, G)[1]
  end
  return n
end
-- an unnamed queue's keys all expire together: give keys this call created the same expiry
local function touch(...)
  local exp = redis.call('PEXPIRETIME', M)
  if exp > 0 then
    for _, k in ipairs({{...}}) do
      redis.call('PEXPIREAT', k, exp)
    end
  end
end
-- push n wakeup hints (at most TOKENS are kept)
local function hint(key, n)
  if n > TOKENS then n = TOKENS end
  if n <= 0 then return end
  local t = {{}}
  for i = 1, n do t[i] = '1' end
  redis.call('LPUSH', key, unpack(t))
  redis.call('LTRIM', key, 0, TOKENS - 1)
end
-- an unnamed queue's keys expire when its last holder's lease does (a transit hold too)
local function hold_keys()
  local top = redis.call('ZRANGE', H, -1, -1, 'WITHSCORES')
  if top[2] then
    for _, k in ipairs(KEYS) do redis.call('PEXPIREAT', k, top[2]) end
  end
end
local function enter(role, id, deadline)
  redis.call('ZADD', role, deadline, id)
  if role == W then
    redis.call('HSET', M, 'wseen', 1, 'eof', 0)
  else
    redis.call('HSET', M, 'rseen', 1)
  end
end
"""

CREATE: Final = (
    _PRELUDE
    + f"""
-- ARGV: kind, maxsize, cap (bytes, 0: none), joinable, redeliver (ms, 0: off),
--       lease (ms), holder id ('' unless unnamed), writer id, reader id, max message (bytes)
if redis.call('EXISTS', M) == 1 then return {{{EXISTS}}} end
redis.call('DEL', S, ITEMS, SPACE, DONE, H, W, R)  -- leftovers of a half-expired queue
redis.call('HSET', M, 'v', '{SCHEMA}', 'kind', ARGV[1], 'maxsize', ARGV[2], 'cap', ARGV[3],
  'joinable', ARGV[4], 'redeliver', ARGV[5], 'u', 0, 'b', 0, 'epoch', 0, 'eof', 0,
  'wseen', 0, 'rseen', 0, 'cur', '0-0', 'maxmsg', ARGV[10])
redis.call('XGROUP', 'CREATE', S, G, '0', 'MKSTREAM')
local now, lease = now_ms(), tonumber(ARGV[6])
if ARGV[7] ~= '' then
  redis.call('ZADD', H, now + lease, ARGV[7])
  hold_keys()
end
if ARGV[8] ~= '' then enter(W, ARGV[8], now + lease) end
if ARGV[9] ~= '' then enter(R, ARGV[9], now + lease) end
return {{{OK}, 0}}
"""
)

ATTACH: Final = (
    _PRELUDE
    + f"""
-- ARGV: kind, lease (ms), holder id, transit id (a pickled handle's hold, redeemed), writer id, reader id
-- reply: {{status, epoch, maxsize, cap, joinable, redeliver, leased (1: an unnamed queue), max message}}
if redis.call('EXISTS', M) == 0 then return {{{GONE}}} end
local meta = redis.call('HMGET', M, 'v', 'kind', 'epoch', 'maxsize', 'cap', 'joinable', 'redeliver', 'maxmsg')
if meta[1] ~= '{SCHEMA}' then return {{{FOREIGN}}} end
if meta[2] ~= ARGV[1] then return {{{WRONG_KIND}}} end
local now, lease = now_ms(), tonumber(ARGV[2])
local leased = 0
if redis.call('PEXPIRETIME', M) > 0 then leased = 1 end
if ARGV[3] ~= '' and leased == 1 then
  if ARGV[4] ~= '' then redis.call('ZREM', H, ARGV[4]) end
  redis.call('ZADD', H, now + lease, ARGV[3])
  hold_keys()
end
if ARGV[5] ~= '' then enter(W, ARGV[5], now + lease) end
if ARGV[6] ~= '' then enter(R, ARGV[6], now + lease) end
return {{{OK}, num(redis.call('HGET', M, 'epoch')), num(meta[4]), num(meta[5]), num(meta[6]), num(meta[7]),
  leased, num(meta[8])}}
"""
)

PUT: Final = (
    _PRELUDE
    + f"""
-- ARGV: writer id ('' for queues), writer epoch, lease (ms), sender reads (1/0),
--       then type, payload pairs. Adds the first records that fit; returns how many.
if redis.call('EXISTS', M) == 0 then return {GONE} end
local meta = redis.call('HMGET', M, 'kind', 'maxsize', 'cap', 'joinable', 'redeliver')
local maxsize, cap, redeliver = num(meta[2]), num(meta[3]), num(meta[5])
if meta[1] == 'channel' then
  local now = now_ms()
  if ARGV[1] ~= '' and not redis.call('ZSCORE', W, ARGV[1]) then
    -- this writer's lease lapsed: it may come back only if no reader saw the end meanwhile
    if redis.call('HGET', M, 'epoch') ~= ARGV[2] then return {FENCED} end
    enter(W, ARGV[1], now + tonumber(ARGV[3]))
  end
  if ARGV[4] == '0' and redis.call('HGET', M, 'rseen') == '1' then
    redis.call('ZREMRANGEBYSCORE', R, '-inf', now)
    if redis.call('ZCARD', R) == 0 then return {BROKEN} end
  end
end
local n = (#ARGV - 4) / 2
local room = n
if maxsize > 0 then
  room = math.min(room, maxsize - queued(redeliver))
end
if cap > 0 and room > 0 then
  local used, k = num(redis.call('HGET', M, 'b')), 0
  while k < room do
    local size = #ARGV[4 + 2 * (k + 1)]
    if used > 0 and used + size > cap then break end
    used, k = used + size, k + 1
  end
  room = k
  if room > 0 then redis.call('HSET', M, 'b', used) end
end
if room <= 0 then
  redis.call('DEL', SPACE)  -- stale hints: the next one will mean there is room
  return 0
end
for i = 1, room do
  redis.call('XADD', S, '*', 't', ARGV[3 + 2 * i], 'p', ARGV[4 + 2 * i])
end
if meta[4] == '1' then redis.call('HINCRBY', M, 'u', room) end
hint(ITEMS, room)
touch(S, ITEMS)
return room
"""
)

TAKE: Final = (
    _PRELUDE
    + f"""
-- ARGV: consumer, count, hold (1: deliver through the group and leave the records in its
--       pending list until task_done; 0: take the oldest and delete them), eof check (1/0)
-- ARGV[5] (optional) and KEYS[9], the caller's private wake list, for a take that waits
--       in one round trip: the pipeline TAKE 'first', BLPOP wake items, TAKE 'second'.
--       'first' pushes two wake tokens when it has an answer (records, the end, or the
--       queue gone): the BLPOP pops one at once, and 'second', finding the other,
--       returns SKIP without taking anything. If 'first' found nothing, the BLPOP
--       sleeps until a producer's hint (or the slice) and 'second' takes right after.
-- reply: {{status, id, type, payload, id, type, payload, ...}}
local function answered()
  if ARGV[5] == 'first' then
    redis.call('LPUSH', KEYS[9], '1', '1')
    redis.call('PEXPIRE', KEYS[9], 10000)
  end
end
if ARGV[5] == 'second' and redis.call('LPOP', KEYS[9]) then return {{{SKIP}}} end
if redis.call('EXISTS', M) == 0 then
  answered()
  return {{{GONE}}}
end
local meta = redis.call('HMGET', M, 'kind', 'maxsize', 'cap', 'redeliver')
local maxsize, cap, redeliver = num(meta[2]), num(meta[3]), num(meta[4])
local count = tonumber(ARGV[2])
local out, ids, fresh, freed = {{{OK}}}, {{}}, 0, 0
local function add(entry, is_fresh)
  local f, t, p = entry[2], nil, nil
  for j = 1, #f, 2 do
    if f[j] == 't' then t = f[j + 1] elseif f[j] == 'p' then p = f[j + 1] end
  end
  out[#out + 1] = entry[1]
  out[#out + 1] = t or '0'
  out[#out + 1] = p or ''
  ids[#ids + 1] = entry[1]
  if is_fresh then
    fresh = fresh + 1
    freed = freed + #(p or '')
  end
end
if redeliver > 0 then
  -- records whose consumer stopped renewing them for longer than redeliver ms
  local r = redis.call('XAUTOCLAIM', S, G, ARGV[1], redeliver, redis.call('HGET', M, 'cur') or '0-0',
    'COUNT', count)
  redis.call('HSET', M, 'cur', r[1])
  local claimed = 0
  for _, e in ipairs(r[2]) do
    if e and e[2] then add(e, false); claimed = claimed + 1 end
  end
  if claimed > 0 then
    -- consumers that hold nothing any more (their process died) are forgotten
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', S, G)) do
      local f = {{}}
      for j = 1, #c, 2 do f[c[j]] = c[j + 1] end
      if f['pending'] == 0 and f['name'] ~= ARGV[1] then
        redis.call('XGROUP', 'DELCONSUMER', S, G, f['name'])
      end
    end
  end
end
if ARGV[3] ~= '1' then
  -- taken for good: the oldest records, deleted below (the group is not needed)
  for _, e in ipairs(redis.call('XRANGE', S, '-', '+', 'COUNT', count)) do add(e, true) end
elseif #ids < count then
  local r = redis.call('XREADGROUP', 'GROUP', G, ARGV[1], 'COUNT', count - #ids, 'STREAMS', S, '>')
  if r then
    for _, e in ipairs(r[1][2]) do add(e, true) end
  end
end
if #ids == 0 then
  redis.call('DEL', ITEMS)  -- stale hints: the next one will mean there is something
  if ARGV[4] == '1' and meta[1] == 'channel' then
    redis.call('ZREMRANGEBYSCORE', W, '-inf', now_ms())
    if redis.call('HGET', M, 'wseen') == '1' and redis.call('ZCARD', W) == 0
        and redis.call('XLEN', S) == 0 then
      if redis.call('HGET', M, 'eof') ~= '1' then
        redis.call('HSET', M, 'eof', 1)
        redis.call('HINCRBY', M, 'epoch', 1)  -- fences writers whose lease lapsed
      end
      answered()
      return {{{EOF}}}
    end
  end
  return {{0}}
end
if ARGV[3] ~= '1' then redis.call('XDEL', S, unpack(ids)) end
if cap > 0 and freed > 0 then redis.call('HINCRBY', M, 'b', -freed) end
if (maxsize > 0 or cap > 0) and fresh > 0 then
  hint(SPACE, fresh)
  touch(SPACE)
end
answered()
return out
"""
)

REQUEUE: Final = (
    _PRELUDE
    + """
-- ARGV: held (1: the records are still pending under this consumer), then id, type, payload
-- triples: records a closing handle had taken but not handed out go back, at the tail.
if redis.call('EXISTS', M) == 0 then return 0 end
local cap = num(redis.call('HGET', M, 'cap'))
local n, bytes = 0, 0
for i = 2, #ARGV, 3 do
  if ARGV[1] == '1' then
    redis.call('XACK', S, G, ARGV[i])
    redis.call('XDEL', S, ARGV[i])
  end
  redis.call('XADD', S, '*', 't', ARGV[i + 1], 'p', ARGV[i + 2])
  n, bytes = n + 1, bytes + #ARGV[i + 2]
end
if cap > 0 then redis.call('HINCRBY', M, 'b', bytes) end
hint(ITEMS, n)
touch(ITEMS)
return n
"""
)

DONE_SCRIPT: Final = (
    _PRELUDE
    + f"""
-- ARGV: the acknowledged record's id ('' when records are acknowledged as they are taken)
if redis.call('EXISTS', M) == 0 then return {GONE} end
if ARGV[1] ~= '' then
  if redis.call('XACK', S, G, ARGV[1]) == 0 then
    return 2  -- acknowledged already, by the consumer it was handed to again: counted there
  end
  redis.call('XDEL', S, ARGV[1])
end
if num(redis.call('HGET', M, 'u')) <= 0 then return {TOO_MANY} end
if redis.call('HINCRBY', M, 'u', -1) == 0 then
  hint(DONE, TOKENS)
  touch(DONE)
end
return {OK}
"""
)

JOINED: Final = (
    _PRELUDE
    + f"""
if redis.call('EXISTS', M) == 0 then return {GONE} end
if num(redis.call('HGET', M, 'u')) == 0 then return 1 end
redis.call('DEL', DONE)  -- stale hints: the next one will mean every task is done
return 0
"""
)

SIZE: Final = (
    _PRELUDE
    + f"""
if redis.call('EXISTS', M) == 0 then return {GONE} end
return queued(num(redis.call('HGET', M, 'redeliver')))
"""
)

RENEW: Final = (
    _PRELUDE
    + f"""
-- ARGV: lease (ms), holder id, writer id, writer epoch, reader id, consumer, then the ids of
-- records this consumer holds (their idle time is reset: they are not handed to others)
if redis.call('EXISTS', M) == 0 then return {GONE} end
local now, lease = now_ms(), tonumber(ARGV[1])
local status = {OK}
if ARGV[2] ~= '' then
  redis.call('ZADD', H, now + lease, ARGV[2])
  hold_keys()
end
if ARGV[3] ~= '' then
  if redis.call('ZSCORE', W, ARGV[3]) or redis.call('HGET', M, 'epoch') == ARGV[4] then
    enter(W, ARGV[3], now + lease)
  else
    status = {FENCED}
  end
end
if ARGV[5] ~= '' then enter(R, ARGV[5], now + lease) end
for i = 7, #ARGV do
  local p = redis.call('XPENDING', S, G, ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[6] then
    redis.call('XCLAIM', S, G, ARGV[6], 0, ARGV[i], 'JUSTID')
  end
end
return status
"""
)

RELEASE: Final = (
    _PRELUDE
    + """
-- ARGV: holder id, writer id, reader id, consumer (forgotten if it holds nothing)
-- reply: 2 if this was the last holder of an unnamed queue (every key is deleted), else 1
if redis.call('EXISTS', M) == 0 then return 0 end
local now = now_ms()
if ARGV[2] ~= '' then
  redis.call('ZREM', W, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', W, '-inf', now)
  if redis.call('ZCARD', W) == 0 then
    hint(ITEMS, math.max(1, redis.call('ZCARD', R)))  -- readers check for the end now
    touch(ITEMS)
  end
end
if ARGV[3] ~= '' then
  redis.call('ZREM', R, ARGV[3])
  redis.call('ZREMRANGEBYSCORE', R, '-inf', now)
  if redis.call('ZCARD', R) == 0 then
    hint(SPACE, TOKENS)  -- writers waiting for room find out that nobody reads
    touch(SPACE)
  end
end
if ARGV[4] ~= '' and #redis.call('XPENDING', S, G, '-', '+', 1, ARGV[4]) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', S, G, ARGV[4])
end
if ARGV[1] ~= '' then
  redis.call('ZREM', H, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', H, '-inf', now)
  if redis.call('ZCARD', H) == 0 then
    redis.call('DEL', unpack(KEYS))
    return 2
  end
  hold_keys()
end
return 1
"""
)

TRANSIT: Final = (
    _PRELUDE
    + f"""
-- ARGV: transit id, ttl (ms): keeps an unnamed queue alive while a pickled handle travels
if redis.call('EXISTS', M) == 0 then return {GONE} end
if redis.call('PEXPIRETIME', M) > 0 then
  redis.call('ZADD', H, now_ms() + tonumber(ARGV[2]), ARGV[1])
  hold_keys()
end
return {OK}
"""
)

UNLINK: Final = """
-- every key; reply: 1 if the queue or channel existed
local existed = redis.call('EXISTS', KEYS[1])
redis.call('DEL', unpack(KEYS))
return existed
"""

WAKE: Final = """
-- KEYS[1]: a waiting caller's private wake list; ARGV[1]: ms it may live if nobody pops it.
-- Two tokens, as TAKE 'first' pushes: the BLPOP returns, and the TAKE 'second' behind it
-- takes nothing.
redis.call('LPUSH', KEYS[1], '1', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

ALLOW_OOM: Final = "#!lua flags=allow-oom\n"
"""Scripts that take, acknowledge, renew or release are declared runnable when the
server is out of memory (``maxmemory``): consumers must drain a full queue, leases must
not lapse, and a take that deleted records must not fail before answering. Only CREATE
and PUT add data, and those are refused then (NoSpace). (Redis 7.0 ran them without the
flag too, in the tests; the flag makes it a declared property. Redis >= 7.0, Valkey.)"""

ALL: Final = {
    "create": CREATE,
    "attach": ALLOW_OOM + ATTACH,
    "put": PUT,
    "take": ALLOW_OOM + TAKE,
    "requeue": ALLOW_OOM + REQUEUE,
    "done": ALLOW_OOM + DONE_SCRIPT,
    "joined": ALLOW_OOM + JOINED,
    "size": ALLOW_OOM + SIZE,
    "renew": ALLOW_OOM + RENEW,
    "release": ALLOW_OOM + RELEASE,
    "transit": ALLOW_OOM + TRANSIT,
    "unlink": ALLOW_OOM + UNLINK,
    "wake": ALLOW_OOM + WAKE,
}
"""Every script by name, as sent to the server."""

SHA: Final = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in ALL.items()}
"""Each script's SHA-1, the name ``EVALSHA`` knows it by."""
