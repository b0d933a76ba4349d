"""Python solver: what a Python program can import, found with the program's
own interpreter (so its version, its venv and its site-packages are the ones
that count).

What goes in the image:
  - the interpreter's whole standard library (a program imports modules by
    computed names: sysconfig's _sysconfigdata, __import__("configparser")),
    lib-dynload included, without its test suites, idle and the static
    libpython build directory (STDLIB_SKIP);
  - every module the scripts import, transitively (modulefinder), and the
    imports of the Python files in directories the spec lists;
  - a module inside a package brings its whole top-level package directory
    (data files, extension modules, modules imported by name) and, for
    site-packages, its .dist-info;
  - extension modules (.so) go through the ELF solver for their libraries.
    One whose libraries are not on this host (mpi4py's MPI.mpich next to
    MPI.openmpi: one per MPI ABI, chosen at run time) is kept without them,
    with one warning line;
  - the venv's pyvenv.cfg, so the interpreter finds its prefix inside the
    image exactly as on the host.
"""
import json
import os
import subprocess

from hpcrun import errors

# Directory names left out of the standard library: test suites, idle, and the
# directory with the static libpython and Makefile (for building, not running).
STDLIB_SKIP = {"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages",
               "__phello__"}

# Runs inside the script's interpreter: prints one JSON object.
# argv: SCRIPT... -- EXTRA...  (extra: Python files of listed directories; one
# that does not compile is skipped, not an error)
HELPER = r"""
import sys
startup = dict(sys.modules)
import json, modulefinder, os, sysconfig
args = sys.argv[1:]
scripts, extra = args[:args.index("--")], args[args.index("--") + 1:]
finder = modulefinder.ModuleFinder(path=[""] + sys.path[1:])
skipped = []
for f in scripts + extra:
    finder.path[0] = os.path.dirname(os.path.abspath(f))
    try:
        finder.run_script(f)
    except SyntaxError as e:
        if f in scripts:
            print(json.dumps({"error": "syntax error in %s line %s: %s" % (f, e.lineno, e.msg)}))
            sys.exit(0)
        skipped.append(f)
    except Exception:
        if f in scripts:
            raise
        skipped.append(f)
mods = {}
for name, m in list(startup.items()) + list(finder.modules.items()):
    f = getattr(m, "__file__", None)
    p = getattr(m, "__path__", None)
    if name == "__main__" or (not f and not p):
        continue
    mods[name] = {"file": f, "path": list(p)[0] if p else None}
bases = (sys.base_prefix + os.sep, sys.base_exec_prefix + os.sep)
stdlib = [d for d in sys.path[1:] if d.startswith(bases) and os.path.exists(d)
          and os.path.basename(d) not in ("site-packages", "dist-packages")]
print(json.dumps({"modules": mods, "prefix": sys.prefix, "base_prefix": sys.base_prefix,
                  "stdlib_dirs": stdlib, "skipped": skipped,
                  "missing": sorted(n for n in finder.badmodules if "." not in n)}))
"""


def solve(tree, elf_solver, scripts, interpreter, log, warn, extra=()):
    """Add what `interpreter` needs to run scripts (host paths) and what they
    and the Python files in extra can import."""
    why_script = ", ".join(tree.image_path(s) for s in scripts)
    try:
        out = subprocess.run([interpreter, "-E", "-s", "-c", HELPER] + list(scripts) + ["--"] + list(extra),
                             capture_output=True, text=True, timeout=600,
                             cwd=os.path.dirname(scripts[0]) or None)
    except OSError as e:
        raise errors.Error(errors.NOINPUT, "cannot run the script's interpreter %s: %s"
                           % (interpreter, e.strerror), why_script)
    try:
        found = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise errors.Error(errors.DATA, "cannot list the imports of %s: %s" % (why_script, tail), interpreter)
    if "error" in found:
        raise errors.Error(errors.DATA, found["error"], why_script)
    stdlib = found["stdlib_dirs"]
    for d in stdlib:
        _add_stdlib(tree, elf_solver, d, interpreter, warn)
    in_stdlib = lambda p: any((p + "/").startswith(d + "/") for d in stdlib)      # noqa: E731
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
            if in_stdlib(pkg_dir):
                continue
            tree.add_tree(pkg_dir, "package %s imported by %s" % (top, why_script))
            _add_dist_info(tree, os.path.dirname(pkg_dir), top, why)
            for so in _shared_objects(pkg_dir):
                add_extension(tree, elf_solver, so, "extension module in package %s" % top, warn)
        elif m.get("file") and os.path.isfile(m["file"]) and not in_stdlib(m["file"]):
            f = m["file"]
            if f.endswith(".so"):
                add_extension(tree, elf_solver, f, why, warn)
            else:
                tree.add(f, why)
                _add_pyc(tree, f, why)
            _add_dist_info(tree, os.path.dirname(f), top, why)
    if found["prefix"] != found["base_prefix"]:
        cfg = os.path.join(found["prefix"], "pyvenv.cfg")
        if os.path.isfile(cfg):
            tree.add(cfg, "virtual environment of %s" % interpreter)
    for name in found["missing"]:
        log("note: %s imports %s, which the interpreter cannot find (left out)" % (why_script, name))
    for f in found["skipped"]:
        log("note: %s does not compile: its imports are not followed" % f)


def add_extension(tree, elf_solver, so, why, warn):
    """An extension module with its libraries, or, when one cannot be found on
    this host, the module alone and one warning line."""
    lacking = elf_solver.missing(so)
    if lacking is None:
        elf_solver.add(so, why)
        return
    image_path = tree.image_path(so)
    if tree.excluded(image_path):
        return
    tree.add(so, why)
    if image_path not in tree.warned:
        tree.warned.add(image_path)
        warn("%s kept without its libraries: %s is not on this host (the module loads only where it is "
             "provided; %%exclude it to leave it out)" % (image_path, lacking))


def _add_stdlib(tree, elf_solver, d, interpreter, warn):
    if not os.path.isdir(d):                     # a zipped standard library (pythonXY.zip)
        tree.add(d, "standard library of %s" % interpreter)
        return

    def skip(path):
        name = os.path.basename(path)
        return name in STDLIB_SKIP or name.startswith("config-") and os.path.isdir(path)
    tree.add_tree(d, "standard library of %s" % interpreter, skip=skip)
    for so in _shared_objects(d, skip):
        add_extension(tree, elf_solver, so, "standard library extension module", warn)


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


def _shared_objects(d, skip=lambda path: False):
    for top, dirs, files in os.walk(d):
        dirs[:] = [x for x in dirs if not skip(os.path.join(top, x))]
        for f in files:
            if f.endswith(".so") or ".so." in f:
                yield os.path.join(top, f)
