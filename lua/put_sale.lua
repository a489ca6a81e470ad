-- put_sale: replace the sale-level configuration hash with the given field/value pairs.
--
-- KEYS[1] sale hash   KEYS[2] queue hash
-- ARGV[1] '1' to open the waiting room (the sale's first preload), then field/value pairs.
-- The waiting room only works on a queue hash marked `live`. The first preload marks it; a
-- queue Redis lost later stays closed (joins answer unavailable) until the reconciler
-- restores its counters from what gateways and pumps have seen, so no position is handed out
-- twice. The sale's pauses (lib.lua pause_fields) are Redis's own record and carry over, as
-- the status written says (a pause found here, or begun). Returns the number of fields given.
local was = redis.call('HGET', KEYS[1], 'status')
local kept = redis.call('HMGET', KEYS[1], 'pauses', 'paused_at_ms')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
local status = redis.call('HGET', KEYS[1], 'status')
redis.call('HSET', KEYS[1], unpack(pause_fields(was, kept, status, now_ms())))
if ARGV[1] == '1' then
  redis.call('HSETNX', KEYS[2], 'live', 1)
end
return (#ARGV - 1) / 2
