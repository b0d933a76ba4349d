--[[
hpcrun cli_filter: check container images when a job or step is submitted.

Install beside slurm.conf as cli_filter.lua and set CliFilterPlugins=cli_filter/lua
(docs/slurm.md).  For sbatch, salloc and srun with --container=IMG (Slurm's own
option) or --container-image=IMG (the hpcrun SPANK plugin's), it refuses the
submission when IMG is empty, missing, unreadable or not an image, naming the
path, and exports HPCRUN_IMAGE=<absolute path> so that a relative path means the
same thing on every node.  The spank_hpcrun plugin then wraps every task.

Written for Lua 5.1: Debian's cli_filter_lua.so links liblua5.1 (no utf8
library, no bit operators, no goto here).

Facts this relies on (Slurm 22.05): options["container"] is readable but
assigning it has no effect, so the absolute path travels in --export;
plugin options are not in the options table, only in json_cli_options() as
"spank:container-image", JSON-escaped ("/" as "\/").  A runtime error in this
file does not stop the job (Slurm logs it and goes on), so errors are caught
and turned into refusals.
]]

local function hex(bytes)
  return (bytes:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

-- What pins an image (hpcrun/image.py, docs/run.md), from its first bytes: an
-- hpcrun image's header digest, a SIF's global header from its ID on, a plain
-- SquashFS's superblock.  nil for a directory or a file too short to run.
local function image_pin(kind, head)
  if kind == "hpcrun" then
    local digest = head:match("\nHPCRUN%-IMAGE %d+ %d+ %d+ ([0-9a-f]+)\n")
    if digest ~= nil and #digest == 64 then
      return "sha256:" .. digest
    end
  elseif kind == "sif" and #head >= 128 then
    return "sif:" .. hex(head:sub(49, 128))
  elseif kind == "squashfs" and #head >= 96 then
    return "squashfs:" .. hex(head:sub(1, 96))
  end
  return nil
end

-- (kind, pin) of the image at path, or (nil, why).
local function image_kind(path)
  local f, err = io.open(path, "rb")
  if not f then
    return nil, err
  end
  local head, rerr, code = f:read(4096)
  f:close()
  if head == nil and code == 21 then   -- EISDIR: a directory image or an OCI bundle
    return "directory"
  end
  if head == nil then
    return nil, rerr or "empty file"
  end
  local kind
  if head:sub(1, 4) == "hsqs" then
    kind = "squashfs"
  elseif head:sub(1, 2) == "#!" and head:sub(1, 256):find("\nHPCRUN%-IMAGE ") then
    kind = "hpcrun"
  elseif head:sub(33, 42) == "SIF_MAGIC\0" then
    kind = "sif"
  else
    return nil, "not an image"
  end
  return kind, image_pin(kind, head)
end

local submit_dir_cache = nil
local function submit_dir()
  if submit_dir_cache == nil then
    local p = io.popen("pwd")
    submit_dir_cache = p:read("*l")
    p:close()
  end
  return submit_dir_cache
end

local function absolute(path, cwd)
  if path:sub(1, 1) == "/" then
    return path
  end
  if cwd == nil or cwd == "" then
    cwd = submit_dir()
  elseif cwd:sub(1, 1) ~= "/" then
    cwd = submit_dir() .. "/" .. cwd
  end
  return (cwd:gsub("/+$", "")) .. "/" .. path
end

-- JSON text -> Lua values (RFC 8259; Lua 5.1, as Debian's cli_filter_lua links).
-- Slurm 22.05 writes "/" as "\/" and may use any other escape, so values are
-- decoded in full, never matched raw.  Objects and arrays become tables; null
-- becomes nil.  Errors are raised with the offending offset.
local json_value

local function utf8_char(cp)
  if cp < 0x80 then
    return string.char(cp)
  elseif cp < 0x800 then
    return string.char(0xC0 + math.floor(cp / 0x40), 0x80 + cp % 0x40)
  elseif cp < 0x10000 then
    return string.char(0xE0 + math.floor(cp / 0x1000), 0x80 + math.floor(cp / 0x40) % 0x40,
                       0x80 + cp % 0x40)
  end
  return string.char(0xF0 + math.floor(cp / 0x40000), 0x80 + math.floor(cp / 0x1000) % 0x40,
                     0x80 + math.floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
end

local SIMPLE_ESCAPES = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n",
                         r = "\r", t = "\t" }

local function json_hex4(s, i)
  local hex = s:sub(i, i + 3)
  if not hex:match("^%x%x%x%x$") then
    error("bad \\u escape at " .. i)
  end
  return tonumber(hex, 16)
end

-- s:sub(i, i) is the opening quote; returns the string and the index after it.
local function json_string(s, i)
  local parts, pos = {}, i + 1
  while true do
    local at = s:find('["\\%c]', pos)
    if at == nil then
      error("unterminated string at " .. i)
    end
    parts[#parts + 1] = s:sub(pos, at - 1)
    local c = s:sub(at, at)
    if c == '"' then
      return table.concat(parts), at + 1
    elseif c ~= "\\" then
      error("control character in string at " .. at)
    end
    local e = s:sub(at + 1, at + 1)
    if SIMPLE_ESCAPES[e] then
      parts[#parts + 1] = SIMPLE_ESCAPES[e]
      pos = at + 2
    elseif e == "u" then
      local cp = json_hex4(s, at + 2)
      pos = at + 6
      if cp >= 0xD800 and cp <= 0xDBFF and s:sub(pos, pos + 1) == "\\u" then
        local low = json_hex4(s, pos + 2)
        if low >= 0xDC00 and low <= 0xDFFF then   -- a surrogate pair: one code point
          cp = 0x10000 + (cp - 0xD800) * 0x400 + (low - 0xDC00)
          pos = pos + 6
        end
      end
      if cp >= 0xD800 and cp <= 0xDFFF then
        cp = 0xFFFD   -- a lone surrogate has no UTF-8 form
      end
      parts[#parts + 1] = utf8_char(cp)
    else
      error("bad escape at " .. at)
    end
  end
end

local function skip_space(s, i)
  return s:find("[^ \t\r\n]", i) or #s + 1
end

local function json_container(s, i, close, keyed)
  local out, pos, n = {}, skip_space(s, i + 1), 0
  if s:sub(pos, pos) == close then
    return out, pos + 1
  end
  while true do
    local key
    if keyed then
      if s:sub(pos, pos) ~= '"' then
        error("object key expected at " .. pos)
      end
      key, pos = json_string(s, pos)
      pos = skip_space(s, pos)
      if s:sub(pos, pos) ~= ":" then
        error("':' expected at " .. pos)
      end
      pos = skip_space(s, pos + 1)
    end
    local value
    value, pos = json_value(s, pos)
    if keyed then
      out[key] = value
    else
      n = n + 1   -- a null keeps its place
      out[n] = value
    end
    pos = skip_space(s, pos)
    local c = s:sub(pos, pos)
    if c == close then
      return out, pos + 1
    elseif c ~= "," then
      error("',' or '" .. close .. "' expected at " .. pos)
    end
    pos = skip_space(s, pos + 1)
  end
end

json_value = function(s, i)
  i = skip_space(s, i)
  local c = s:sub(i, i)
  if c == '"' then
    return json_string(s, i)
  elseif c == "{" then
    return json_container(s, i, "}", true)
  elseif c == "[" then
    return json_container(s, i, "]", false)
  end
  if s:sub(i, i + 3) == "true" then
    return true, i + 4
  elseif s:sub(i, i + 4) == "false" then
    return false, i + 5
  elseif s:sub(i, i + 3) == "null" then
    return nil, i + 4
  end
  local num = s:match("^-?%d+%.?%d*[eE]?[-+]?%d*", i)
  if num ~= nil and num ~= "" and tonumber(num) ~= nil then
    return tonumber(num), i + #num
  end
  error("unexpected " .. (c == "" and "end of text" or "'" .. c .. "'") .. " at " .. i)
end

local function json_decode(s)
  local value, pos = json_value(s, 1)
  if skip_space(s, pos) <= #s then
    error("trailing text at " .. pos)
  end
  return value
end

-- The options set on this command line as {name = value}, decoded from
-- slurm.json_cli_options: Slurm's own under their long names ("container"), the
-- plugin's as "spank:NAME" (they are not in the options table).  Raises on
-- text that is not JSON.
local function cli_options(options)
  local ok, text = pcall(slurm.json_cli_options, options)
  if not ok or text == nil or text == "" then
    return {}
  end
  local decoded = json_decode(text)
  return type(decoded) == "table" and decoded or {}
end

-- A relative IMG means the tasks' working directory (--chdir), then the submit
-- directory: the order the plugin's task side (hpcrun task-entry) resolves it in.
local function check(options, opt, path)
  local abs = absolute(path, options["chdir"])
  local kind, err = image_kind(abs)
  local pin = err
  local chdir = options["chdir"]
  if kind == nil and (err or ""):find("No such file") and path:sub(1, 1) ~= "/"
      and chdir ~= nil and chdir ~= "" then
    local in_submit_dir = absolute(path, nil)
    local kind2, err2 = image_kind(in_submit_dir)
    if kind2 ~= nil or not (err2 or ""):find("No such file") then
      abs, kind, err, pin = in_submit_dir, kind2, err2, err2
    end
  end
  if kind == nil then
    local why = err or "not an image"
    if why:find("No such file") then
      why = "image not found"
    elseif why:find("Permission denied") then
      why = "image not readable"
    elseif why == "not an image" then
      why = "not an image (no hpcrun, SquashFS or SIF header)"
    end
    slurm.log_error("hpcrun: %s (%s, from --%s)", why, abs, opt)
    return nil
  end
  return abs, pin
end

function slurm_cli_setup_defaults(options, early_pass)
  return slurm.SUCCESS
end

-- An empty image option is a mistake (an unset shell variable, most often):
-- refuse it by name rather than run the job on the host or in the cwd.
local function empty(opt)
  slurm.log_error("hpcrun: image argument is empty (--%s=)", opt)
  return slurm.ERROR
end

-- Add NAME=VALUE items to the job's --export list (ALL unless the user gave one).
local function export(options, items)
  local list = options["export"]
  if list == nil or list == "" then
    list = "ALL"
  end
  options["export"] = list .. "," .. table.concat(items, ",")
end

-- Pin the image at submission (docs/slurm.md): HPCRUN_IMAGE_DIGEST names what
-- the image is now, HPCRUN_IMAGE_DIGEST_PATH which image it pins, and every
-- task's hpcrun refuses a rebuilt image (65, both digests named).  A step of a
-- job that pinned this same image keeps the job's pin: the job runs what was
-- submitted, not what the image is when the step starts.
local function pin_image(options, abs, pin, wanted)
  if wanted == "no" or pin == nil then
    return
  end
  local inherited = os.getenv("HPCRUN_IMAGE_DIGEST")
  if inherited ~= nil and inherited ~= "" and os.getenv("HPCRUN_IMAGE_DIGEST_PATH") == abs then
    pin = inherited
  end
  if pin:find("[,\"']") then
    return
  end
  local items = { "HPCRUN_IMAGE_DIGEST=" .. pin }
  -- --export's value is a comma list in which quotes group: such a path cannot
  -- travel, and then the pin holds for every image the job launches.
  if not abs:find("[,\"']") then
    items[2] = "HPCRUN_IMAGE_DIGEST_PATH=" .. abs
  end
  export(options, items)
end

function slurm_cli_pre_submit(options, pack_offset)
  local ok, set = pcall(cli_options, options)
  if not ok then
    slurm.log_error("hpcrun: cannot decode slurm.json_cli_options: %s", tostring(set))
    return slurm.ERROR
  end
  local wanted = set["spank:container-pin"]
  if wanted ~= nil and wanted ~= "yes" and wanted ~= "no" then
    slurm.log_error("hpcrun: --container-pin must be yes or no (--container-pin=%s)", tostring(wanted))
    return slurm.ERROR
  end
  local image = set["spank:container-image"]
  if image == "" then   -- the plugin refuses it too; this names it first
    return empty("container-image")
  end
  local pinned = false
  if type(image) == "string" then
    local abs, pin = check(options, "container-image", image)
    if abs == nil then
      return slurm.ERROR
    end
    pin_image(options, abs, pin, wanted)   -- the plugin runs this one when both are given
    pinned = true
  end
  local container = options["container"]
  if container == nil then   -- not in the options table: take the JSON's
    container = set["container"]
  end
  if container == "" and set["container"] ~= nil then
    return empty("container")
  end
  if type(container) ~= "string" or container == "" then
    return slurm.SUCCESS
  end
  local abs, pin = check(options, "container", container)
  if abs == nil then
    return slurm.ERROR
  end
  local bundle = io.open(abs .. "/config.json", "r")
  if bundle then   -- an OCI bundle is Slurm's, not ours
    bundle:close()
    return slurm.SUCCESS
  end
  -- --export's value is a comma list in which quotes group (and stay in the
  -- value): a path with a comma or a quote cannot travel in it.  The plugin
  -- then resolves SLURM_CONTAINER itself (the task's cwd, the submit dir).
  if not abs:find("[,\"']") then
    export(options, { "HPCRUN_IMAGE=" .. abs })
  end
  if not pinned then
    pin_image(options, abs, pin, wanted)
  end
  return slurm.SUCCESS
end

function slurm_cli_post_submit(offset, job_id, step_id)
  return slurm.SUCCESS
end
