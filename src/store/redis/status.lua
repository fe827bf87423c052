-- STATUS: read-only view of one key, in the same precedence as ACQUIRE; never touches a TTL.
--
-- KEYS[1] value, KEYS[2] lease hash, KEYS[3] pass marker.
-- Replies {'EXISTS', pttl} | {'PASS', pttl} | {'PENDING', pttl} | {'EMPTY'}; pttl -1 = no expiry.
local pttl = redis.call('PTTL', KEYS[1])
if pttl ~= -2 then
  return {'EXISTS', pttl}
end
pttl = redis.call('PTTL', KEYS[3])
if pttl ~= -2 then
  return {'PASS', pttl}
end
pttl = redis.call('PTTL', KEYS[2])
if pttl ~= -2 then
  return {'PENDING', pttl}
end
return {'EMPTY'}
