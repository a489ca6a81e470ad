-- set_status: set the sale status (active | paused | ended) on one preloaded hash.
--
-- KEYS[1] a sale hash or a SKU meta hash   ARGV[1] status
-- Returns 1 when written, 0 when the hash does not exist (not preloaded: nothing to change).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
return 1
