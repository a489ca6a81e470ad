-- set_fields: write fields (a sale's status, its admission rate) on one preloaded hash.
--
-- KEYS[1] a sale hash or a SKU meta hash   ARGV field/value pairs
-- Returns 1 when written, 0 when the hash does not exist (not preloaded: nothing to change;
-- the preload copies the fields from Postgres).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
