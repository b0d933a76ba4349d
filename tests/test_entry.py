"""hpcrun's own entry (hpcrun/entry.py, `hpcrun install-entry`, docs/install.md).

The suite's hpcrun is the venv's bin/hpcrun after `make venv` ran install-entry:
Python isolated and without site, the rank's modules from one bundle.  Here: that
it is so, that a joining rank touches the install tree at most 10 times and loads
no module file, and, on a copy of the install, that a bundle older than the package
(or missing) is never used and the modules come from their files.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from checks import assert_one_error
from hpcrun import errors

import hpcrun

SITE = os.path.dirname(os.path.dirname(os.path.abspath(hpcrun.__file__)))
TRACED = "open,openat,openat2,stat,lstat,fstat,newfstatat,statx,readlink,readlinkat,access,faccessat," \
         "faccessat2,getdents64,execve"


def _entry_head(path):
    with open(path) as f:
        text = f.read()
    return text.splitlines()[0], re.search(r"^SITE = '(.*)'$", text, re.M)


@pytest.mark.parametrize("name", ["hpcrun", "run-singularity"])
def test_installed_entry_is_isolated(hpcrun_bin, name):
    python_entry = os.path.join(os.path.dirname(hpcrun_bin), name + "-py")     # behind the compiled front
    first, site = _entry_head(python_entry if os.path.isfile(python_entry) else
                              os.path.join(os.path.dirname(hpcrun_bin), name))
    python = first[2:].split()[0]
    assert first == "#!%s -IS" % python, first
    assert os.access(python, os.X_OK) and not python.startswith(sys.prefix + "/"), python   # not the venv's
    assert site and site.group(1) == SITE
    bundle = os.path.join(SITE, "hpcrun", "__pycache__", "hpcrun.%s.bundle" % sys.implementation.cache_tag)
    assert os.path.isfile(bundle)


def test_check_names_the_entry(hpcrun_bin, copied_install):
    import json
    r = subprocess.run([hpcrun_bin, "check", "--json"], capture_output=True, text=True, timeout=60, cwd="/")
    rows = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    front = os.path.isfile(hpcrun_bin + "-py") and "compiled join-only front %s, else " % os.path.normpath(hpcrun_bin) or ""
    assert rows["entry"] == {"name": "entry", "value": front + "Python -I -S, the rank's modules from the bundle",
                             "status": "ok"}
    site, bin_dir, run, install = copied_install          # installed, then the package changes: stale
    assert install().returncode == 0
    (site / "hpcrun" / "new-file").write_text("")
    rows = {c["name"]: c for c in json.loads(run("check", "--json").stdout)["checks"]}
    assert rows["entry"]["status"] == "warn" and "stale" in rows["entry"]["value"]


def _calls_before_exec(trace):
    """The traced lines before the last successful execve (the program's)."""
    lines = trace.splitlines()
    execs = [i for i, ln in enumerate(lines) if ln.startswith("execve(") and ln.rstrip().endswith("= 0")]
    return lines[:execs[-1]] if execs else lines


def test_joining_rank_touches_the_install_tree_10_times(as_user, test_user, hpcrun_bin, busybox_image):
    if os.path.isfile(hpcrun_bin + "-py"):          # the Python path behind the compiled front (test_front.py)
        hpcrun_bin += "-py"
    out_dir = tempfile.mkdtemp(prefix="entry-strace-")
    os.chown(out_dir, test_user.pw_uid, test_user.pw_gid)
    out = os.path.join(out_dir, "trace")
    env = {"HPCRUN_LINGER": "20"}          # the first run's container is still there for the second
    try:
        r = as_user([hpcrun_bin, busybox_image, "true"], env=env, cwd="/")
        assert r.returncode == 0, r.stderr
        r = as_user(["strace", "-qq", "-y", "-e", "trace=" + TRACED, "-o", out, hpcrun_bin, busybox_image,
                     "true"], env=env, cwd="/")
        assert r.returncode == 0, r.stderr
        with open(out) as f:
            calls = _calls_before_exec(f.read())
    finally:
        shutil.rmtree(out_dir)
    install = os.path.commonpath([os.path.dirname(hpcrun_bin), SITE])
    on_install = [ln for ln in calls if (install + "/" in ln or '"%s"' % install in ln)
                  and not ln.startswith("execve(")]
    assert len(on_install) <= 10, "\n".join(on_install)
    pkg = os.path.join(SITE, "hpcrun") + "/"
    assert not [ln for ln in on_install if pkg in ln and (".py\"" in ln or ".pyc" in ln)], on_install
    # the interpreter starts without site: no .pth, no site-packages listing
    assert not [ln for ln in calls if ".pth" in ln or "getdents64(" in ln and SITE + ">" in ln], calls
    # _ctypes (setns, prctl) comes straight from its file: lib-dynload is not listed (entry.extension_spec)
    assert not [ln for ln in calls if "getdents64(" in ln and "lib-dynload" in ln], calls
    assert [ln for ln in calls if ln.startswith("openat(") and "/lib-dynload/_ctypes." in ln], calls


def test_joining_rank_imports_no_os_and_runs_its_modules_preloaded(as_user, hpcrun_bin, busybox_image):
    """os costs a rank ~1 ms (rankos.py); the launch's modules are run from the bundle without the
    import system (entry.PRELOAD): -X importtime lists only what went through it."""
    from hpcrun import entry
    if os.path.isfile(hpcrun_bin + "-py"):
        hpcrun_bin += "-py"
    python = _entry_head(hpcrun_bin)[0][2:].split()[0]
    env = {"HPCRUN_LINGER": "20"}
    for _ in range(2):                       # the second joins the first one's container
        r = as_user([python, "-IS", "-X", "importtime", hpcrun_bin, busybox_image, "true"], env=env, cwd="/")
        assert r.returncode == 0, r.stderr
    imported = {ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert imported and not imported & {"os", "_collections_abc", "posixpath"}, sorted(imported)
    assert not imported & set(entry.PRELOAD), sorted(imported)
    assert "hpcrun.rankcalls" in imported          # not preloaded: only what joins needs _ctypes


def test_preloaded_modules_are_as_imported(hpcrun_bin):
    """What entry.Bundle.preload sets up is what the import system would have."""
    from hpcrun import entry
    if os.path.isfile(hpcrun_bin + "-py"):
        hpcrun_bin += "-py"
    with open(hpcrun_bin) as f:
        text = f.read()
    python = text.splitlines()[0][2:].split()[0]
    show = ("import json\n"
            "ms = {n: m for n, m in sys.modules.items() if n.startswith('hpcrun')}\n"
            "print(json.dumps({n: [m.__name__, m.__file__, m.__package__, m.__spec__.name, m.__spec__.origin,"
            " m.__spec__.loader is m.__loader__ is sys.meta_path[0], getattr(m, '__path__', None),"
            " n == 'hpcrun' or getattr(ms['hpcrun'], n[7:], None) is m] for n, m in ms.items()}))\n")
    body = text.split("\n", 1)[1]
    assert body.count("from hpcrun.cli import main\nsys.exit(main())") == 1
    code = body.replace("from hpcrun.cli import main\nsys.exit(main())", "'os' in sys.modules and sys.exit(3)\n" + show)
    r = subprocess.run([python, "-IS", "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    import json
    got = json.loads(r.stdout)
    assert sorted(got) == sorted(entry.PRELOAD)
    pkg = os.path.join(SITE, "hpcrun")
    for name, (mod_name, file, package, spec_name, origin, loader, path, attr) in got.items():
        expect = os.path.join(pkg, "__init__.py") if name == "hpcrun" else os.path.join(pkg, name[7:] + ".py")
        assert (mod_name, spec_name, file, origin, package, loader, attr) == (name, name, expect, expect, "hpcrun",
                                                                              True, True), name
        assert path == ([pkg] if name == "hpcrun" else None), name


@pytest.fixture
def copied_install(tmp_path):
    """A copy of the installed package (no __pycache__) with its own bin/: (site, bin, run)."""
    site, bin_dir = tmp_path / "site", tmp_path / "bin"
    shutil.copytree(os.path.join(SITE, "hpcrun"), site / "hpcrun",
                    ignore=shutil.ignore_patterns("__pycache__"))
    bin_dir.mkdir()
    python = os.path.realpath(sys.executable)

    def run(*argv, traced=False):
        cmd = [python, "-IS"] + (["-v"] if traced else []) + [str(bin_dir / "hpcrun")] + list(argv)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")

    def install():
        code = "import sys; sys.path.insert(0, sys.argv[1]); from hpcrun.cli import main; sys.exit(main(sys.argv[2:]))"
        return subprocess.run([python, "-I", "-S", "-c", code, str(site), "install-entry", "--bin", str(bin_dir),
                               "--no-front"],           # the Python entry's own tests; the front: test_front.py
                              capture_output=True, text=True, timeout=60, cwd="/")
    return site, bin_dir, run, install


def _from_files(stderr, site):
    """Modules of the package Python loaded from files (python -v)."""
    return re.findall(r"code object from '?(%s/hpcrun/[^' ]+)" % re.escape(str(site)), stderr)


def test_bundle_is_used_and_never_when_stale(copied_install):
    site, bin_dir, run, install = copied_install
    r = install()
    assert r.returncode == 0, r.stderr
    assert _entry_head(bin_dir / "hpcrun")[1].group(1) == str(site)
    assert sorted(os.listdir(bin_dir)) == ["hpcrun", "run-singularity"]
    r = subprocess.run([str(bin_dir / "run-singularity")], capture_output=True, text=True, timeout=60, cwd="/",
                       env={"PATH": "/usr/bin:/bin", "PYTHONINSPECT": "1"})
    assert (r.returncode, r.stderr) == (errors.USAGE, "usage: run-singularity IMAGE [ARGS...]\n")
    r = run("version", traced=True)
    assert (r.returncode, r.stdout) == (0, "hpcrun %s\n" % hpcrun.VERSION), r.stderr
    assert _from_files(r.stderr, site) == []

    # a new version lands (as pip does: new files, so the directory changes): the old bundle is not run
    init = site / "hpcrun" / "__init__.py"
    new = site / "hpcrun" / "__init__.py.new"
    new.write_text(init.read_text().replace('VERSION = "%s"' % hpcrun.VERSION, 'VERSION = "9.9.9"'))
    os.rename(new, init)
    r = run("version", traced=True)
    assert (r.returncode, r.stdout) == (0, "hpcrun 9.9.9\n"), r.stderr
    assert _from_files(r.stderr, site), r.stderr

    # install-entry again: bundled again, the new code
    assert install().returncode == 0
    r = run("version", traced=True)
    assert (r.returncode, r.stdout, _from_files(r.stderr, site)) == (0, "hpcrun 9.9.9\n", [])

    # no bundle at all (removed, or another Python): the files
    for p in (site / "hpcrun" / "__pycache__").glob("hpcrun.*.bundle"):
        p.unlink()
    r = run("version", traced=True)
    assert (r.returncode, r.stdout) == (0, "hpcrun 9.9.9\n"), r.stderr
    assert _from_files(r.stderr, site)


def test_install_entry_errors(copied_install, as_user, test_user, hpcrun_bin, tmp_path):
    site, bin_dir, run, install = copied_install
    python = os.path.realpath(sys.executable)
    code = "import sys; sys.path.insert(0, sys.argv[1]); from hpcrun.cli import main; sys.exit(main(sys.argv[2:]))"

    def entry(*argv):
        return subprocess.run([python, "-I", "-S", "-c", code, str(site), "install-entry"] + list(argv),
                              capture_output=True, text=True, timeout=60, cwd="/")
    assert_one_error(entry("--bin", str(tmp_path / "no-such-dir")), errors.NOINPUT, "no-such-dir")
    assert_one_error(entry("--frob"), errors.USAGE, "--frob")
    if os.getuid() != 0:
        return
    # a bin directory on a read-only mount (a private one): refused before the bundle is written
    ro_bin = tmp_path / "ro-bin"
    ro_bin.mkdir()
    cmd = [python, "-I", "-S", "-c", code, str(site), "install-entry", "--bin", str(ro_bin)]
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"', "-",
                        str(ro_bin)] + cmd, capture_output=True, text=True, timeout=60, cwd="/")
    assert_one_error(r, errors.CANTCREATE, "not writable", str(ro_bin))
    assert not [f for f in os.listdir(site / "hpcrun" / "__pycache__") if ".bundle" in f]
    # a user who does not own the install: refused, nothing written
    venv_bin = os.path.dirname(hpcrun_bin)
    before = [sorted(os.listdir(d)) for d in (os.path.join(SITE, "hpcrun", "__pycache__"), venv_bin)]
    r = as_user([hpcrun_bin, "install-entry"])
    assert_one_error(r, errors.CANTCREATE, "cannot install the entry")
    # ... with a bin directory of its own: the bundle it cannot write is named (not a temp name), and
    # the user's directory stays empty
    own_bin = tempfile.mkdtemp(prefix="entry-bin-")
    try:
        os.chown(own_bin, test_user.pw_uid, test_user.pw_gid)
        r = as_user([hpcrun_bin, "install-entry", "--bin", own_bin])
        assert_one_error(r, errors.CANTCREATE, "cannot install the entry")
        assert r.stderr.rstrip().endswith(".bundle)") and ".tmp-" not in r.stderr, r.stderr
        assert os.listdir(own_bin) == []
    finally:
        shutil.rmtree(own_bin)
    assert [sorted(os.listdir(d)) for d in (os.path.join(SITE, "hpcrun", "__pycache__"), venv_bin)] == before


def test_add_site_dirs_finds_what_site_would(copied_install, tmp_path):
    """-S leaves site out; a command that needs a package from a site directory (hpcrun
    broadcast: mpi4py) gets them back with entry.add_site_dirs(), .pth files included."""
    site = copied_install[0]
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "probe_mod.py").write_text("X = 'found'\n")
    (site / "probe.pth").write_text(str(extra) + "\n")
    code = ("import sys; sys.path.append(sys.argv[1]); from hpcrun import entry\n"
            "try:\n    import probe_mod\nexcept ImportError:\n    print('not before')\n"
            "entry.add_site_dirs(); import probe_mod; print(probe_mod.X)")
    r = subprocess.run([os.path.realpath(sys.executable), "-IS", "-c", code, str(site)], capture_output=True,
                       text=True, timeout=60, cwd="/")
    assert (r.returncode, r.stdout) == (0, "not before\nfound\n"), r.stderr
