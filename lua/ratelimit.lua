-- ratelimit: GCRA (the generic cell rate algorithm) for one subject, judged by Redis TIME.
--
-- KEYS[1] the subject's key   ARGV[1] emission interval (us)   ARGV[2] burst tolerance (us)
-- Returns 0 when allowed (and records it), else the microseconds until a request would be.
-- One key holds one number (the theoretical arrival time) and expires when it is in the past.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then
  tat = now
end
local wait = tat - tolerance - now
if wait > 0 then
  return math.ceil(wait)
end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', next_tat),
  'PX', math.ceil((next_tat - now) / 1000) + 1)
return 0
