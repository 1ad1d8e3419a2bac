-- wrk script for bench_webhook.py: POST /sms with pre-signed Twilio forms.
--
-- The bodies file (path in env SMSBATCH_BENCH_BODIES) has one request per line:
--   <X-Twilio-Signature> <form-encoded body>
-- Thread i of n sends lines i, i+n, i+2n, ... once each, so every request carries a
-- distinct MessageSid. When a thread runs out it stops itself (its last request is
-- a harmless GET /health, not counted). done() prints one JSON line with the counts
-- and latency percentiles for the Python side to parse. Note: wrk calls request() once
-- on thread 0 before starting, to check the script; that body is counted but never sent.

local threads = {}
local counter = 0

function setup(thread)
   thread:set("tid", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

function init(args)
   local nthreads = tonumber(os.getenv("SMSBATCH_BENCH_THREADS"))
   local path = os.getenv("SMSBATCH_BENCH_BODIES")
   reqs = {}
   local i = 0
   for line in io.lines(path) do
      if i % nthreads == tid then
         local sp = string.find(line, " ", 1, true)
         local sig, body = string.sub(line, 1, sp - 1), string.sub(line, sp + 1)
         reqs[#reqs + 1] = wrk.format("POST", "/sms", {
            ["Host"] = "127.0.0.1",
            ["Content-Type"] = "application/x-www-form-urlencoded",
            ["X-Twilio-Signature"] = sig,
         }, body)
      end
      i = i + 1
   end
   nreq = #reqs
   sent = 0
   exhausted = 0
   health = wrk.format("GET", "/health")
end

function request()
   if sent < nreq then
      sent = sent + 1
      return reqs[sent]
   end
   if exhausted == 0 then
      exhausted = 1
      wrk.thread:stop()
   end
   return health
end

function done(summary, latency, requests)
   local total_sent, total_exhausted, per_thread = 0, 0, {}
   for _, t in ipairs(threads) do
      total_sent = total_sent + t:get("sent")
      total_exhausted = total_exhausted + t:get("exhausted")
      per_thread[#per_thread + 1] = tostring(t:get("sent"))
   end
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"sent": %d, "per_thread": [' .. table.concat(per_thread, ",") .. '],'
      .. ' "exhausted_threads": %d, "completed": %d, "duration_us": %d,'
      .. ' "non2xx": %d, "err_connect": %d, "err_read": %d, "err_write": %d, "err_timeout": %d,'
      .. ' "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %f}\n',
      total_sent, total_exhausted, summary.requests, summary.duration, e.status, e.connect, e.read,
      e.write, e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end
