-- lease: the admission pump's leader lease for one sale, with a fencing token.
--
-- KEYS: lease, fence (one sale slot)   ARGV[1] owner   ARGV[2] ttl ms   ARGV[3] acquire|release
-- acquire: returns the owner's fencing token (renewing its lease), a new token when the lease
--          was free (every new leader gets a larger one), or 0 when someone else holds it.
-- release: drops the lease if the owner holds it; returns 1 when dropped.
local lease, fence, owner = KEYS[1], KEYS[2], ARGV[1]
local current = redis.call('GET', lease)
local holder, token = nil, nil
if current then
  local at = string.find(current, SEP, 1, true)
  holder, token = string.sub(current, 1, at - 1), tonumber(string.sub(current, at + 1))
end
if ARGV[3] == 'release' then
  if holder == owner then
    redis.call('DEL', lease)
    return 1
  end
  return 0
end
if holder == owner then
  redis.call('PEXPIRE', lease, ARGV[2])
  return token
end
if holder then
  return 0
end
token = redis.call('INCR', fence)
redis.call('SET', lease, owner .. SEP .. token, 'PX', ARGV[2])
return token
