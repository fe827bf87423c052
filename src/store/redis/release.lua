-- RELEASE (failed or abandoned flight): end the lease and announce, only for its owner.
--
-- KEYS[1] lease hash. ARGV[1] token, ARGV[2] '1' to announce, ARGV[3] channel, ARGV[4] event bytes.
-- Replies 1 (done) or 0 (lost).
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
if ARGV[2] == '1' then
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return 1
