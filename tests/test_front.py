"""The compiled join-only front (hpcrun/front/front.c; docs/install.md, "The compiled front").

`make venv` ran install-entry with gcc present: the venv's bin/hpcrun is the front and
bin/hpcrun-py the Python entry.  Here, against a real keeper of a user of this module's own
(hpcrun-front: its run directory is changed in ways that would disturb other tests' users):
a rank whose ticket holds is served without Python (strace: no exec of hpcrun-py), per-rank
variables keep their own values, and every doubt -- the ticket itself, its directories, its
observations on the host and inside, the keeper -- is the Python path (HPCRUN_FRONT_DEBUG
names which; the launch then is the ordinary one).  Tickets are written with hpcrun.ticket,
the Python path's own writer.
"""
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from checks import assert_one_error
from imagetools import is_elf
import hpcrun

BIN = os.path.dirname(sys.executable)
FRONT = os.path.join(BIN, "hpcrun")
PY_ENTRY = os.path.join(BIN, "hpcrun-py")
PKG = os.path.dirname(os.path.abspath(hpcrun.__file__))
USER = "hpcrun-front"


pytestmark = pytest.mark.skipif(not (is_elf(FRONT) and os.path.isfile(PY_ENTRY)),
                                reason="no compiled front installed (no C compiler when make venv ran)")

from hpcrun.ticket import encode, identity, key as compute_key, stamp  # the Python path's own writer


class Front:
    """The module's user, its keeper, and ranks started through the front with an exact environment."""

    def __init__(self, user, image):
        self.user, self.image = user, image
        self.uid, self.gid = user.pw_uid, user.pw_gid
        self.groups = os.getgrouplist(user.pw_name, user.pw_gid)      # setpriv --init-groups
        self.run_dir = "/tmp/hpcrun-%d" % self.uid
        self.tickets = os.path.join(self.run_dir, "tickets")
        self.cwd = os.path.join(user.pw_dir, "front-cwd")              # the home is bound inside
        self.env = {"PATH": "/usr/bin:/bin", "HOME": user.pw_dir, "LANG": "C.UTF-8", "HPCRUN_LINGER": "300",
                    "HPCRUN_FRONT_DEBUG": "1"}
        self.keys = set()

    def cmd(self, argv, env):
        return ["setpriv", "--reuid=%d" % self.uid, "--regid=%d" % self.gid, "--init-groups", "--",
                "env", "-i"] + ["%s=%s" % kv for kv in env.items()] + list(argv)

    def run(self, args, env=None, prog=FRONT, trace=None):
        env = dict(self.env, **(env or {}))
        prefix = ["strace", "-f", "-qq", "-e", "trace=" + trace[1], "-o", trace[0]] if trace else []
        return subprocess.run(prefix + self.cmd([prog] + list(args), env), cwd=self.cwd, capture_output=True,
                              text=True, timeout=120)

    def key_of(self, args, env=None):
        env = dict(self.env, **(env or {}))
        k = compute_key(list(args), {os.fsencode(a): os.fsencode(b) for a, b in env.items()}, self.cwd,
                        self.uid, self.gid, self.groups, stamp(PKG))
        self.keys.add(k)
        return k

    def write(self, name, data, mode=0o600):
        os.makedirs(self.tickets, 0o700, exist_ok=True)
        os.chown(self.tickets, self.uid, self.gid)
        path = os.path.join(self.tickets, name)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.chown(path + ".tmp", self.uid, self.gid)
        os.chmod(path + ".tmp", mode)
        os.rename(path + ".tmp", path)
        return path

    def inside(self, path):
        return "/proc/%d/root%s" % (self.pid, path)


@pytest.fixture(scope="module")
def front(busybox_image):
    if os.getuid() != 0:
        pytest.skip("needs root: a user of its own, run directories of another owner")
    created = False
    try:
        user = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
        user, created = pwd.getpwnam(USER), True
    f = Front(user, busybox_image)
    os.makedirs(f.cwd, exist_ok=True)
    os.chown(f.cwd, f.uid, f.gid)
    # the keeper: a first launch (the Python path) as a rank (the plan depends on PMIX_RANK's presence),
    # then its key and record
    r = f.run([busybox_image, "true"], env={"PMIX_RANK": "0"})
    assert r.returncode == 0, r.stderr
    r = f.run(["--dry-run", busybox_image, "true"], env={"PMIX_RANK": "0"}, prog=PY_ENTRY)
    f.key = json.loads(r.stdout)["key"]
    with open(os.path.join(f.run_dir, f.key + ".pid")) as rec:
        pid, f.start = rec.read().split()
    f.pid = int(pid)
    try:
        yield f
    finally:
        for k in f.keys:
            for name in (k, k + ".tmp"):
                try:
                    os.unlink(os.path.join(f.tickets, name))
                except FileNotFoundError:
                    pass
        # the user is this module's own: its processes (the keeper) are ours to end, then its run directory
        for _ in range(100):
            mine = [int(p) for p in os.listdir("/proc") if p.isdigit() and _owner("/proc/" + p) == f.uid]
            if not mine:
                break
            for pid in mine:
                try:
                    os.kill(pid, 15)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        shutil.rmtree(f.cwd, ignore_errors=True)
        shutil.rmtree(f.run_dir, ignore_errors=True)
        if created:
            subprocess.run(["userdel", "-r", USER], capture_output=True)


def _owner(path):
    try:
        return os.stat(path).st_uid
    except OSError:
        return None


PROG = ["/bin/sh", "-c", 'echo "served $PMIX_RANK $X $PWD"']
ARGS = [None, "/bin/sh", "-c", "echo this is the launch as asked"]      # [0]: the image


def _observations(f):
    """One of each OP on both sides, with the outcomes Python would record."""
    home = f.user.pw_dir
    for name, text in (("probe", "host"), ("inside-probe", "inside")):
        p = os.path.join(f.cwd, name)
        if not os.path.exists(p):
            with open(p, "w") as out:
                out.write(text)
            os.chown(p, f.uid, f.gid)
    link = os.path.join(f.cwd, "link")
    for path, target in ((link, "probe"), (os.path.join(f.cwd, "abs-link"), "/bin/busybox")):
        if not os.path.islink(path):
            os.symlink(target, path)
            os.lchown(path, f.uid, f.gid)
    names = "N" + "/".join(sorted(os.listdir(f.cwd)))
    obs = [("host", "stat", ".", identity(os.stat(f.cwd))),
           ("host", "stat", f.image, identity(os.stat(f.image))),
           ("host", "stat", "probe", identity(os.stat(os.path.join(f.cwd, "probe")))),
           ("host", "lstat", "link", identity(os.lstat(link))),
           ("host", "readlink", "link", "Lprobe"),
           ("host", "readlink", "probe", "E22"),
           ("host", "access4", "probe", "1"),
           ("host", "access2", f.image, "0"),
           ("host", "open", "link", identity(os.stat(os.path.join(f.cwd, "probe")))),
           ("host", "openl", "link", "E40"),
           ("host", "listdir", ".", names),
           ("host", "stat", "no-such", "E2")]
    ipath = f.cwd + "/inside-probe"
    obs += [("inside", "stat", "/bin/busybox", identity(os.stat(f.inside("/bin/busybox")))),
            ("inside", "stat", ipath, identity(os.stat(f.inside(ipath)))),
            ("inside", "lstat", f.cwd + "/link", identity(os.lstat(f.inside(f.cwd + "/link")))),
            ("inside", "readlink", f.cwd + "/link", "Lprobe"),
            ("inside", "access1", "/bin/sh", "1"),
            ("inside", "access2", "/bin/busybox", "0"),
            ("inside", "open", f.cwd + "/link", identity(os.stat(f.inside(f.cwd + "/probe")))),
            ("inside", "openl", f.cwd + "/link", "E40"),
            ("inside", "listdir", f.cwd, names),
            ("inside", "chdir", f.cwd, "0"),
            ("inside", "stat", f.cwd + "/abs-link", identity(os.stat(f.inside("/bin/busybox")))),  # in its root
            ("inside", "stat", "/no-such", "E2")]
    return obs


def _ticket(f, obs=None, args=None, keeper=None, expires=None, env=None, passed=("PMIX_RANK",)):
    env = env if env is not None else {"PATH": "/bin", "X": "from-ticket", "PMIX_RANK": "0", "PWD": f.cwd}
    return encode(keeper or (f.key, f.pid, f.start, True), _observations(f) if obs is None else obs, f.cwd,
                  args or PROG, env, set(passed), expires or int(time.time()) + 600)


def _served(f, rank="3", env=None, trace=None):
    args = [f.image] + ARGS[1:]
    return f.run(args, env=dict({"PMIX_RANK": rank}, **(env or {})), trace=trace)


def _miss(r, why):
    assert "hpcrun: front: python path: " + why in r.stderr, r.stderr
    assert r.returncode == 0 and r.stdout == "this is the launch as asked\n", (r.stdout, r.stderr)


def test_a_held_ticket_is_served_without_python(front, tmp_path):
    f = front
    k = f.key_of([f.image] + ARGS[1:], {"PMIX_RANK": "0"})
    assert k == f.key_of([f.image] + ARGS[1:], {"PMIX_RANK": "99"})       # per-rank values are not in K
    f.write(k, _ticket(f))
    trace = str(tmp_path / "trace")
    r = _served(f, "3", trace=(trace, "execve,open,openat,stat,lstat,newfstatat,statx,readlink,access,faccessat2"))
    assert (r.returncode, r.stdout, r.stderr) == (0, "served 3 from-ticket %s\n" % f.cwd, "")
    with open(trace) as t:
        lines = t.read().splitlines()
    execs = [ln for ln in lines if "execve(" in ln and ln.endswith("= 0")]      # setpriv, env, the front, sh
    assert ('"%s"' % FRONT) in execs[-2] and '"/bin/sh"' in execs[-1], execs
    assert not [ln for ln in execs if "hpcrun-py" in ln or "python" in ln], execs
    # the install tree: the package directory's stamp for K, nothing else
    on_install = [ln for ln in lines if os.path.dirname(PKG) in ln and "execve(" not in ln]
    assert len(on_install) == 1 and '/hpcrun"' in on_install[0], on_install
    # another rank's value of a per-rank variable: the same ticket, its own value
    r = _served(f, "7")
    assert (r.returncode, r.stdout, r.stderr) == (0, "served 7 from-ticket %s\n" % f.cwd, "")


def test_a_changed_variable_is_another_key(front):
    f = front
    f.write(f.key_of([f.image] + ARGS[1:], {"PMIX_RANK": "0"}), _ticket(f))
    _miss(_served(f, env={"OMPI_MCA_foo": "1"}), "no ticket")
    _miss(f.run([f.image] + ARGS[1:] + [""], env={"PMIX_RANK": "0"}), "no ticket")


def _cut(data, what):
    fields = data.split(b"\0")[:-1]
    if what == "magic":
        fields[1] = b"2"
    elif what == "tag":
        fields.insert(fields.index(b"cwd"), b"host2")
    elif what == "truncated":
        cut = data[:len(data) // 2]
        return cut[:-1] if cut.endswith(b"\0") else cut
    elif what == "no end":
        fields = fields[:-1]
    elif what == "trailing":
        return data + b"x"
    elif what == "trailing field":
        fields.append(b"end")
    elif what == "no arg":
        i = fields.index(b"arg")
        del fields[i:i + 6]
    elif what == "relative inside":
        fields[fields.index(b"inside") + 2] = b"bin/busybox"
    elif what == "bad key":
        fields[5] = b"../" + fields[5]
    elif what == "unknown op":
        fields[fields.index(b"host") + 1] = b"statx"
    return b"".join(x + b"\0" for x in fields)


@pytest.mark.parametrize("what,why", [
    ("magic", "ticket header"), ("tag", "ticket cwd"), ("truncated", "ticket truncated"),
    ("no end", "ticket body"), ("trailing", "ticket truncated"), ("trailing field", "ticket body"),
    ("no arg", "ticket body"), ("relative inside", "an inside observation changed"),
    ("bad key", "ticket keeper"), ("unknown op", "a host observation changed")])
def test_a_ticket_it_cannot_read_exactly_is_the_python_path(front, what, why):
    f = front
    f.write(f.key_of([f.image] + ARGS[1:], {"PMIX_RANK": "0"}), _cut(_ticket(f), what))
    _miss(_served(f), why)


def test_expired_ticket(front):
    f = front
    f.write(f.key_of([f.image] + ARGS[1:], {"PMIX_RANK": "0"}), _ticket(f, expires=int(time.time())))
    _miss(_served(f), "ticket expired")


def test_observations_that_no_longer_hold(front):
    f = front
    k = f.key_of([f.image] + ARGS[1:], {"PMIX_RANK": "0"})
    f.write(k, _ticket(f))
    assert _served(f).stdout.startswith("served")
    with open(os.path.join(f.cwd, "probe"), "a") as out:          # a host file changed
        out.write("!")
    _miss(_served(f), "a host observation changed")
    f.write(k, _ticket(f))
    assert _served(f).stdout.startswith("served")
    with open(os.path.join(f.cwd, "inside-probe"), "a") as out:   # seen inside only (the home's bind)
        out.write("!")
    r = _served(f)
    _miss(r, "an inside observation changed")
    assert "inside stat %s/inside-probe" % f.cwd in r.stderr
    f.write(k, _ticket(f))                                         # a file that went
    assert _served(f).stdout.startswith("served")
    os.rename(os.path.join(f.cwd, "probe"), os.path.join(f.cwd, "probe.old"))
    _miss(_served(f), "a host observation changed")
    os.rename(os.path.join(f.cwd, "probe.old"), os.path.join(f.cwd, "probe"))


def test_keeper_dead_or_another(front):
    f = front
    k = f.key_of([f.image] + ARGS[1:], {"PMIX_RANK": "0"})
    f.write(k, _ticket(f, keeper=(f.key, f.pid, str(int(f.start) + 1), True)))     # its PID reused
    _miss(_served(f), "keeper gone or another")
    f.write(k, _ticket(f, keeper=(f.key, os.getpid(), f.start, True)))
    _miss(_served(f), "keeper gone or another")
    f.write(k, _ticket(f, keeper=("0" * 64, f.pid, f.start, True)))               # a key without a lock
    _miss(_served(f), "no lock file")
    f.write(k, _ticket(f))
    assert _served(f).stdout.startswith("served")


def test_directories_and_tickets_others_could_write(front, test_user):
    f = front
    k = f.key_of([f.image] + ARGS[1:], {"PMIX_RANK": "0"})
    path = f.write(k, _ticket(f))
    assert _served(f).stdout.startswith("served")
    for d, mode in ((f.run_dir, 0o770), (f.run_dir, 0o702), (f.tickets, 0o720)):
        os.chmod(d, mode)
        try:
            r = _served(f)
        finally:
            os.chmod(d, 0o700)
        assert "python path: no private" in r.stderr, r.stderr
    os.chmod(path, 0o622)
    _miss(_served(f), "ticket not a private regular file")
    # planted by another user: a ticket, the tickets directory, the run directory of theirs
    for p in (path, f.tickets, f.run_dir):
        os.chmod(path, 0o600)
        os.chown(p, test_user.pw_uid, test_user.pw_gid)
        try:
            r = _served(f)
        finally:
            os.chown(p, f.uid, f.gid)
        assert "hpcrun: front: python path: " in r.stderr and "served" not in r.stdout, r.stderr
    # a link to a good ticket
    os.rename(path, path + ".real")
    os.symlink(k + ".real", path)
    try:
        _miss(_served(f), "no ticket")
    finally:
        os.unlink(path)
        os.unlink(path + ".real")


def test_after_the_join_errors_are_the_python_paths(front):
    f = front
    k = f.key_of([f.image] + ARGS[1:], {"PMIX_RANK": "0"})
    f.write(k, _ticket(f, args=["/no-such-program"]))
    r = _served(f)
    assert_one_error(r, 127, "cannot execute: No such file or directory (/no-such-program)")
    f.write(k, _ticket(f, args=[f.cwd + "/probe"]))                      # mode 0644
    assert_one_error(_served(f), 126, "cannot execute: Permission denied (%s/probe)" % f.cwd)


def test_python_entry_that_cannot_start(tmp_path):
    out = tmp_path / "front"
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", '-DPY_ENTRY="%s/no-such/hpcrun-py"' % tmp_path, '-DSITE="%s"' % tmp_path,
                    "-o", str(out), os.path.join(PKG, "front", "front.c")], check=True)
    r = subprocess.run([str(out), "version"], capture_output=True, text=True, timeout=60)
    assert_one_error(r, 70, "cannot start the Python entry: No such file or directory (%s/no-such/hpcrun-py)"
                     % tmp_path)


def test_install_entry_builds_the_front_or_not(tmp_path):
    site, bin_dir = tmp_path / "site", tmp_path / "bin"
    shutil.copytree(PKG, site / "hpcrun", ignore=shutil.ignore_patterns("__pycache__"))
    bin_dir.mkdir()
    python = os.path.realpath(sys.executable)
    code = "import sys; sys.path.insert(0, sys.argv[1]); from hpcrun.cli import main; sys.exit(main(sys.argv[2:]))"

    def install(*extra, path=os.environ["PATH"]):
        return subprocess.run([python, "-I", "-S", "-c", code, str(site), "install-entry", "--bin", str(bin_dir)]
                              + list(extra), capture_output=True, text=True, timeout=300, cwd="/",
                              env={"PATH": path})

    def version():
        return subprocess.run([str(bin_dir / "hpcrun"), "version"], capture_output=True, text=True, timeout=60,
                              env={"HPCRUN_FRONT_DEBUG": "1"}, cwd="/")

    r = install()
    assert r.returncode == 0 and "the compiled join-only front" in r.stdout, r.stdout + r.stderr
    assert sorted(os.listdir(bin_dir)) == ["hpcrun", "hpcrun-py", "run-singularity"]
    assert is_elf(bin_dir / "hpcrun")
    with open(bin_dir / "hpcrun-py") as s:
        assert "SITE = %r" % str(site) in s.read()
    r = version()
    assert (r.returncode, r.stdout) == (0, "hpcrun %s\n" % hpcrun.VERSION), r.stderr
    assert "python path: a subcommand" in r.stderr, r.stderr        # the front ran, and handed over
    failing = tmp_path / "failing-cc"
    failing.mkdir()
    (failing / "cc").write_text("#!/bin/sh\necho 'front.c: boom' >&2\nexit 1\n")
    os.chmod(failing / "cc", 0o755)
    for extra, path, said in ((["--no-front"], os.environ["PATH"], "(--no-front)"),
                              ([], "/nonexistent", "(no C compiler: cc or gcc)"),
                              ([], str(failing), "(the compiled front did not build: %s/cc exited 1: front.c: boom)"
                               % failing)):
        r = install(*extra, path=path)
        assert r.returncode == 0 and "the Python entry " + said in r.stdout, r.stdout + r.stderr
        assert sorted(os.listdir(bin_dir)) == ["hpcrun", "run-singularity"]
        assert not is_elf(bin_dir / "hpcrun")
        r = version()
        assert (r.returncode, r.stdout, r.stderr) == (0, "hpcrun %s\n" % hpcrun.VERSION, "")
        assert install().returncode == 0 and is_elf(bin_dir / "hpcrun")


def test_a_slurm_tasks_image_lookup_is_part_of_its_ticket(front, busybox_squashfs):
    """A Slurm task's relative image is the cwd's, else the submit directory's (cmd_task_entry).
    The task entry records that lookup too: once a file of that name appears in the cwd, the next
    task is not served the submit directory's image from the ticket, but runs the cwd's."""
    f = front
    submit = os.path.join(f.user.pw_dir, "front-submit")
    os.makedirs(submit, exist_ok=True)
    for d in (submit,):
        os.chown(d, f.uid, f.gid)
    shutil.copy(f.image, os.path.join(submit, "task.img"))
    in_cwd = os.path.join(f.cwd, "task.img")
    task = {"HPCRUN_TASK_ARGV0": "readlink", "HPCRUN_TASK_IMAGE": "task.img", "SLURM_SUBMIT_DIR": submit,
            "SLURM_JOB_ID": "4242"}
    args = ["/proc/self/ns/mnt"]
    try:
        f.key_of(args, dict(task, SLURM_PROCID="0"))
        first = f.run(args, env=dict(task, SLURM_PROCID="0"))
        assert first.returncode == 0 and "python path: no ticket" in first.stderr, first.stderr
        served = f.run(args, env=dict(task, SLURM_PROCID="1"))
        assert (served.returncode, served.stdout, served.stderr) == (0, first.stdout, ""), served.stderr
        shutil.copy(busybox_squashfs, in_cwd)              # another image, now the cwd's
        os.chown(in_cwd, f.uid, f.gid)
        r = f.run(args, env=dict(task, SLURM_PROCID="2"))
        assert r.returncode == 0 and "python path: a host observation changed" in r.stderr, r.stderr
        assert r.stdout.startswith("mnt:[") and r.stdout != first.stdout     # the cwd's image: another container
    finally:
        shutil.rmtree(submit, ignore_errors=True)
        try:
            os.unlink(in_cwd)
        except FileNotFoundError:
            pass


def test_the_python_paths_ticket_serves_the_next_rank(front, tmp_path):
    """End to end: the first rank (no ticket) is the Python path, which writes the ticket; the next
    ranks, another value of a per-rank variable each, are served by the front from it."""
    f = front
    args = [f.image, "/bin/sh", "-c", 'echo "e2e $PMIX_RANK"']
    k = f.key_of(args, {"PMIX_RANK": "0"})
    r = f.run(args, env={"PMIX_RANK": "0"})
    assert (r.returncode, r.stdout) == (0, "e2e 0\n") and "python path: no ticket" in r.stderr, r.stderr
    assert os.path.isfile(os.path.join(f.tickets, k))
    trace = str(tmp_path / "trace")
    for rank in ("1", "2"):
        r = f.run(args, env={"PMIX_RANK": rank}, trace=(trace, "execve"))
        assert (r.returncode, r.stdout, r.stderr) == (0, "e2e %s\n" % rank, ""), r.stderr
        with open(trace) as t:
            assert not [ln for ln in t if "hpcrun-py" in ln], "ran the Python path"


def test_a_per_rank_variable_the_launch_sets_is_not_the_callers(front):
    """--env PMIX_RANK=0 (or an image's /.hpcrun/env) sets a per-rank variable to a constant: the
    Python path gives every rank that constant.  A first rank whose own value happened to be the
    same must not write `pass PMIX_RANK` (the next ranks would get their own value instead)."""
    f = front
    args = ["--env", "PMIX_RANK=0", f.image, "/bin/sh", "-c", 'echo "rank $PMIX_RANK"']
    r = f.run(args, env={"PMIX_RANK": "0"})
    assert (r.returncode, r.stdout) == (0, "rank 0\n") and "python path: no ticket" in r.stderr, r.stderr
    f.key_of(args, {"PMIX_RANK": "0"})                                   # cleaned up with the module
    assert f.run(args, env={"PMIX_RANK": "5"}, prog=PY_ENTRY).stdout == "rank 0\n"
    r = f.run(args, env={"PMIX_RANK": "5"})
    assert (r.returncode, r.stdout) == (0, "rank 0\n"), r.stderr


def test_the_first_wave_wait_keeps_the_callers_alarm(front):
    """A caller's pending alarm(2) (`perl -e 'alarm N; exec @ARGV'`, a job script's timeout) survives
    exec into the program on the Python path.  A rank that waits for its job's first rank must not
    take it over (alarm(60) then alarm(0) cancelled it: the program ran on past the caller's limit)."""
    import fcntl
    import signal
    f = front
    args = [f.image, "/bin/sh", "-c", "exec sleep 30"]
    wrapped = ["-e", "alarm 2; exec @ARGV"]
    os.makedirs(f.tickets, 0o700, exist_ok=True)
    os.chown(f.tickets, f.uid, f.gid)
    lock_path = os.path.join(f.tickets, f.key_of(args) + ".lock")
    with open(lock_path, "w") as held:                  # the job's first rank, still in Python
        os.chown(lock_path, f.uid, f.gid)
        fcntl.flock(held, fcntl.LOCK_EX)
        env = dict(f.env)
        rank = subprocess.Popen(f.cmd(["perl"] + wrapped + [FRONT] + args, env), cwd=f.cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(600):                            # until it waits on that lock
            if _holds(rank.pid, lock_path):
                break
            time.sleep(0.05)
    out, err = rank.communicate(timeout=60)
    os.unlink(lock_path)
    assert "waited for the first rank: done" in err, err
    assert (rank.returncode, out) == (-signal.SIGALRM, ""), err


def _holds(pid, path):
    try:
        return any(os.readlink("/proc/%d/fd/%s" % (pid, fd)) == path for fd in os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return False


def test_launches_that_write_no_ticket_leave_no_lock_behind(front):
    """The first-wave lock (tickets/<K>.lock, made by the front) goes once the Python path lets go
    of it, ticket or not: a run_dir elsewhere, a launch that looks up the passwd entry (no $HOME),
    one that fails (even before it parsed its options) each left one file per job."""
    f = front
    conf = os.path.join(f.cwd, "elsewhere.conf")
    with open(conf, "w") as c:
        c.write("run_dir = /tmp/hpcrun-front-elsewhere-%u\n")
    os.chown(conf, f.uid, f.gid)
    os.makedirs(f.tickets, 0o700, exist_ok=True)
    os.chown(f.tickets, f.uid, f.gid)
    before = set(os.listdir(f.tickets))
    try:
        for args, env, code in (([f.image, "true"], {"HPCRUN_CONF": conf}, 0),
                                ([f.image, "true"], {"HOME": ""}, 0),
                                ([f.image, "/no-such"], {}, 127),
                                (["--no-such-option", f.image, "true"], {}, 64)):
            r = f.run(args, env=dict(env, JOB="no-lock-%d" % len(f.keys)))
            f.key_of(args, dict(env, JOB="no-lock-%d" % len(f.keys)))
            assert r.returncode == code and "python path: no ticket" in r.stderr, r.stderr
            assert set(os.listdir(f.tickets)) == before, args
    finally:
        shutil.rmtree("/tmp/hpcrun-front-elsewhere-%d" % f.uid, ignore_errors=True)


@pytest.mark.parametrize("closed,prog", [("0", FRONT), ("1", FRONT), ("2", FRONT), ("1", PY_ENTRY), ("2", PY_ENTRY)])
def test_a_rank_with_a_closed_standard_fd_runs_its_program(front, closed, prog):
    """`hpcrun IMG prog 2>&-`: the program runs, with that fd closed as the caller had it, and
    holds no first-wave lock.  A new container (a bind of its own), so the keeper starts here
    (the Python path: cli._hold_closed_standard_fds)."""
    f = front
    tag = closed + os.path.basename(prog)
    out = os.path.join(f.cwd, "fds-" + tag)
    args = ["-B", "%s:/mnt/closed-%s" % (f.cwd, tag), f.image, "/bin/sh", "-c",
            'exec 3>%s; for n in 0 1 2; do [ -e /proc/$$/fd/$n ] && echo "fd $n" >&3; done; '
            'for x in /proc/$$/fd/*; do readlink $x; done >&3; true' % out]
    redirect = closed + ">&-"
    r = subprocess.run(f.cmd(["/bin/sh", "-c", 'exec "$@" ' + redirect, "sh", prog] + args,
                             dict(f.env, JOB="closed-" + tag)), cwd=f.cwd, capture_output=True, timeout=120)
    fds = None
    if os.path.exists(out):
        with open(out) as o:
            fds = o.read().splitlines()
        os.unlink(out)
    assert r.returncode == 0 and fds is not None, (r.returncode, r.stderr)
    assert not [x for x in fds if x.endswith(".lock")], fds
    assert [x for x in fds if x.startswith("fd ")] == ["fd %s" % n for n in "012" if n != closed], fds


def test_the_first_wave_lock_is_never_a_standard_fd(front):
    """A rank started with stdin, stdout and stderr closed: the front's lock took fd 2, which the
    Python path does not take as its lock (it only takes one above 2), so the program inherited
    the job's first-wave lock as its stderr.  Here a front whose Python entry shows what it got."""
    f = front
    entry, out = os.path.join(f.cwd, "show-entry"), os.path.join(f.cwd, "show-entry.out")
    with open(entry, "w") as e:
        e.write('#!/bin/sh\n{ echo "mark=$_HPCRUN_TICKET"; ls /proc/$$/fd; } > %s\n' % out)
    os.chmod(entry, 0o755)
    exe = os.path.join(f.cwd, "show-front")
    subprocess.run(["cc", "-O2", '-DPY_ENTRY="%s"' % entry, '-DSITE="%s"' % os.path.dirname(PKG), "-o", exe,
                    os.path.join(PKG, "front", "front.c")], check=True)
    mark = ""
    try:
        r = subprocess.run(f.cmd(["/bin/sh", "-c", 'exec "$@" 0<&- 1>&- 2>&-', "sh", exe, f.image, "true"],
                                 dict(f.env, JOB="closed-std")), cwd=f.cwd, timeout=60)
        with open(out) as o:
            mark, fds = o.read().split("\n", 1)
    finally:
        lock = os.path.join(f.tickets, mark[5:].partition(":")[0] + ".lock")     # no Python to remove it
        for p in (entry, out, exe) + ((lock,) if mark else ()):
            if os.path.exists(p):
                os.unlink(p)
    k, _, held = mark[5:].partition(":")
    assert r.returncode == 0 and len(k) == 64, mark
    assert int(held) > 2 and held in fds.split() and "2" not in fds.split(), (mark, fds)


def test_a_fifo_for_the_keepers_record_stops_no_rank(front):
    """The user's own program (it has the user's rights, and /tmp) puts a FIFO where the keeper's
    record <key>.pid was: a rank through the front, and the Python path, read it as no record (a
    new keeper), instead of waiting for a writer forever."""
    f = front
    args = ["-B", "%s:/mnt/fifo-record" % f.cwd, f.image, "/bin/sh", "-c", "echo ran"]
    env = {"JOB": "fifo-record"}
    r = f.run(args, env=env)
    assert (r.returncode, r.stdout) == (0, "ran\n"), r.stderr
    f.key_of(args, env)
    key = json.loads(f.run(["--dry-run"] + args, env=env, prog=PY_ENTRY).stdout)["key"]
    record = os.path.join(f.run_dir, key + ".pid")
    for prog in (FRONT, PY_ENTRY):
        os.unlink(record)                          # the live keeper's, then the one started for the FIFO
        os.mkfifo(record)
        os.chown(record, f.uid, f.gid)
        r = f.run(args, env=env, prog=prog)       # (the module's teardown ends the keepers)
        assert (r.returncode, r.stdout) == (0, "ran\n"), r.stderr
        assert stat.S_ISREG(os.lstat(record).st_mode)
