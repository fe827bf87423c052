-- ACQUIRE / PEEK: answer HIT, PASS, LEAD, WAIT or EMPTY for one key, in one atomic step.
--
-- KEYS[1] value, KEYS[2] lease hash, KEYS[3] pass marker (one hash tag, so one Cluster slot).
-- ARGV[1] token (32 hex digits; empty in peek mode)
-- ARGV[2] node (for status and debugging only)
-- ARGV[3] lease ttl in ms
-- ARGV[4] sliding ttl in ms, or 0 when the value's expiry is absolute
-- ARGV[5] slack in ms: a sliding value is touched only once its TTL fell below ttl - slack
-- ARGV[6] 'acquire' (may create the lease) or 'peek' (never writes a lease)
--
-- Replies: {'HIT', value, pttl} | {'PASS', pttl} | {'LEAD', fence} | {'WAIT', pttl} | {'EMPTY'}
-- A pttl of -1 means the key has no expiry (written by something other than corral).

-- TIME below is non-deterministic, so the script must be replicated by its effects. That is the
-- default from Redis 5 on and the call is a no-op returning true on 7.x; it is kept for 3.2/4.x,
-- where it must come before the first write.
if redis.replicate_commands then
  redis.replicate_commands()
end

local value = redis.call('GET', KEYS[1])
if value then
  local pttl = redis.call('PTTL', KEYS[1])
  local ttl = tonumber(ARGV[4])
  -- Rewriting only the expiry (never the value) keeps a hot sliding key cheap; the slack
  -- throttles it to one PEXPIRE per slack interval. A value without expiry is left alone.
  if ttl > 0 and pttl >= 0 and pttl < ttl - tonumber(ARGV[5]) then
    redis.call('PEXPIRE', KEYS[1], ttl)
    pttl = ttl
  end
  return {'HIT', value, pttl}
end

local pass = redis.call('PTTL', KEYS[3])
if pass ~= -2 then
  return {'PASS', pass}
end

local peek = ARGV[6] ~= 'acquire'
local owner = redis.call('HGET', KEYS[2], 'token')
if owner then
  -- The caller's own lease: an acquire whose reply was lost to a client-side timeout created it,
  -- and the retry with the same token must lead, not wait on itself.
  if not peek and owner == ARGV[1] then
    return {'LEAD', redis.call('HGET', KEYS[2], 'fence')}
  end
  return {'WAIT', redis.call('PTTL', KEYS[2])}
end

if peek then
  return {'EMPTY'}
end

-- The fence is the server's clock in microseconds, built as a string so that no digit is lost to
-- Lua's doubles. Leases of one key never overlap (a new one is created only once the old one is
-- gone, by a later script run), so fences of one key grow as long as the server clock does not
-- step back (NTP step, failover to a replica with a skewed clock).
local now = redis.call('TIME')
local fence = now[1] .. string.format('%06d', tonumber(now[2]))
local start_ms = now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
redis.call('HSET', KEYS[2], 'token', ARGV[1], 'fence', fence, 'node', ARGV[2], 'start', start_ms)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {'LEAD', fence}
