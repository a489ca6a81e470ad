-- assign: write pre-queue positions computed by the seeded shuffle, fenced by the leader's token.
--
-- KEYS: queue, members, fence (one sale slot)
-- ARGV[1] fencing token   ARGV[2] 1 when this is the last chunk   ARGV[3..] buyer, position...
-- Idempotent: the shuffle is deterministic, so a new leader rewriting a chunk writes the same.
-- Returns 1, or -1 when fenced out.
local queue, members, fence = KEYS[1], KEYS[2], KEYS[3]
if redis.call('GET', fence) ~= ARGV[1] then
  return -1
end
if #ARGV > 2 then
  redis.call('HSET', members, unpack(ARGV, 3))
end
if ARGV[2] == '1' then
  redis.call('HSET', queue, 'shuffled', 1)
end
return 1
