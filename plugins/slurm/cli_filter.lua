--[[
hpcrun cli_filter: check container images when a job or step is submitted.

Install beside slurm.conf as cli_filter.lua and set CliFilterPlugins=cli_filter/lua
(docs/slurm.md).  For sbatch, salloc and srun with --container=IMG (Slurm's own
option) or --container-image=IMG (the hpcrun SPANK plugin's), it refuses the
submission when IMG is missing, unreadable or not an image, naming the path, and
exports HPCRUN_IMAGE=<absolute path> so that a relative path means the same
thing on every node.  The spank_hpcrun plugin then wraps every task.

Facts this relies on (Slurm 22.05): options["container"] is readable but
assigning it has no effect, so the absolute path travels in --export;
plugin options are not in the options table, only in json_cli_options() as
"spank:container-image".
]]

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
  if head:sub(1, 4) == "hsqs" then
    return "squashfs"
  end
  if head:sub(1, 2) == "#!" and head:sub(1, 256):find("\nHPCRUN%-IMAGE ") then
    return "hpcrun"
  end
  if head:sub(33, 42) == "SIF_MAGIC\0" then
    return "sif"
  end
  return nil, "not an image"
end

local function absolute(path, cwd)
  if path:sub(1, 1) == "/" then
    return path
  end
  if cwd == nil or cwd == "" then
    local p = io.popen("pwd")
    cwd = p:read("*l")
    p:close()
  end
  return cwd .. "/" .. path
end

-- The value of a SPANK option (not exposed in the options table itself).
local function spank_option(options, name)
  local ok, json = pcall(slurm.json_cli_options, options)
  if not ok or json == nil then
    return nil
  end
  return json:match('"spank:' .. name:gsub("%-", "%%-") .. '":"(.-)"')
end

local function check(options, opt, path)
  local abs = absolute(path, options["chdir"])
  local kind, err = image_kind(abs)
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
  return abs
end

function slurm_cli_setup_defaults(options, early_pass)
  return slurm.SUCCESS
end

function slurm_cli_pre_submit(options, pack_offset)
  local export_abs = nil
  local image = spank_option(options, "container-image")
  if image ~= nil and image ~= "" then
    if check(options, "container-image", image) == nil then
      return slurm.ERROR
    end
  end
  local container = options["container"]
  if container ~= nil and container ~= "" then
    local abs = check(options, "container", container)
    if abs == nil then
      return slurm.ERROR
    end
    if not io.open(abs .. "/config.json", "r") then   -- an OCI bundle is Slurm's, not ours
      export_abs = abs
    end
  end
  if export_abs ~= nil then
    local export = options["export"]
    if export == nil or export == "" then
      export = "ALL"
    end
    options["export"] = export .. ",HPCRUN_IMAGE=" .. export_abs
  end
  return slurm.SUCCESS
end

function slurm_cli_post_submit(offset, job_id, step_id)
  return slurm.SUCCESS
end
