-- INDEXED PREFIX: the members of a route's path index whose path starts with a prefix
-- (read-only).
--
-- KEYS[1] the route's lexicographic set ('<path>\0<hex digest>' members, all scored 0).
-- ARGV[1] the path prefix, ARGV[2] most members answered.
-- Replies the members, in path order. '\255' sorts after every byte a request path can hold.
return redis.call('ZRANGEBYLEX', KEYS[1], '[' .. ARGV[1], '[' .. ARGV[1] .. '\255',
  'LIMIT', 0, tonumber(ARGV[2]))
