-- Algorithm 2 (SPEC 3) for one image of one source, run atomically by Redis (EVALSHA).
-- The same rules as twostream.core.reputation.ledger.ReputationLedger.observe; the source hash's
-- fields are described in twostream/online/redis_store.py.
-- KEYS: source hash, sources zset, blacklist zset, image answer key
-- ARGV: source (its Algorithm-2 key), rejected (0/1), cap, threshold, step_up, step_down,
--       answer ttl (s), forget_default (0/1: a source back at cc 0 and not listed keeps no entry)
-- Returns: blocked (0/1), cc, listed (0/1), the source's sequence number, the image's timestamp.
local done = redis.call('GET', KEYS[4])
if done then
  local out = {}
  for v in string.gmatch(done, '%S+') do out[#out + 1] = v end
  return out
end
local h = KEYS[1]
local st = redis.call('HMGET', h, 'cc', 'bl', 'images', 'last_seen', 'intervals')
local cc = tonumber(st[1]) or 0
local listed = st[2] == '1'
local images = (tonumber(st[3]) or 0) + 1
local last = tonumber(st[4])
local intervals = st[5] or ''
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
if last and now <= last then now = last + math.max(1e-6, math.abs(last) * 4e-16) end
local ts = string.format('%.17g', now)
local rejected = ARGV[2] == '1'
if rejected then
  cc = math.min(cc + tonumber(ARGV[5]), tonumber(ARGV[3]))
  redis.call('HINCRBY', h, 'rejected', 1)
else
  cc = math.max(cc - tonumber(ARGV[6]), 0)
end
local blocked = false
if listed then
  if cc == 0 then
    listed = false
    intervals = intervals .. ',' .. ts
    redis.call('ZREM', KEYS[3], ARGV[1])
  else
    blocked = true
  end
elseif cc >= tonumber(ARGV[4]) then
  listed = true
  blocked = true
  if intervals == '' then intervals = ts else intervals = intervals .. ';' .. ts end
  redis.call('HINCRBY', h, 'times_blacklisted', 1)
  redis.call('ZADD', KEYS[3], 0, ARGV[1])
end
if ARGV[8] == '1' and cc == 0 and not listed then
  redis.call('DEL', h)
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  if blocked then redis.call('HINCRBY', h, 'blocked', 1) end
  redis.call('HSETNX', h, 'first_seen', ts)
  redis.call('HSET', h, 'cc', string.format('%d', cc), 'bl', listed and '1' or '0',
             'images', string.format('%d', images), 'last_seen', ts, 'intervals', intervals)
  redis.call('ZADD', KEYS[2], 0, ARGV[1])
end
local out = {blocked and '1' or '0', string.format('%d', cc), listed and '1' or '0',
             string.format('%d', images), ts}
redis.call('SET', KEYS[4], table.concat(out, ' '), 'EX', tonumber(ARGV[7]))
return out
