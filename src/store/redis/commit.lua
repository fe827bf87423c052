-- COMMIT: store the value, end the lease and announce, only if the token still holds the lease.
--
-- KEYS[1] value, KEYS[2] lease hash, KEYS[3] pass marker.
-- ARGV[1] token, ARGV[2] value bytes, ARGV[3] value ttl in ms,
-- ARGV[4] '1' to announce, ARGV[5] channel, ARGV[6] event bytes.
-- Replies 1 (done) or 0 (lost; nothing written, so a purge during the build is never overwritten).
if redis.call('HGET', KEYS[2], 'token') ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
-- A fresh value supersedes any pass marker left from an earlier flight.
redis.call('DEL', KEYS[2], KEYS[3])
if ARGV[4] == '1' then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
return 1
