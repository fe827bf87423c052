-- RENEW: extend the lease, but only for its owner.
--
-- KEYS[1] lease hash. ARGV[1] token, ARGV[2] lease ttl in ms.
-- Replies 1 (held) or 0 (lost: expired, taken over or purged).
-- Idempotent: a retry after a client-side timeout just sets the same expiry again.
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
