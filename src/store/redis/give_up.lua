-- GIVEUP (uncacheable answer): end the lease, leave a pass marker and announce, only for the owner.
--
-- KEYS[1] lease hash, KEYS[2] pass marker, KEYS[3] value, KEYS[4] fresh-until.
-- ARGV[1] token, ARGV[2] pass ttl in ms, ARGV[3] '1' to announce, ARGV[4] channel, ARGV[5] event.
-- Replies 1 (done) or 0 (lost).
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 0
end
-- A refresh of a stale value that came back uncacheable takes the stale value with it.
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
if ARGV[3] == '1' then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
end
return 1
