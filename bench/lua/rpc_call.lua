-- rpc_call.lua: a wrk script that posts one valid /rpc/call body on every request.
--
--   wrk -t2 -c64 -d10s -s bench/lua/rpc_call.lua URL/rpc/call -- BODY_FILE [statuses]
--
-- BODY_FILE holds the JSON body (the benchmark that runs wrk writes it). Every request is the
-- same, over keep-alive connections, so wrk builds it once. With "statuses",
-- a response hook counts the replies per HTTP status. The hook costs wrk some
-- CPU, so the throughput runs leave it off and use summary.errors.status, which
-- is wrk's count of replies with a status of 400 or more.
--
-- The done hook prints one line, "BENCH_JSON {...}", for bench/wrk.py to parse:
-- requests, duration, socket errors, latency percentiles in microseconds (p99.9
-- too, which wrk's own --latency table lacks), and the status counts if asked.

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   local file = assert(io.open(args[1], "rb"), "cannot open body file " .. tostring(args[1]))
   wrk.body = file:read("*a")
   file:close()
   if args[2] == "statuses" then
      statuses = {}
      response = function(status, headers, body)
         statuses[status] = (statuses[status] or 0) + 1
      end
   end
end

local function statuses_json()
   local merged = {}
   for _, thread in ipairs(threads) do
      local counts = thread:get("statuses")
      if counts then
         for status, n in pairs(counts) do
            merged[status] = (merged[status] or 0) + n
         end
      end
   end
   local parts = {}
   for status, n in pairs(merged) do
      table.insert(parts, string.format('"%d": %d', status, n))
   end
   return "{" .. table.concat(parts, ", ") .. "}"
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, '
         .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
         .. '"latency_us": {"p50": %d, "p75": %d, "p90": %d, "p99": %d, "p99.9": %d, '
         .. '"max": %d, "mean": %.1f}, "statuses": %s}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(75), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean,
      statuses_json()))
end
