-- DISCARD: remove the value only if it is still exactly the bytes the caller found bad, so that a
-- good value committed in between is never thrown away.
--
-- KEYS[1] value. ARGV[1] the bytes. Replies 1 (removed) or 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
