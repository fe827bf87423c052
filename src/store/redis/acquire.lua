-- ACQUIRE / PEEK / EARLY: answer HIT, STALE, PASS, LEAD, WAIT or EMPTY for one key, in one atomic
-- step.
--
-- KEYS[1] value, KEYS[2] lease hash, KEYS[3] pass marker, KEYS[4] fresh-until (one hash tag, so
-- one Cluster slot).
-- ARGV[1] token (32 hex digits; empty in peek mode)
-- ARGV[2] node (for status and debugging only)
-- ARGV[3] lease ttl in ms
-- ARGV[4] sliding ttl in ms, or 0 when the value's expiry is absolute
-- ARGV[5] slack in ms: a sliding value is touched only once its TTL fell below ttl - slack; in
--         early mode, how near the end of its freshness a value must be to be refreshed
-- ARGV[6] 'acquire' (may create the lease), 'peek' (never writes a lease) or 'early' (takes the
--         lease over a value that is still fresh but within ARGV[5] of its end, for an early
--         refresh; never over no value, and a value further from its end is a HIT)
-- ARGV[7] lease id (32 hex digits, a hash of the token; empty in peek mode): kept beside the
--         lease and told to every caller that waits on it, so that they can tell the events that
--         end this lease from forged ones
--
-- Replies: {'HIT', value, pttl} | {'STALE', value, pttl, 'LEAD', fence} |
-- {'STALE', value, pttl, 'WAIT', lease pttl, lease id} | {'STALE', value, pttl, 'IDLE'} |
-- {'PASS', pttl} | {'LEAD', fence} | {'WAIT', pttl, lease id} | {'EMPTY'}
-- The lease id is missing from a WAIT on a lease written without one.
-- A HIT's pttl is how long the value stays fresh; a STALE's how long it is still kept. A pttl of
-- -1 means the key has no expiry (written by something other than corral).
--
-- A value with a stale window has a fresh-until key beside it (the server's clock in ms at which
-- freshness ends, PX = the value's); a value without one is fresh for as long as it exists.

-- TIME below is non-deterministic, so the script must be replicated by its effects. That is the
-- default from Redis 5 on and the call is a no-op returning true on 7.x; it is kept for 3.2/4.x,
-- where it must come before the first write.
if redis.replicate_commands then
  redis.replicate_commands()
end

local mode = ARGV[6]

-- The server's clock in ms, and a fence: the clock in microseconds, built as a string so that no
-- digit is lost to Lua's doubles. Leases of one key never overlap (a new one is created only once
-- the old one is gone, by a later script run), so fences of one key grow as long as the server
-- clock does not step back (NTP step, failover to a replica with a skewed clock).
local function clock()
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local fence = now[1] .. string.format('%06d', tonumber(now[2]))
  local start_ms = now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
  return ms, fence, start_ms
end

local function create_lease()
  local _, fence, start_ms = clock()
  redis.call('HSET', KEYS[2], 'token', ARGV[1], 'fence', fence, 'node', ARGV[2], 'start', start_ms,
    'id', ARGV[7])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return fence
end

local value = redis.call('GET', KEYS[1])
if value then
  local pttl = redis.call('PTTL', KEYS[1])
  local fresh_until = redis.call('GET', KEYS[4])
  local fresh_left = pttl
  if fresh_until then
    local now_ms = clock()
    fresh_left = tonumber(fresh_until) - now_ms
  end
  local due = mode == 'early' and fresh_left >= 0 and fresh_left <= tonumber(ARGV[5])
  if not due and (not fresh_until or fresh_left > 0) then
    local ttl = tonumber(ARGV[4])
    -- Rewriting only the expiry (never the value) keeps a hot sliding key cheap; the slack
    -- throttles it to one PEXPIRE per slack interval. A value without expiry is left alone.
    if ttl > 0 and pttl >= 0 and pttl < ttl - tonumber(ARGV[5]) then
      redis.call('PEXPIRE', KEYS[1], ttl)
      pttl = ttl
      fresh_left = ttl
    end
    return {'HIT', value, fresh_left}
  end
  -- Stale (or refreshed early): the value stays; exactly one caller gets the lease to refresh it.
  local owner = redis.call('HGET', KEYS[2], 'token')
  if owner then
    if mode ~= 'peek' and owner == ARGV[1] then
      return {'STALE', value, pttl, 'LEAD', redis.call('HGET', KEYS[2], 'fence')}
    end
    return {'STALE', value, pttl, 'WAIT', redis.call('PTTL', KEYS[2]), redis.call('HGET', KEYS[2], 'id')}
  end
  if mode == 'peek' then
    return {'STALE', value, pttl, 'IDLE'}
  end
  return {'STALE', value, pttl, 'LEAD', create_lease()}
end

if mode == 'early' then
  return {'EMPTY'}
end

local pass = redis.call('PTTL', KEYS[3])
if pass ~= -2 then
  return {'PASS', pass}
end

local peek = mode ~= 'acquire'
local owner = redis.call('HGET', KEYS[2], 'token')
if owner then
  -- The caller's own lease: an acquire whose reply was lost to a client-side timeout created it,
  -- and the retry with the same token must lead, not wait on itself.
  if not peek and owner == ARGV[1] then
    return {'LEAD', redis.call('HGET', KEYS[2], 'fence')}
  end
  return {'WAIT', redis.call('PTTL', KEYS[2]), redis.call('HGET', KEYS[2], 'id')}
end

if peek then
  return {'EMPTY'}
end

return {'LEAD', create_lease()}
