-- INDEX: record one key in a purge index (a route's paths, or one surrogate tag).
--
-- KEYS[1] sorted set: member -> expiry (server time, ms).
-- KEYS[2] (route indexes only) sorted set of the same members, all scored 0, read by prefix
--         with ZRANGEBYLEX.
-- ARGV[1] member ('<path>\0<hex digest>' for a route, '<hex digest>' for a tag)
-- ARGV[2] the entry's store ttl in ms
-- ARGV[3] most members kept; past it the members that expire soonest are forgotten.
-- Replies 1. Both sets live as long as their longest entry, so an index expires with its entries.

-- TIME is non-deterministic: replicate by effects (the default from Redis 5 on).
if redis.replicate_commands then
  redis.replicate_commands()
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local expires = now + tonumber(ARGV[2])
local lex = KEYS[2]

-- Drop a bounded batch of lapsed members on every write, so the sets do not fill with the dead.
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 64)
if #lapsed > 0 then
  redis.call('ZREM', KEYS[1], unpack(lapsed))
  if lex then
    redis.call('ZREM', lex, unpack(lapsed))
  end
end

local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not old or tonumber(old) < expires then
  redis.call('ZADD', KEYS[1], expires, ARGV[1])
end
if lex then
  redis.call('ZADD', lex, 0, ARGV[1])
end

local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
if over > 0 then
  local dropped = redis.call('ZPOPMIN', KEYS[1], over)
  if lex then
    for i = 1, #dropped, 2 do
      redis.call('ZREM', lex, dropped[i])
    end
  end
end

local longest = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #longest == 2 then
  local keep = math.max(tonumber(longest[2]) - now, 1)
  redis.call('PEXPIRE', KEYS[1], keep)
  if lex then
    redis.call('PEXPIRE', lex, keep)
  end
end
return 1
