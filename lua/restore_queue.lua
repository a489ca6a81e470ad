-- restore_queue: bring a sale's waiting room back after Redis lost it, from the highest
-- counters gateways and pumps have seen (Postgres queue_marks), and reopen it.
--
-- KEYS: sale, queue, steps, claims, lease, fence (one sale slot)
-- ARGV[1] tail   ARGV[2] serving   ARGV[3] pre   ARGV[4] cutoff (-1: none)
-- ARGV[5] sealed (0|1)   ARGV[6] shuffled (0|1)   ARGV[7] sold_out (0|1)
-- ARGV[8..] claims to restore, as "position \31 key \31 fingerprint" members
-- Counters only move the safe way from what Redis has now: tail, serving and pre up (no
-- position handed out twice, no admitted buyer un-admitted), the cutoff down, flags on.
-- Positions up to serving get an admission step at the current time if none covers them,
-- so an admitted buyer's window starts again rather than being lost; 'restored_ms' tells the
-- gateways to read the steps again from the start. The pump lease is dropped and the fencing
-- token moved past anything handed out before the loss (Redis time in ms), so a pump that
-- led before it can never pass the fence with an old token. Returns {tail, serving, cutoff}
-- as restored.
local sale, queue, steps, claims, lease, fence = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5],
  KEYS[6]
local now = now_ms()
local q = redis.call('HMGET', queue, 'tail', 'serving', 'pre', 'cutoff', 'sealed', 'shuffled',
  'sold_out')
local function up(current, wanted)
  return math.max(tonumber(current or '0'), tonumber(wanted))
end
local tail = up(q[1], ARGV[1])
local serving = math.min(up(q[2], ARGV[2]), tail)
local pre = up(q[3], ARGV[3])
local cutoff = tonumber(q[4] or '-1')
local offered = tonumber(ARGV[4])
if offered >= 0 and (cutoff < 0 or offered < cutoff) then
  cutoff = offered
end
local fields = {'live', 1, 'tail', tail, 'serving', serving, 'pre', pre, 'cutoff', cutoff,
  'restored_ms', now}
for i, name in ipairs({'sealed', 'shuffled', 'sold_out'}) do
  if ARGV[4 + i] == '1' or q[4 + i] == '1' then
    fields[#fields + 1] = name
    fields[#fields + 1] = 1
  end
end
redis.call('HSET', queue, unpack(fields))
if serving > 0 then
  local last = redis.call('ZRANGE', steps, -1, -1, 'WITHSCORES')
  if #last == 0 or tonumber(last[2]) < serving then
    redis.call('ZADD', steps, serving, serving .. ':' .. now)
  end
end
redis.call('DEL', lease)
if tonumber(redis.call('GET', fence) or '0') < now then
  redis.call('SET', fence, now)
end
for i = 8, #ARGV do
  local member = ARGV[i]
  local position = string.match(member, '^(%d+)')
  -- One claim per position: a position already claimed again since the loss keeps its own.
  if position and #redis.call('ZRANGEBYSCORE', claims, position, position, 'LIMIT', 0, 1) == 0 then
    redis.call('ZADD', claims, tonumber(position), member)
  end
end
return {tail, serving, cutoff}
