-- set_status: a sale's status on its preloaded sale hash, and its pauses (lib.lua
-- pause_fields): admitted buyers' windows do not run while the sale is paused.
--
-- KEYS[1] the sale hash   ARGV[1] status: active, paused or ended
-- Returns 1 when written, 0 when the hash does not exist (not preloaded: the preload copies
-- the status from Postgres). Idempotent: the same status again changes nothing.
local sale, status = KEYS[1], ARGV[1]
local was = redis.call('HGET', sale, 'status')
if not was then
  return 0
end
if was == status then
  return 1
end
local kept = redis.call('HMGET', sale, 'pauses', 'paused_at_ms')
redis.call('HSET', sale, 'status', status, unpack(pause_fields(was, kept, status, now_ms())))
return 1
