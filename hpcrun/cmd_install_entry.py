"""hpcrun install-entry [--bin DIR]: the fast, isolated `hpcrun` (docs/install.md).

Run once after `pip install`, by whoever owns the install.  It writes

  <site-packages>/hpcrun/__pycache__/hpcrun.<tag>.bundle   the modules a rank
        imports (entry.RANK_MODULES), compiled by this Python, in one file
  DIR/hpcrun, DIR/run-singularity    `#!<python> -IS` and entry.BOOT, in place
        of pip's console scripts (DIR: where the hpcrun that runs this lives;
        <python>: the real interpreter behind this venv's)

each atomically (temp file + rename).  `pip install` again puts pip's script
back and leaves the bundle stale (the package directory changed), never used.
"""
import os
import sys

from hpcrun import errors

SHEBANG_MAX = 256          # the kernel reads a #! line from the first 256 bytes (BINPRM_BUF_SIZE)


def package_dir():
    import hpcrun
    return os.path.dirname(os.path.abspath(hpcrun.__file__))


def bundle_path(pkg):
    return os.path.join(pkg, "__pycache__", "hpcrun.%s.bundle" % sys.implementation.cache_tag)


def _write_atomic(path, data, mode):
    tmp = "%s.tmp-%d" % (path, os.getpid())
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)                 # whatever the umask
        os.rename(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename == tmp:
            raise OSError(e.errno, e.strerror, path) from None     # name the file, not our temp name
        raise


def write_bundle(pkg):
    from hpcrun import entry
    os.makedirs(os.path.join(pkg, "__pycache__"), exist_ok=True)   # first: entry.make takes the directory's mtime
    path = bundle_path(pkg)
    _write_atomic(path, entry.make(pkg), 0o644)
    return path, len(entry.RANK_MODULES)


# the scripts pip's console_scripts make (setup.cfg), and the function in cli.py each runs
SCRIPTS = (("hpcrun", "main"), ("run-singularity", "run_singularity"))


def entry_script(python, site, function="main"):
    from hpcrun import entry
    return "#!%s -IS\n%s" % (python, entry.BOOT % {"site": site, "function": function})


def interpreter():
    """The real interpreter behind a venv's python: with -I -S the venv adds nothing (SITE is set
    by hand), and its python would cost a readlink and pyvenv.cfg reads per start."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return base if os.access(base, os.X_OK) else sys.executable


def default_bin():
    here = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else ""   # a link: its file
    if os.path.basename(here) == "hpcrun":
        return os.path.dirname(here)
    import sysconfig
    return sysconfig.get_path("scripts")


def main(argv):
    bin_dir = None
    args = list(argv)
    while args:
        a = args.pop(0)
        if a in ("-h", "--help"):
            print(__doc__.split("\n\n")[0])
            return 0
        if a == "--bin" and args:
            bin_dir = args.pop(0)
        elif a.startswith("--bin="):
            bin_dir = a[6:]
        else:
            raise errors.Error(errors.USAGE, "usage: hpcrun install-entry [--bin DIR]", a)
    bin_dir = os.path.abspath(bin_dir or default_bin())
    python = interpreter()
    if not python or len("#!%s -IS\n" % python) > SHEBANG_MAX or any(c.isspace() for c in python):
        raise errors.Error(errors.USAGE, "this Python's path cannot go on a #! line (too long or a space); "
                           "keep pip's console script", python)
    if not os.path.isdir(bin_dir):
        raise errors.Error(errors.NOINPUT, "no such directory", bin_dir)
    if not os.access(bin_dir, os.W_OK):        # before the bundle: a refusal writes nothing
        raise errors.Error(errors.CANTCREATE, "cannot install the entry: the directory is not writable", bin_dir)
    pkg = package_dir()
    site = os.path.dirname(pkg)
    try:
        path, n = write_bundle(pkg)
        for name, function in SCRIPTS:
            _write_atomic(os.path.join(bin_dir, name), entry_script(python, site, function).encode(), 0o755)
    except OSError as e:
        raise errors.Error(errors.CANTCREATE, "cannot install the entry: %s" % e.strerror, e.filename or bin_dir)
    print("hpcrun: %s: %d modules in one file" % (path, n))
    print("hpcrun: %s: #!%s -IS (python isolated, no site)" % (
        ", ".join(os.path.join(bin_dir, name) for name, _ in SCRIPTS), python))
    return 0
