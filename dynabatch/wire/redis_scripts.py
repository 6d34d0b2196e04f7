"""Lua scripts of the Redis backend: the steps that must be atomic.

Keys are built inside the scripts from the prefix (ARGV[1]): the backend targets one Redis
server (or a primary with replicas), not Redis Cluster.
"""

# Move waiting items to a worker's stream, each only if it is still waiting and the worker is
# alive (a dead worker's stream is reclaimed by RECLAIM; nothing must be added to it after that).
# KEYS: waiting zset, assign stream, workers zset. ARGV: prefix.."req:", worker, now_ms, (id, item)*
ASSIGN = """
local alive = redis.call('ZSCORE', KEYS[3], ARGV[2])
if (not alive) or tonumber(alive) < tonumber(ARGV[3]) then return {} end
local moved = {}
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('ZREM', KEYS[1], id) == 1 then
    redis.call('HSET', ARGV[1] .. id, 'item', ARGV[i + 1], 'state', 'assigned', 'worker', ARGV[2])
    redis.call('XADD', KEYS[2], '*', 'id', id, 'item', ARGV[i + 1])
    moved[#moved + 1] = id
  end
end
return moved
"""

# Take every worker whose heartbeat expired off the workers set and return what its assign
# stream still holds (assigned, not acknowledged = not finished), deleting its keys. Atomic, so
# of several schedulers exactly one reclaims each dead worker.
# KEYS: workers zset. ARGV: prefix, now_ms. Returns a flat list: worker, item bytes, ...
RECLAIM = """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local out = {}
for _, w in ipairs(dead) do
  redis.call('ZREM', KEYS[1], w)
  local stream = ARGV[1] .. 'assign:' .. w
  if redis.call('TYPE', stream).ok == 'stream' then
    for _, entry in ipairs(redis.call('XRANGE', stream, '-', '+')) do
      local fields, item = entry[2], ''
      for j = 1, #fields - 1, 2 do
        if fields[j] == 'item' then item = fields[j + 1] end
      end
      out[#out + 1] = w
      out[#out + 1] = item
    end
  end
  redis.call('DEL', stream, ARGV[1] .. 'ctl:' .. w, ARGV[1] .. 'worker:' .. w)
end
return out
"""

# The live workers' feedback in one round trip (a worker whose heartbeat expired is left out;
# its key may still exist until RECLAIM deletes it). KEYS: workers zset. ARGV: prefix.."worker:",
# now_ms. Returns a flat list: worker id, feedback bytes (false when the key is gone), ...
LIVE_WORKERS = """
local out = {}
for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[2], '+inf')) do
  out[#out + 1] = w
  out[#out + 1] = redis.call('GET', ARGV[1] .. w)
end
return out
"""

# The queue's epoch: a random token written once per Redis dataset. When it changes, the data
# was lost (Redis restarted without persistence) and every request in flight with it.
# KEYS: epoch key. ARGV: a fresh token (used only when none exists).
EPOCH = """
local e = redis.call('GET', KEYS[1])
if not e then
  redis.call('SET', KEYS[1], ARGV[1])
  e = ARGV[1]
end
return e
"""
