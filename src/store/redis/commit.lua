-- COMMIT: store the value, end the lease and announce, only if the token still holds the lease.
--
-- KEYS[1] value, KEYS[2] lease hash, KEYS[3] pass marker, KEYS[4] fresh-until.
-- ARGV[1] token, ARGV[2] value bytes, ARGV[3] value ttl in ms,
-- ARGV[4] '1' to announce, ARGV[5] channel, ARGV[6] event bytes,
-- ARGV[7] freshness in ms (below the value ttl when the value has a stale window).
-- Replies 1 (done) or 0 (lost; nothing written, so a purge during the build is never overwritten).

-- TIME is non-deterministic: replicate by effects (see acquire.lua).
if redis.replicate_commands then
  redis.replicate_commands()
end

if redis.call('HGET', KEYS[2], 'token') ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
local fresh = tonumber(ARGV[7])
if fresh and fresh < tonumber(ARGV[3]) then
  -- Freshness ends on the server's clock, so every replica agrees on when the value goes stale.
  local now = redis.call('TIME')
  local until_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + fresh
  redis.call('SET', KEYS[4], string.format('%.0f', until_ms), 'PX', ARGV[3])
else
  redis.call('DEL', KEYS[4])
end
-- A fresh value supersedes any pass marker left from an earlier flight.
redis.call('DEL', KEYS[2], KEYS[3])
if ARGV[4] == '1' then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
return 1
