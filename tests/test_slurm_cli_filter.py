"""plugins/slurm/cli_filter.lua under Lua 5.1, the Lua that Slurm's cli_filter/lua
embeds on Debian (liblua5.1): its JSON decoder against Python's json on every
kind of escape, including the \\uXXXX forms and surrogate pairs that Slurm 22.05
does not write today (test_slurm.py covers what it does write, on real Slurm)."""
import json
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILTER = os.path.join(ROOT, "plugins", "slurm", "cli_filter.lua")
LUA = shutil.which("lua5.1")
SLURM_LUA = "/usr/lib/x86_64-linux-gnu/slurm-wlm/cli_filter_lua.so"

pytestmark = pytest.mark.skipif(LUA is None, reason="needs lua5.1 (make deps installs it)")

# Loads the filter as Slurm does (one chunk), then decodes stdin and prints
# the result back as key<TAB>type<TAB>value lines, values hex-encoded.
HARNESS = r"""
local f = assert(io.open(os.getenv("CLI_FILTER"), "rb")); local src = f:read("*a"); f:close()
local decode = assert(loadstring(src .. "\nreturn json_decode", "cli_filter.lua"))()
local ok, v = pcall(decode, io.read("*a"))
if not ok then io.write("ERROR\t", tostring(v), "\n") os.exit(0) end
local function hex(s) return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end)) end
local function dump(prefix, t)
  for k, x in pairs(t) do
    local key = prefix .. hex(tostring(k))
    if type(x) == "table" then dump(key .. "/", x)
    else io.write(key, "\t", type(x), "\t", hex(tostring(x)), "\n") end
  end
end
dump("", v)
"""


def lua_decode(text):
    r = subprocess.run([LUA, "-e", HARNESS], input=text.encode(), capture_output=True, timeout=30,
                       env=dict(os.environ, CLI_FILTER=FILTER))
    assert r.returncode == 0, r.stderr.decode()
    lines = r.stdout.decode().splitlines()
    if lines and lines[0].startswith("ERROR\t"):
        return ("error", lines[0].split("\t", 1)[1])
    out = {}
    for line in lines:
        key, kind, value = line.split("\t")
        path = tuple(bytes.fromhex(part).decode("utf-8", "surrogateescape") for part in key.split("/"))
        value = bytes.fromhex(value).decode("utf-8", "surrogateescape")
        out[path] = (kind, float(value) if kind == "number" else value)
    return out


def flat(value, prefix=()):
    """Python's reading of the same JSON, in the harness's shape (Lua arrays count from 1)."""
    items = value.items() if isinstance(value, dict) else ((str(i + 1), v) for i, v in enumerate(value))
    out = {}
    for k, v in items:
        if isinstance(v, (dict, list)):
            out.update(flat(v, prefix + (k,)))
        elif v is None:
            continue
        elif isinstance(v, bool):
            out[prefix + (k,)] = ("boolean", "true" if v else "false")
        elif isinstance(v, str):
            out[prefix + (k,)] = ("string", v)
        else:
            out[prefix + (k,)] = ("number", float(v))
    return out


def test_slurm_embeds_lua_5_1():
    # The filter is written for 5.1 because this is what runs it.
    if not os.path.exists(SLURM_LUA):
        pytest.skip("Slurm's cli_filter/lua plugin is not installed")
    out = subprocess.run(["ldd", SLURM_LUA], capture_output=True, text=True).stdout
    assert "liblua5.1" in out, out


@pytest.mark.parametrize("value", [
    "/abs/path/img.sqfs", "sub/x.img", "my images/solver v2.img", "q\"uo'te\\back.img",
    "Bäume/€ λ.sqfs", "tab\tname\nline\r\b\f.img", "\x01\x1f control", "emoji 😀 𝄞.img",
    "", "a,b.img", "#1/x#y.img",
])
@pytest.mark.parametrize("ascii_only", [True, False], ids=["escaped", "raw-utf8"])
def test_strings_decode_like_python(value, ascii_only):
    text = json.dumps({"spank:container-image": value, "container": value}, ensure_ascii=ascii_only)
    # Slurm 22.05 (json-c) writes "/" as "\/": do the same.
    text = text.replace("/", "\\/")
    assert lua_decode(text) == flat(json.loads(text))


def test_every_value_kind_decodes():
    text = ('{"nodes":"1","argv":["true","x y",null,"\\u00e9"],"n":-1.5e3,"i":42,"t":true,"f":false,'
            '"z":null,"o":{"k":{"deep":[1,[2]]}},"e":{},"ea":[] , "sp" :\t"v" }')
    assert lua_decode(text) == flat(json.loads(text))


def test_surrogates():
    # A pair is one code point; a lone surrogate has no UTF-8 form and becomes U+FFFD.
    assert lua_decode('{"a":"\\ud83d\\ude00","b":"\\ud83d","c":"\\ude00x","d":"\\uD834\\uDD1E"}') == {
        ("a",): ("string", "😀"), ("b",): ("string", "\ufffd"), ("c",): ("string", "\ufffdx"),
        ("d",): ("string", "𝄞")}


@pytest.mark.parametrize("text", ['{"a":"x', '{"a":"\\q"}', '{"a":"\\u12"}', '{"a" "x"}', '{"a":"x",}',
                                  '{"a":"x"} trailing', '{"a":"raw\nnewline"}', '{"a":tru}', ''])
def test_malformed_json_is_an_error(text):
    assert lua_decode(text)[0] == "error"
