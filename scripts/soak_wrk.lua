-- scripts/soak: the wrk script (wrk -tT -cC -d<long> -s scripts/soak_wrk.lua), driven by
-- scripts/soak_run.py through the environment:
--
--   SOAK_TOKENS        "<subject index> <JWT-SVID>" per line (soak-fixture's tokens.txt); each
--                      thread starts at its own offset and cycles through all of them
--   SOAK_TASKS         the task file the driver rewrites (atomically) as tasks churn:
--                        gen <n>
--                        chain <D's Txn-Token for group 0's current task, or ->
--                        task <group> <current task> <previous task, ended, or ->
--                      re-read every SOAK_RELOAD requests per thread (default 500)
--   SOAK_LIMIT         requests per thread; the thread stops after that many answers
--   SOAK_HOST, SOAK_MCP_HOST, SOAK_MCP_BODY_HOST, SOAK_MCP_PATH, SOAK_INTENT, SOAK_MCP_INTENT,
--   SOAK_WRONG_INTENT, SOAK_TOOL, SOAK_DENIED_TOOL, SOAK_SVID_D (D's SVID), SOAK_BAD (an
--   expired SVID)
--
-- The mix, by request number modulo 100 (tokens advance on every request but the delegated one):
--   0-69, 97-99  GET /tickets/<n> as the token's agent, its group's current task   -> allow
--   70-79        MCP tools/call get_ticket, header path (mcp.body when_needed)      -> allow
--   80-84        the same on the body path (mcp.body always: the body is parsed)    -> allow
--   85-86        MCP tools/call delete_ticket (not in the intent)                   -> deny
--   87-89        agent D at the end of agent 0 -> B -> D, with the Txn-Token        -> allow
--   90-93        the group's previous task (ended at the minter)        -> deny task_revoked
--   94-95        an intent that does not cover the route                           -> deny
--   96           an expired SVID                                                    -> 401
-- At the end, prints one line "SOAK_JSON {...}": requests, duration, latency, socket errors,
-- and the answers by HTTP status.

local tokens_file = os.getenv("SOAK_TOKENS")
local tasks_file = os.getenv("SOAK_TASKS")
local limit = tonumber(os.getenv("SOAK_LIMIT") or "0") or 0
local reload_every = tonumber(os.getenv("SOAK_RELOAD") or "500") or 500
local host = os.getenv("SOAK_HOST") or "tickets.internal"
local mcp_host = os.getenv("SOAK_MCP_HOST") or "mcp.internal"
local mcp_body_host = os.getenv("SOAK_MCP_BODY_HOST") or "mcp-body.internal"
local mcp_path = os.getenv("SOAK_MCP_PATH") or "/mcp"
local intent = os.getenv("SOAK_INTENT") or "ticket.read"
local mcp_intent = os.getenv("SOAK_MCP_INTENT") or "ticket.triage"
local wrong_intent = os.getenv("SOAK_WRONG_INTENT") or "customer.lookup"
local tool = os.getenv("SOAK_TOOL") or "get_ticket"
local denied_tool = os.getenv("SOAK_DENIED_TOOL") or "delete_ticket"
local svid_d = os.getenv("SOAK_SVID_D") or ""
local bad = os.getenv("SOAK_BAD") or ""

-- ------------------------------------------------------------------ main thread

local threads = {}
local thread_seq = 0

function setup(thread)
   thread:set("id", thread_seq)
   thread_seq = thread_seq + 1
   table.insert(threads, thread)
end

-- ------------------------------------------------------------------ worker threads

local toks, subj, ntok = {}, {}, 0
local tasks_cur, tasks_prev, chain = {}, {}, nil
local seq, pos, answered = 0, 0, 0
statuses = {}

local function load_tasks()
   local f = io.open(tasks_file, "r")
   if not f then
      return
   end
   local cur, prev, ch = {}, {}, nil
   for line in f:lines() do
      local g, c, p = string.match(line, "^task (%d+) (%S+) (%S+)$")
      if g then
         cur[tonumber(g)] = c
         prev[tonumber(g)] = p
      else
         local t = string.match(line, "^chain (%S+)$")
         if t and t ~= "-" then
            ch = t
         end
      end
   end
   f:close()
   if next(cur) ~= nil then
      tasks_cur, tasks_prev, chain = cur, prev, ch
   end
end

function init(args)
   for line in io.lines(tokens_file) do
      local s, t = string.match(line, "^(%d+) (%S+)$")
      if s then
         ntok = ntok + 1
         toks[ntok] = t
         subj[ntok] = math.floor(tonumber(s) / 16)
      end
   end
   if ntok == 0 then
      error("no tokens in " .. tostring(tokens_file))
   end
   -- Threads start far apart in the cycle, so they do not send the same token together.
   pos = math.floor((id or 0) * ntok / 7) % ntok
   load_tasks()
end

local function request_text(method, h, path, headers, body)
   local t = { method, " ", path, " HTTP/1.1\r\nHost: ", h, "\r\n" }
   for i = 1, #headers, 2 do
      t[#t + 1] = headers[i]
      t[#t + 1] = ": "
      t[#t + 1] = headers[i + 1]
      t[#t + 1] = "\r\n"
   end
   if body then
      t[#t + 1] = "content-type: application/json\r\ncontent-length: " .. #body .. "\r\n\r\n"
      t[#t + 1] = body
   else
      t[#t + 1] = "\r\n"
   end
   return table.concat(t)
end

local function mcp_call(h, token, task, name)
   local body = '{"jsonrpc":"2.0","id":' .. seq .. ',"method":"tools/call","params":{"name":"' .. name ..
      '","arguments":{"ticket":"' .. task .. '"}}}'
   return request_text("POST", h, mcp_path, {
      "authorization", "Bearer " .. token,
      "x-agent-intent", mcp_intent,
      "x-agent-task", task,
      "accept", "application/json, text/event-stream",
      "mcp-protocol-version", "2026-07-28",
      "mcp-method", "tools/call",
      "mcp-name", name,
      "mcp-param-ticket", task,
   }, body)
end

function request()
   seq = seq + 1
   if seq % reload_every == 0 then
      load_tasks()
   end
   local slot = seq % 100
   if slot >= 87 and slot <= 89 and chain then
      local task = tasks_cur[0] or "-"
      return request_text("GET", host, "/tickets/" .. (seq % 1000), {
         "authorization", "Bearer " .. svid_d,
         "txn-token", chain,
         "x-agent-intent", intent,
         "x-agent-task", task,
      })
   end
   pos = pos % ntok + 1
   local token, group = toks[pos], subj[pos]
   local task = tasks_cur[group] or "T-none"
   if slot >= 70 and slot <= 79 then
      return mcp_call(mcp_host, token, task, tool)
   elseif slot >= 80 and slot <= 84 then
      return mcp_call(mcp_body_host, token, task, tool)
   elseif slot == 85 or slot == 86 then
      return mcp_call(mcp_host, token, task, denied_tool)
   end
   local want = intent
   if slot >= 90 and slot <= 93 then
      local prev = tasks_prev[group]
      if prev and prev ~= "-" then
         task = prev
      end
   elseif slot == 94 or slot == 95 then
      want = wrong_intent
   elseif slot == 96 and bad ~= "" then
      token = bad
   end
   return request_text("GET", host, "/tickets/" .. (seq % 1000), {
      "authorization", "Bearer " .. token,
      "x-agent-intent", want,
      "x-agent-task", task,
   })
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
   answered = answered + 1
   if limit > 0 and answered >= limit then
      wrk.thread:stop()
   end
end

-- ------------------------------------------------------------------ report

function done(summary, latency, requests)
   local by_status = {}
   for _, t in ipairs(threads) do
      local s = t:get("statuses")
      if s then
         for k, v in pairs(s) do
            by_status[k] = (by_status[k] or 0) + v
         end
      end
   end
   local parts = {}
   for k, v in pairs(by_status) do
      parts[#parts + 1] = string.format('"%d":%d', k, v)
   end
   local e = summary.errors
   local secs = summary.duration / 1e6
   io.write(string.format(
      'SOAK_JSON {"requests":%d,"duration_s":%.3f,"rps":%.1f,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},"statuses":{%s}}\n',
      summary.requests, secs, summary.requests / secs,
      latency:percentile(50), latency:percentile(99), latency.max,
      e.connect, e.read, e.write, e.status, e.timeout, table.concat(parts, ",")))
end
