-- scripts/bench: the wrk script for every configuration (wrk -t1 -c8 -s scripts/bench_wrk.lua).
--
-- Environment:
--   BENCH_HOST, BENCH_PATH        Host header and path (the policy allows exactly these)
--   BENCH_HEADERS                 extra headers, "name: value" separated by "\n"
--   BENCH_TOKEN                   a fixed bearer token (static request: wrk builds it once)
--   BENCH_TOKEN_FILE              a pool of tokens, one per line: a fresh token each request,
--                                 cycled in order (cold path, configuration (f))
--   BENCH_FRESH_TASK=1            a fresh x-agent-task each request (configuration (g): no
--                                 credential cache hit, no single-flight coalescing)
--   BENCH_METHOD                  request method (default GET)
--   BENCH_BODY_FILE               request body, read once (the MCP configurations (i), (j): a
--                                 1 KB JSON-RPC tools/call)
-- At the end, prints one line "BENCH_JSON {...}" with requests/s and latency percentiles (us).

local host = os.getenv("BENCH_HOST")
local path = os.getenv("BENCH_PATH") or "/"
local token = os.getenv("BENCH_TOKEN")
local token_file = os.getenv("BENCH_TOKEN_FILE")
local fresh_task = os.getenv("BENCH_FRESH_TASK") == "1"

local method = os.getenv("BENCH_METHOD") or "GET"
if method == "" then
   method = "GET"
end
wrk.method = method
wrk.path = path
local body_file = os.getenv("BENCH_BODY_FILE")
if body_file and body_file ~= "" then
   local f = assert(io.open(body_file, "rb"))
   wrk.body = f:read("*a")
   f:close()
end
if host and host ~= "" then
   wrk.headers["Host"] = host
end
for line in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^\n]+") do
   local name, value = string.match(line, "^%s*([^:]+):%s*(.-)%s*$")
   if name then
      wrk.headers[name] = value
   end
end
if token and token ~= "" then
   wrk.headers["authorization"] = "Bearer " .. token
end

if token_file and token_file ~= "" then
   local reqs, n, i = {}, 0, 0
   function init(args)
      for line in io.lines(token_file) do
         if #line > 0 then
            n = n + 1
            wrk.headers["authorization"] = "Bearer " .. line
            reqs[n] = wrk.format(method, path)
         end
      end
      if n == 0 then
         error("no tokens in " .. token_file)
      end
   end
   function request()
      i = i % n + 1
      return reqs[i]
   end
elseif fresh_task then
   local seq = 0
   local prefix = "T-" .. os.time() .. "-"
   function request()
      seq = seq + 1
      wrk.headers["x-agent-task"] = prefix .. seq
      return wrk.format(method, path)
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   local secs = summary.duration / 1e6
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_s":%.3f,"rps":%.1f,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\n',
      summary.requests, secs, summary.requests / secs,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
      e.connect, e.read, e.write, e.status, e.timeout))
end
