-- wrk script used by bench/fhir_api.py for one timed phase.
--
--   wrk ... -s bench/wrk_phase.lua URL -- METHOD PATH IDS_FILE BODY_FILE CHECK_ENTRIES
--
-- PATH and the body read from BODY_FILE may hold "{id}", replaced on every request by an id drawn
-- at random from IDS_FILE (one id a line; "-" for none). When CHECK_ENTRIES is "1", every 2xx
-- answer is checked for an empty searchset ('"entry":[]'). Any answer outside 200-299 is counted
-- as an error. done() prints one line "WRK_RESULT {json}" that the benchmark parses.

local threads = {}
local seed_counter = 0

function setup(thread)
  seed_counter = seed_counter + 1
  thread:set("seed", os.time() * 1000 + seed_counter * 7919)
  table.insert(threads, thread)
end

-- Per-thread state (globals, so that done() can read them with thread:get).
non2xx = 0
checked = 0
empty = 0
statuses = {}
first_error = ""

local ids = {}
local method, path_head, path_tail, body_head, body_tail, body_static, check_entries
local headers = {}

local function split(template)
  local s, e = string.find(template, "{id}", 1, true)
  if s == nil then
    return template, nil
  end
  return string.sub(template, 1, s - 1), string.sub(template, e + 1)
end

function init(args)
  math.randomseed(seed or os.time())
  method = args[1] or "GET"
  path_head, path_tail = split(args[2] or "/")
  local ids_file = args[3] or "-"
  if ids_file ~= "-" and ids_file ~= "" then
    for line in io.lines(ids_file) do
      if line ~= "" then
        ids[#ids + 1] = line
      end
    end
  end
  local body_file = args[4] or "-"
  if body_file ~= "-" and body_file ~= "" then
    local fh = assert(io.open(body_file, "r"))
    local text = fh:read("*a")
    fh:close()
    body_head, body_tail = split(text)
    if body_tail == nil then
      body_static = body_head
    end
    headers["Content-Type"] = "application/fhir+json"
  end
  headers["Accept"] = "application/fhir+json"
  check_entries = args[5] == "1"
end

function request()
  local id = ""
  if #ids > 0 then
    id = ids[math.random(#ids)]
  end
  local path = path_head
  if path_tail ~= nil then
    path = path_head .. id .. path_tail
  end
  local body = nil
  if body_static ~= nil then
    body = body_static
  elseif body_head ~= nil then
    body = body_head .. id .. body_tail
  end
  return wrk.format(method, path, headers, body)
end

function response(status, _, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    statuses[status] = (statuses[status] or 0) + 1
    if first_error == "" then
      first_error = tostring(status) .. " " .. string.sub(body or "", 1, 300)
    end
  elseif check_entries then
    checked = checked + 1
    if string.find(body or "", '"entry":[]', 1, true) then
      empty = empty + 1
    end
  end
end

local function json_string(value)
  value = string.gsub(value, '[%c"\\]', function(c)
    if c == '"' then
      return '\\"'
    elseif c == "\\" then
      return "\\\\"
    end
    return string.format("\\u%04x", string.byte(c))
  end)
  return '"' .. value .. '"'
end

function done(summary, latency, _)
  local total_non2xx, total_checked, total_empty = 0, 0, 0
  local merged, error_text = {}, ""
  for _, thread in ipairs(threads) do
    total_non2xx = total_non2xx + (thread:get("non2xx") or 0)
    total_checked = total_checked + (thread:get("checked") or 0)
    total_empty = total_empty + (thread:get("empty") or 0)
    for code, count in pairs(thread:get("statuses") or {}) do
      merged[code] = (merged[code] or 0) + count
    end
    local text = thread:get("first_error") or ""
    if error_text == "" and text ~= "" then
      error_text = text
    end
  end
  local status_parts = {}
  for code, count in pairs(merged) do
    table.insert(status_parts, string.format('"%d":%d', code, count))
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"p50_us":%d,"p95_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,'
      .. '"non2xx":%d,"statuses":{%s},"first_error":%s,'
      .. '"socket_errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},'
      .. '"checked":%d,"empty":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max, latency.mean,
    total_non2xx, table.concat(status_parts, ","), json_string(error_text),
    e.connect, e.read, e.write, e.timeout,
    total_checked, total_empty))
end
