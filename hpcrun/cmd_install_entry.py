"""hpcrun install-entry [--bin DIR] [--no-front] [--no-squashfuse]: the fast, isolated `hpcrun` (docs/install.md).

Run once after `pip install`, by whoever owns the install.  It writes

  <site-packages>/hpcrun/__pycache__/hpcrun.<tag>.bundle   the modules a rank
        imports (entry.RANK_MODULES), compiled by this Python, in one file
  DIR/hpcrun, DIR/run-singularity    `#!<python> -IS` and entry.BOOT, in place
        of pip's console scripts (DIR: where the hpcrun that runs this lives;
        <python>: the real interpreter behind this venv's)
  with a C compiler (cc, else gcc) and without --no-front: DIR/hpcrun is the
        compiled join-only front (hpcrun/front/front.c), the script above is
        DIR/hpcrun-py, and the front execs it for every rank it does not serve
  with a C compiler, libsquashfuse-dev and libfuse3-dev, and without
        --no-squashfuse: <site-packages>/hpcrun/libexec/hpcrun-squashfuse, the
        FUSE daemon a keeper mounts images with (hpcrun/front/squashfuse.c;
        docs/staging.md); without it, Debian's squashfuse_ll

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
    for d in ("__pycache__", "libexec"):        # first: entry.make takes the directory's mtime (the daemon's
        os.makedirs(os.path.join(pkg, d), exist_ok=True)      # libexec/ made after it left every bundle stale)
    path = bundle_path(pkg)
    _write_atomic(path, entry.make(pkg), 0o644)
    return path, len(entry.RANK_MODULES)


def c_string(text):
    """text as a C string literal (a -D value: argv, no shell)."""
    out = []
    for b in os.fsencode(text):
        c = chr(b)
        out.append("\\" + c if c in '"\\' else c if 32 <= b < 127 and c != "?" else "\\%03o" % b)
    return '"%s"' % "".join(out)


def compiler():
    import shutil
    return shutil.which("cc") or shutil.which("gcc")


def build_front(cc, pkg, site, bin_dir):
    """Compile the front into a temp file in bin_dir: (its path, None), or (None, why)."""
    tmp = os.path.join(bin_dir, "hpcrun.tmp-%d" % os.getpid())
    return _compile([cc, "-O2", "-DPY_ENTRY=" + c_string(os.path.join(bin_dir, "hpcrun-py")),
                     "-DSITE=" + c_string(site), "-o", tmp, os.path.join(pkg, "front", "front.c")], tmp)


def build_squashfuse(cc, pkg, daemon):
    """Compile the FUSE daemon into a temp file beside `daemon` (its place in <pkg>/libexec, which
    write_bundle made): (its path, None), or (None, why).  Its headers come from libsquashfuse-dev
    and libfuse3-dev; no pkg-config needed."""
    tmp = "%s.tmp-%d" % (daemon, os.getpid())
    return _compile([cc, "-O2", "-o", tmp, os.path.join(pkg, "front", "squashfuse.c"),
                     "-lsquashfuse_ll", "-lsquashfuse", "-lfuse3"], tmp)


def _compile(cmd, tmp):
    import subprocess
    cc = cmd[0]
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        r = None
        why = str(e)
    if r is not None and r.returncode == 0:
        os.chmod(tmp, 0o755)
        return tmp, None
    try:
        os.unlink(tmp)
    except OSError:
        pass
    if r is not None:
        lines = r.stderr.decode(errors="replace").strip().splitlines()
        errs = [ln for ln in lines if "error:" in ln]          # gcc ends with "compilation terminated."
        why = "%s exited %d: %s" % (cc, r.returncode, (errs or lines or [""])[0 if errs else -1])
    return None, why


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
    if os.path.basename(here) in ("hpcrun", "hpcrun-py"):       # hpcrun-py: started by the front
        return os.path.dirname(here)
    import sysconfig
    return sysconfig.get_path("scripts")


def main(argv):
    bin_dir = None
    front = squashfuse = True
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
        elif a == "--no-front":
            front = False
        elif a == "--no-squashfuse":
            squashfuse = False
        else:
            raise errors.Error(errors.USAGE, "usage: hpcrun install-entry [--bin DIR] [--no-front] "
                               "[--no-squashfuse]", a)
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
    cc = compiler() if front or squashfuse else None
    built = why = None
    from hpcrun import stage
    daemon = stage.own_fuse_program(pkg)
    daemon_why = "--no-squashfuse" if not squashfuse else "no C compiler: cc or gcc" if not cc else None
    try:
        path, n = write_bundle(pkg)           # first: where it cannot be written, nothing is
        if squashfuse and cc:
            daemon_tmp, daemon_why = build_squashfuse(cc, pkg, daemon)
            if daemon_tmp:
                os.rename(daemon_tmp, daemon)
        if daemon_why:
            try:
                os.unlink(daemon)                       # a former install's: keepers would still run it
            except FileNotFoundError:
                pass
        if cc and front:
            built, why = build_front(cc, pkg, site, bin_dir)
        for name, function in SCRIPTS:
            # with the front, the script is hpcrun-py, written before the front that execs it
            target = "hpcrun-py" if built and name == "hpcrun" else name
            _write_atomic(os.path.join(bin_dir, target), entry_script(python, site, function).encode(), 0o755)
        if built:
            os.rename(built, os.path.join(bin_dir, "hpcrun"))
            built = None
        else:
            try:
                os.unlink(os.path.join(bin_dir, "hpcrun-py"))      # a former front's: stale
            except FileNotFoundError:
                pass
    except OSError as e:
        raise errors.Error(errors.CANTCREATE, "cannot install the entry: %s" % e.strerror, e.filename or bin_dir)
    finally:
        if built:
            os.unlink(built)
    print("hpcrun: %s: %d modules in one file" % (path, n))
    scripts = [os.path.join(bin_dir, name) for name, _ in SCRIPTS]
    if os.path.isfile(os.path.join(bin_dir, "hpcrun-py")):
        scripts[0] += "-py"
    print("hpcrun: %s: #!%s -IS (python isolated, no site)" % (", ".join(scripts), python))
    if daemon_why:
        print("hpcrun: images mount with squashfuse_ll (%s)" % (
            daemon_why if daemon_why.startswith(("--", "no C")) else "the FUSE daemon did not build: " + daemon_why))
    else:
        print("hpcrun: %s: the FUSE daemon images mount with (no request per open)" % daemon)
    hpcrun = os.path.join(bin_dir, "hpcrun")
    if not front:
        print("hpcrun: %s: the Python entry (--no-front)" % hpcrun)
    elif not cc:
        print("hpcrun: %s: the Python entry (no C compiler: cc or gcc)" % hpcrun)
    elif why:
        print("hpcrun: %s: the Python entry (the compiled front did not build: %s)" % (hpcrun, why))
    else:
        print("hpcrun: %s: the compiled join-only front (%s); every rank it does not serve runs %s-py"
              % (hpcrun, cc, hpcrun))
    return 0
