"""Python solver: the modules a script imports, found by the script's own
interpreter (so its version, its venv and its site-packages are the ones that
count), with modulefinder.

What goes in the image:
  - every module the interpreter imports at startup (encodings, site, ...)
    and every module the script imports, transitively;
  - a module inside a package brings its whole top-level package directory
    (data files, extension modules) and, for site-packages, its .dist-info;
  - extension modules (.so) go through the ELF solver for their libraries;
  - the venv's pyvenv.cfg and the lib-dynload landmark, so the interpreter
    finds its prefix inside the image exactly as on the host.
"""
import json
import os
import subprocess

from hpcrun import errors

# Runs inside the script's interpreter: prints one JSON object.
HELPER = r"""
import sys
startup = dict(sys.modules)
import json, modulefinder, os, sysconfig
script = sys.argv[1]
sys.path[0] = os.path.dirname(os.path.abspath(script))
finder = modulefinder.ModuleFinder(path=list(sys.path))
try:
    finder.run_script(script)
except SyntaxError as e:
    print(json.dumps({"error": "syntax error in %s line %s: %s" % (script, e.lineno, e.msg)}))
    sys.exit(0)
mods = {}
for name, m in list(startup.items()) + list(finder.modules.items()):
    f = getattr(m, "__file__", None)
    p = getattr(m, "__path__", None)
    if name == "__main__" or (not f and not p):
        continue
    mods[name] = {"file": f, "path": list(p)[0] if p else None}
paths = sysconfig.get_paths()
print(json.dumps({"modules": mods, "prefix": sys.prefix, "base_prefix": sys.base_prefix,
                  "stdlib": paths["stdlib"], "platstdlib": paths["platstdlib"],
                  "missing": sorted(n for n in finder.badmodules if "." not in n)}))
"""


def solve(tree, elf_solver, script, interpreter, log):
    """Add what `interpreter script` imports; script and interpreter are host paths."""
    why_script = tree.image_path(script)
    try:
        out = subprocess.run([interpreter, "-E", "-s", "-c", HELPER, script], capture_output=True,
                             text=True, timeout=300, cwd=os.path.dirname(script) or None)
    except OSError as e:
        raise errors.Error(errors.NOINPUT, "cannot run the script's interpreter %s: %s"
                           % (interpreter, e.strerror), why_script)
    try:
        found = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise errors.Error(errors.DATA, "cannot list the imports of %s: %s" % (script, tail), interpreter)
    if "error" in found:
        raise errors.Error(errors.DATA, found["error"], script)
    stdlib = {found["stdlib"], found["platstdlib"]}
    tops_done = set()
    for name, m in sorted(found["modules"].items()):
        why = "module %s imported by %s" % (name, why_script)
        top = name.split(".")[0]
        top_mod = found["modules"].get(top, {})
        if top_mod.get("path"):                      # inside a package: the whole package
            if top in tops_done:
                continue
            tops_done.add(top)
            pkg_dir = top_mod["path"]
            tree.add_tree(pkg_dir, "package %s imported by %s" % (top, why_script))
            if os.path.dirname(pkg_dir) not in stdlib:
                _add_dist_info(tree, os.path.dirname(pkg_dir), top, why)
            for so in _shared_objects(pkg_dir):
                elf_solver.add(so, "extension module in package %s" % top)
        elif m.get("file") and os.path.isfile(m["file"]):
            f = m["file"]
            if f.endswith(".so"):
                elf_solver.add(f, why)
            else:
                tree.add(f, why)
                _add_pyc(tree, f, why)
    # the interpreter locates its prefix through these landmarks
    for d in (found["stdlib"], found["platstdlib"]):
        if os.path.isfile(os.path.join(d, "os.py")):
            tree.add(os.path.join(d, "os.py"), "landmark of the Python prefix")
    dynload = os.path.join(found["platstdlib"], "lib-dynload")
    if os.path.isdir(dynload):
        tree.add(dynload, "landmark of the Python exec prefix")
    if found["prefix"] != found["base_prefix"]:
        cfg = os.path.join(found["prefix"], "pyvenv.cfg")
        if os.path.isfile(cfg):
            tree.add(cfg, "virtual environment of %s" % interpreter)
    for name in found["missing"]:
        log("note: %s imports %s, which the interpreter cannot find (left out)" % (why_script, name))


def _add_pyc(tree, f, why):
    base = os.path.splitext(os.path.basename(f))[0]
    cache = os.path.join(os.path.dirname(f), "__pycache__")
    if os.path.isdir(cache):
        for n in os.listdir(cache):
            if n.startswith(base + ".") and n.endswith(".pyc") and n.count(".") == 2:
                tree.add(os.path.join(cache, n), why)


def _add_dist_info(tree, site, top, why):
    """The .dist-info of the distribution that installs top (importlib.metadata reads it)."""
    try:
        names = os.listdir(site)
    except OSError:
        return
    for n in names:
        if not n.endswith(".dist-info"):
            continue
        d = os.path.join(site, n)
        tops = set()
        for listing, split in (("top_level.txt", None), ("RECORD", ",")):
            try:
                with open(os.path.join(d, listing)) as f:
                    for line in f:
                        first = line.split(split)[0] if split else line
                        tops.add(first.strip().split("/")[0].split(".")[0])
            except OSError:
                pass
        if top in tops:
            tree.add_tree(d, "metadata of package %s" % top)


def _shared_objects(d):
    for top, dirs, files in os.walk(d):
        for f in files:
            if f.endswith(".so") or ".so." in f:
                yield os.path.join(top, f)
