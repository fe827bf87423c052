-- COMMIT of a revalidated value: the same body under a new head, rewritten on the server so the
-- body never crosses the network again. Only if the token still holds the lease, and only if the
-- stored value still starts with the head that was revalidated.
--
-- KEYS[1] value, KEYS[2] lease hash, KEYS[3] pass marker, KEYS[4] fresh-until.
-- ARGV[1] token, ARGV[2] old head bytes, ARGV[3] new head bytes, ARGV[4] value ttl in ms,
-- ARGV[5] '1' to announce, ARGV[6] channel, ARGV[7] event bytes,
-- ARGV[8] freshness in ms (below the value ttl when the value is kept past its freshness).
-- Replies 1 (done), 0 (lost; nothing written) or 2 (the stored value is not the revalidated one,
-- or is gone: nothing written, the caller commits the whole value instead).

-- TIME is non-deterministic: replicate by effects (see acquire.lua).
if redis.replicate_commands then
  redis.replicate_commands()
end

if redis.call('HGET', KEYS[2], 'token') ~= ARGV[1] then
  return 0
end
local old_len = #ARGV[2]
local stored_len = redis.call('STRLEN', KEYS[1])
if stored_len < old_len or redis.call('GETRANGE', KEYS[1], 0, old_len - 1) ~= ARGV[2] then
  return 2
end
if #ARGV[3] == old_len then
  -- Same length: overwrite the head where it lies; the body is not even copied.
  redis.call('SETRANGE', KEYS[1], 0, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
else
  local body = redis.call('GETRANGE', KEYS[1], old_len, -1)
  redis.call('SET', KEYS[1], ARGV[3] .. body, 'PX', ARGV[4])
end
local fresh = tonumber(ARGV[8])
if fresh and fresh < tonumber(ARGV[4]) then
  local now = redis.call('TIME')
  local until_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + fresh
  redis.call('SET', KEYS[4], string.format('%.0f', until_ms), 'PX', ARGV[4])
else
  redis.call('DEL', KEYS[4])
end
redis.call('DEL', KEYS[2], KEYS[3])
if ARGV[5] == '1' then
  redis.call('PUBLISH', ARGV[6], ARGV[7])
end
return 1
