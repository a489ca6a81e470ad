-- advance: publish one admission-pump step, fenced by the leader's token.
--
-- KEYS: sale, queue, steps, fence (one sale slot)
-- ARGV[1] fencing token   ARGV[2] serving (admit positions up to this)   ARGV[3] cutoff
-- ARGV[4] sold_out (0|1)  then field/value pairs published as they are (rates, no-show, ...)
-- The serving position only moves forward, never past the tail; the cutoff (the last
-- position that may ever be admitted) only moves back; sold_out only turns on. So a status a
-- gateway derived from older counters is never more pessimistic than the truth.
-- Returns {serving, cutoff (-1: none yet), tail, now_ms}, {-1} when fenced out, or {-2} when
-- the waiting room is not live (Redis lost it; the reconciler restores it).
local sale, queue, steps, fence = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('GET', fence) ~= ARGV[1] then
  return {-1}
end
if redis.call('HEXISTS', queue, 'live') == 0 then
  return {-2}
end
local now = now_ms()
local tail = seal_prequeue(queue, tonumber(redis.call('HGET', sale, 'starts_at_ms') or now), now)
local q = redis.call('HMGET', queue, 'serving', 'cutoff', 'sold_out', 'shuffled')
local serving = tonumber(q[1] or '0')
local cutoff = tonumber(q[2] or '-1')
local wanted = tonumber(ARGV[2])
local offered = tonumber(ARGV[3])
if offered >= 0 and (cutoff < 0 or offered < cutoff) then
  cutoff = offered
end
-- Pre-queue positions are admitted only once the shuffle has assigned them.
if tail and q[4] == '1' and wanted > serving then
  local upto = math.min(wanted, tail)
  if cutoff >= 0 then
    upto = math.min(upto, cutoff)
  end
  if upto > serving then
    serving = upto
    redis.call('ZADD', steps, serving, serving .. ':' .. now)
  end
end
local fields = {'serving', serving, 'cutoff', cutoff, 'beat_ms', now}
if ARGV[4] == '1' or q[3] == '1' then
  fields[#fields + 1] = 'sold_out'
  fields[#fields + 1] = 1
  if q[3] ~= '1' then  -- the moment the sale sold out, for the operators' live page
    fields[#fields + 1] = 'sold_out_ms'
    fields[#fields + 1] = now
  end
end
for i = 5, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
redis.call('HSET', queue, unpack(fields))
return {serving, cutoff, tail or 0, now}
