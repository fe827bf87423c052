-- ROUTE GENERATION: read a route's generation (read-only).
--
-- KEYS[1] the route's generation counter.
-- Replies the generation, 0 when the route was never purged as a whole.
return tonumber(redis.call('GET', KEYS[1]) or '0')
