-- INDEXED TAG: the keys a surrogate tag's index holds that have not expired (read-only).
--
-- KEYS[1] the tag's set: hex digest -> expiry (server time, ms).
-- ARGV[1] most members answered.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'LIMIT', 0, tonumber(ARGV[1]))
