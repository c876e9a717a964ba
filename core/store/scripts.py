"""Every Lua script of the store, in one place: each runs atomically in Redis, so a check and the
writes it guards cannot be split by another client. The modules that run them say when."""

# Runs the commands (a JSON list of [command, key, args...]) only while the job's hash exists.
IF_JOB_EXISTS = """
if redis.call('exists', KEYS[1]) == 0 then return false end
local out
for _, cmd in ipairs(cjson.decode(ARGV[1])) do out = redis.call(unpack(cmd)) end
return out
"""


# Fencing. Every attempt at a job takes a token, HINCRBY job.fence, in the same script that sets
# its lease: tokens only grow, and the newest attempt holds the largest. A runner's writes run in
# FENCED: one script that compares the job's token with the writer's and then does the writes,
# so nothing can slip in between (a deleted job has no token: its late writes are refused too).
ACQUIRE = """
if redis.call('exists', KEYS[2]) == 0 then return 0 end
if not redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('hdel', KEYS[2], 'requeued_at')
return redis.call('hincrby', KEYS[2], 'fence', 1)
"""
FENCED = """
if redis.call('hget', KEYS[1], 'fence') ~= ARGV[1] then return false end
local out = {}
for i, op in ipairs(cjson.decode(ARGV[2])) do
  local args = {}
  for j = 3, #op do args[#args + 1] = op[j] end
  out[i] = redis.call(op[1], KEYS[op[2]], unpack(args))
end
return out
"""


# Renew / release a lease only while the caller's token still holds it (leases.Lease).
RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)
RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


# Marks an active job whose lease is gone as requeued, and logs why (leases.claim_orphan).
CLAIM_ORPHAN = """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
local status = redis.call('hget', KEYS[2], 'status')
if status ~= 'validating' and status ~= 'running' then return 0 end
local at = tonumber(redis.call('hget', KEYS[2], 'requeued_at') or '') or 0
if tonumber(ARGV[1]) - at < tonumber(ARGV[2]) then return 0 end
redis.call('hset', KEYS[2], 'requeued_at', ARGV[1], 'updated_at', ARGV[1])
redis.call('xadd', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
return 1
"""
