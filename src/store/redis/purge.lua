-- PURGE: remove value, lease and pass marker, and announce.
--
-- KEYS[1] value, KEYS[2] lease hash, KEYS[3] pass marker.
-- ARGV[1] '1' to announce, ARGV[2] channel, ARGV[3] event bytes.
-- Replies how many of the three keys existed. Deleting the lease makes the running build's
-- COMMIT come back lost.
local removed = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
-- Announced even when nothing was here: other processes' L1 caches may still hold a copy.
if ARGV[1] == '1' then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return removed
