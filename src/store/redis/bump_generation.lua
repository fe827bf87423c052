-- BUMP GENERATION: purge a whole route by adding one to its generation, and announce it.
--
-- KEYS[1] the route's generation counter.
-- ARGV[1] '1' to announce, ARGV[2] channel, ARGV[3] the GENERATION event's head (the decimal
-- generation is appended to it here, since only the script knows the new number).
-- Replies the new generation. The counter never expires: a route that forgot its generation
-- would key by an old one again.
local generation = redis.call('INCR', KEYS[1])
if ARGV[1] == '1' then
  redis.call('PUBLISH', ARGV[2], ARGV[3] .. tostring(generation))
end
return generation
