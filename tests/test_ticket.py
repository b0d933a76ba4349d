"""Join tickets, the Python side (hpcrun/ticket.py; the front that reads them: test_front.py).

A stand-in for the compiled front's miss path (DRIVER: compute K the way the front
does, exec the installed hpcrun with _HPCRUN_TICKET=K) runs as the unprivileged user.
Checked: the ticket holds what the launch really did (the program's own environment,
argv and directory equal the ticket's), it is written only for a K this launch matches
and only when no per-rank value was read, and the mark never reaches the program.
"""
import ast
import json
import os
import re
import shutil
import sys

import pytest

import hpcrun
from hpcrun import ticket

DRIVER = r"""
import os, sys
from hpcrun import ticket
import hpcrun
exe, args = sys.argv[1], sys.argv[2:]
k = os.environ.get("FORCE_K") or ticket.key(args, os.environb, os.getcwd(), os.getuid(), os.getgid(),
                                            os.getgroups(), ticket.stamp(os.path.dirname(hpcrun.__file__)))
os.environ.pop("FORCE_K", None)
sys.stderr.write("K=%s\n" % k)
sys.stderr.flush()
os.environ["_HPCRUN_TICKET"] = k
os.execv(exe, [exe] + args)
"""
RANKS = {"OMPI_COMM_WORLD_RANK": "3", "PMIX_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}


@pytest.fixture
def via_front(as_user, hpcrun_bin, test_user):
    """run(args, env) as the user through the front's miss path -> (result, K, ticket path)."""
    tickets = os.path.join(ticket.default_run_dir(test_user.pw_uid), "tickets")
    made = []

    def run(args, env=None, **kw):
        r = as_user([sys.executable, "-c", DRIVER, hpcrun_bin] + list(args), env=env, **kw)
        k = re.search(r"^K=(\S+)$", r.stderr, re.M).group(1)
        r.stderr = re.sub(r"^K=\S+\n", "", r.stderr, flags=re.M)
        path = os.path.join(tickets, k)
        made.append(path)
        return r, k, path
    yield run
    for path in made:
        if os.path.exists(path):
            os.unlink(path)


def parse(path):
    with open(path, "rb") as f:
        fields = f.read().split(b"\0")
    assert fields[-1] == b"" and fields[-2] == b"end"
    fields = [os.fsdecode(x) for x in fields[:-2]]
    out = {"observations": [], "arg": [], "env": []}
    i = 0
    while i < len(fields):
        tag = fields[i]
        if tag == "hpcrun-ticket":
            out["version"], i = fields[i + 1], i + 2
        elif tag == "expires":
            out["expires"], i = int(fields[i + 1]), i + 2
        elif tag == "keeper":
            out["keeper"], i = fields[i + 1:i + 5], i + 5
        elif tag in ("host", "inside"):
            out["observations"].append(tuple(fields[i:i + 4]))
            i += 4
        elif tag == "cwd":
            out["cwd"], i = fields[i + 1], i + 2
        elif tag == "arg":
            out["arg"].append(fields[i + 1])
            i += 2
        elif tag in ("set", "pass"):
            out["env"].append((tag, fields[i + 1]))
            i += 2
        else:
            raise AssertionError("unknown tag %r" % tag)
    return out


def final_env(t, caller):
    """The environment a front would exec with: set entries, pass entries from the caller."""
    out = []
    for tag, value in t["env"]:
        out.append(value if tag == "set" else "%s=%s" % (value, caller[value]))
    return out


def test_ticket_holds_what_the_launch_did(via_front, busybox_image, as_user, hpcrun_bin, test_user):
    env = dict(RANKS, FOO="bar baz", ODD="a\nb=c")
    command = ["env", "-0"]                   # the environ the program got, in its order
    r, k, path = via_front([busybox_image] + command, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    program_env = r.stdout.split("\0")[:-1]
    t = parse(path)
    assert t["version"] == "1"
    # the program's environment is the ticket's, entry for entry and in order; per-rank values pass through
    assert final_env(t, env) == program_env
    assert ("pass", "OMPI_COMM_WORLD_RANK") in t["env"] and ("pass", "PMIX_RANK") in t["env"]
    assert not any(e.startswith("_HPCRUN_TICKET=") for e in program_env)
    assert t["cwd"] == test_user.pw_dir and "PWD=%s" % test_user.pw_dir in program_env
    assert t["arg"][1:] == command[1:] and t["arg"][0].endswith("/env")
    # the keeper named is this launch's container, and alive (it lingers)
    plan = json.loads(as_user([hpcrun_bin, "--dry-run", busybox_image] + command, env=env).stdout)
    key, pid, start, userns = t["keeper"]
    assert key == plan["key"] and userns == "1"
    with open("/proc/%s/stat" % pid, "rb") as f:
        assert f.read().rsplit(b")", 1)[1].split()[19].decode() == start
    where = {o[0] for o in t["observations"]}
    assert where == {"host", "inside"}
    assert ("host", "stat", ".") == t["observations"][0][:3]
    assert ("host", "open", busybox_image) in [o[:3] for o in t["observations"]]
    # the file is private to the user
    st = os.stat(path)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == test_user.pw_uid
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700


def test_ticket_is_shared_by_ranks_and_kept_per_job(via_front, busybox_image):
    _, k1, _ = via_front([busybox_image, "true"], env=dict(RANKS))
    _, k2, _ = via_front([busybox_image, "true"], env=dict(RANKS, OMPI_COMM_WORLD_RANK="4", PMIX_RANK="4"))
    _, k3, _ = via_front([busybox_image, "true"], env=dict(RANKS, PMIX_NAMESPACE="another-job"))
    assert k1 == k2 != k3


def test_no_ticket_for_a_key_that_is_not_this_launchs(via_front, busybox_image):
    r, k, path = via_front([busybox_image, "env"], env={"FORCE_K": "0" * 64})
    assert r.returncode == 0 and k == "0" * 64
    assert not os.path.exists(path)
    assert "_HPCRUN_TICKET" not in r.stdout and "FORCE_K" not in r.stdout


@pytest.mark.parametrize("how", ["--env", "image-env"])
def test_no_ticket_when_a_per_rank_value_is_read(via_front, busybox_image, how):
    if how == "--env":
        args = ["--env", "MYRANK=$OMPI_COMM_WORLD_RANK", busybox_image, "env"]
        env = dict(RANKS)
    else:
        args = [busybox_image, "env"]
        env = dict(RANKS, HPCRUN_ENV_MYRANK="${PMIX_RANK}")
    r, k, path = via_front(args, env=env)
    assert r.returncode == 0, r.stderr
    assert "MYRANK=3" in r.stdout.splitlines()
    assert not os.path.exists(path)


@pytest.mark.parametrize("option", ["-v", "--dry-run", "--debug"])
def test_no_ticket_for_a_launch_that_talks(via_front, busybox_image, option):
    r, k, path = via_front([option, busybox_image, "true"])
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(path)


def test_no_ticket_for_a_failed_launch(via_front, busybox_image):
    r, k, path = via_front([busybox_image, "no-such-program"])
    assert r.returncode == 127
    assert not os.path.exists(path)


def test_no_ticket_where_the_front_does_not_look(via_front, busybox_image, site_config, test_user):
    run_dir = "/tmp/hpcrun-elsewhere-%d-%%u" % os.getpid()
    mine = run_dir.replace("%u", str(test_user.pw_uid))
    prefix = site_config("run_dir = %s\n" % run_dir)
    try:
        r, k, path = via_front([busybox_image, "true"], prefix=prefix)
        assert r.returncode == 0, r.stderr
        assert os.path.isdir(mine)
        assert not os.path.exists(path) and not os.path.exists(os.path.join(mine, "tickets"))
    finally:
        shutil.rmtree(mine, ignore_errors=True)


# --- the recorder sees every file-system fact the rank path reads ------------------------------

# os functions the rank path may call: recorded by ticket.Recorder, or facts that are inputs of K
# or the join itself (checked live by the front), or no file-system facts at all.
RECORDED = {"stat", "lstat", "readlink", "access", "open", "listdir", "scandir", "chdir"}
NOT_FACTS = {"getuid", "getgid", "getgroups", "getcwd", "getpid", "fstat", "read", "pread", "close", "write",
             "fsencode", "fsdecode", "fspath", "dup", "dup2", "execve", "execv", "environ", "get_terminal_size",
             "strerror", "devnull", "pipe", "fork", "setsid", "waitpid", "kill", "_exit", "umask", "O_RDONLY",
             "cpu_count", "sep", "defpath", "getppid", "set_inheritable", "WEXITSTATUS", "WIFEXITED",
             "WIFSIGNALED", "WTERMSIG", "waitstatus_to_exitcode", "isatty",
             "getenv", "setenv", "unsetenv", "environ_dict"}       # rankos: the environment is part of K
PATH_FUNCS = {"join", "abspath", "dirname", "basename", "isdir", "isfile", "exists", "realpath", "normpath",
              "islink", "split", "splitext", "relpath", "commonpath", "isabs", "lexists"}
# launch-path modules; node/fdio run in the join (live checks), or in the keeper
RANK_PATH = ("cli", "launch", "config", "environment", "image", "imagefile", "sif", "plan", "mpi/__init__")
RANK_FUNCS = {"launch": {"launch", "enter_cwd", "command", "find_command", "is_apptainer", "env_scripts",
                         "apptainer_argv", "image_json"},
              "imagefile": {"is_hpcrun_image", "_number", "read_header", "_printable", "check_meta", "identity"}}


def test_recorder_covers_every_file_system_call_of_the_rank_path():
    pkg = os.path.dirname(hpcrun.__file__)
    unknown = set()
    for mod in RANK_PATH:
        with open(os.path.join(pkg, mod + ".py")) as f:
            tree = ast.parse(f.read())
        nodes = [tree]
        if mod in RANK_FUNCS:
            nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in RANK_FUNCS[mod]]
        for top in nodes:
            for n in ast.walk(top):
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "os":
                    if n.attr not in RECORDED | NOT_FACTS and not n.attr.startswith(("O_", "R_", "X_", "W_")) \
                            and n.attr != "path":
                        unknown.add("%s: os.%s" % (mod, n.attr))
                if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
                        and isinstance(n.value.value, ast.Name) and n.value.value.id == "os"
                        and n.value.attr == "path" and n.attr not in PATH_FUNCS):
                    unknown.add("%s: os.path.%s" % (mod, n.attr))
    assert not unknown, "file-system facts ticket.Recorder does not record: %s" % sorted(unknown)


def test_recorder_sees_through_rankos_what_it_sees_through_os(tmp_path):
    """The rank's modules use rankos as os (no os import): the same system calls, wrapped alike,
    and its path functions observe what os.path's do (same calls, same results, same facts)."""
    from hpcrun import rankos, ticket
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("")
    os.symlink("d", tmp_path / "link")
    os.symlink("../loop", tmp_path / "d" / "loop")
    os.symlink("d/loop", tmp_path / "loop")
    os.symlink("/nonexistent/x", tmp_path / "dangling")
    paths = [str(tmp_path / p) for p in ("link/../link/f", "link/f", "loop/x", "dangling", "d/./f/", "nothing")]
    paths += ["relative/../x", "/", "/etc/localtime"]
    assert all(getattr(rankos, name) is getattr(os, name) for name in ticket.WRAPPED)
    seen = {}
    for module in (os, rankos):
        rec = ticket.Recorder("0" * 64)
        rec.install("host")
        try:
            out = [(f(p) for f in (module.path.realpath, module.path.isdir, module.path.isfile,
                                  module.path.exists, module.path.abspath)) for p in paths]
            out = [list(x) for x in out] + [module.access(paths[1], os.R_OK), sorted(module.listdir(tmp_path))]
        finally:
            rec.uninstall()
        seen[module.__name__] = out, rec.observations, rec.spoiled
    assert seen["os"] == seen["hpcrun.rankos"] and len(seen["os"][1]) > 30 and seen["os"][2] is None
    assert all(getattr(rankos, name) is getattr(os, name) for name in ticket.WRAPPED)      # put back


def test_old_tickets_are_pruned_by_the_next_writer(via_front, busybox_image, as_user, test_user):
    tickets = os.path.join(ticket.default_run_dir(test_user.pw_uid), "tickets")
    via_front([busybox_image, "true"])                            # the directory exists
    old, fresh = os.path.join(tickets, "f" * 64), os.path.join(tickets, "e" * 64)
    for path, when in ((old, "20 minutes ago"), (fresh, "1 minute ago")):
        assert as_user(["touch", "-d", when, path]).returncode == 0
    try:
        r, _, path = via_front([busybox_image, "true"], env={"ANOTHER": "launch"})
        assert r.returncode == 0 and os.path.exists(path)
        assert not os.path.exists(old) and os.path.exists(fresh)
    finally:
        for p in (old, fresh):
            if os.path.exists(p):
                os.unlink(p)


def test_no_ticket_for_a_launch_that_warns_inside(via_front, busybox_root, shared_dir, tmp_path):
    # an Apptainer-built SquashFS with environment scripts but no /bin/sh: the launch warns
    # (launch.command) after the join; a front serving that ticket would run silently
    import imagetools
    root = tmp_path / "root"
    shutil.copytree(busybox_root, root, symlinks=True)
    os.unlink(root / "bin" / "sh")
    (root / ".singularity.d" / "env").mkdir(parents=True)
    (root / ".singularity.d" / "env" / "90-environment.sh").write_text("export FROM_SCRIPT=1\n")
    img = imagetools.mksquashfs(str(root), os.path.join(shared_dir, "ticket-no-sh-%d.sqfs" % os.getpid()))
    try:
        r, k, path = via_front([img, "true"])
        assert r.returncode == 0 and "no /bin/sh" in r.stderr, r.stderr
        assert not os.path.exists(path)
    finally:
        os.unlink(img)


WAVE = r"""
import os, sys
n, exe, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
r, w = os.pipe()
kids = []
for i in range(n):
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)                        # EOF: all go at once, as a launcher's ranks do
        os.environ["OMPI_COMM_WORLD_RANK"] = os.environ["PMIX_RANK"] = str(i)
        os.execv(exe, [exe] + args)
    kids.append(pid)
os.close(r)
os.close(w)
print("codes", [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in kids], flush=True)
"""


def test_a_jobs_first_wave_costs_one_python_launch(as_user, hpcrun_bin, busybox_image, test_user):
    """Ranks of a new job all start before any ticket exists: one runs the Python path and
    writes it, the others wait for that (front.c, first_wave) and are served; the lock they
    waited on reaches no program."""
    if not os.path.exists(hpcrun_bin + "-py"):
        pytest.skip("no compiled front installed")
    n = 8
    program = 'echo rank=$OMPI_COMM_WORLD_RANK; for f in /proc/$$/fd/*; do readlink $f; done; true'
    env = {"HPCRUN_FRONT_DEBUG": "1", "JOB": "wave-%d-%d" % (os.getpid(), id(program))}
    r = as_user([sys.executable, "-c", WAVE, str(n), hpcrun_bin, busybox_image, "sh", "-c", program], env=env)
    assert "codes %s" % ([0] * n) in r.stdout, (r.stdout, r.stderr)
    ranks = sorted(int(line[5:]) for line in r.stdout.splitlines() if line.startswith("rank="))
    assert ranks == list(range(n))
    assert not [line for line in r.stdout.splitlines() if line.endswith(".lock")]
    python_runs = r.stderr.count("front: python path:") - r.stderr.count("waited for the first rank: done")
    assert python_runs == 1, r.stderr
    assert "timed out" not in r.stderr


@pytest.mark.parametrize("caller_sets", [False, True, "C", "POSIX"])
def test_pythons_locale_coercion_does_not_reach_the_program(hpcrun_bin, busybox_image, test_user, caller_sets):
    """Python sets LC_CTYPE=C.UTF-8 in its environment where the caller's locale is unset or C
    (PEP 538, overwriting the caller's LC_CTYPE=C): the program gets the caller's environment, on
    the Python path and through the front (K agrees)."""
    import subprocess
    from conftest import user_cmd
    env = {"PATH": "/usr/bin:/bin", "HOME": test_user.pw_dir, "LOC": "case-%d-%s" % (os.getpid(), caller_sets)}
    if caller_sets:
        env["LC_CTYPE"] = caller_sets if isinstance(caller_sets, str) else "C.UTF-8"
    front = os.path.exists(hpcrun_bin + "-py")
    if front:
        env["HPCRUN_FRONT_DEBUG"] = "1"
    for exe in [hpcrun_bin + "-py", hpcrun_bin] if front else [hpcrun_bin]:
        for attempt in range(2):           # through the front: a miss (Python writes the ticket), then served
            r = subprocess.run(user_cmd(test_user, ["env", "-i"] + ["%s=%s" % kv for kv in env.items()]
                                        + [exe, busybox_image, "env"]),
                               capture_output=True, text=True, timeout=120, cwd="/")
            assert r.returncode == 0, r.stderr
            lc = [line for line in r.stdout.splitlines() if line.startswith("LC_CTYPE=")]
            assert lc == (["LC_CTYPE=" + env["LC_CTYPE"]] if caller_sets else []), r.stdout
            if exe == hpcrun_bin and attempt:
                assert "python path" not in r.stderr, r.stderr


def test_front_serves_a_program_owned_by_root_from_a_host_bind(as_user, hpcrun_bin, busybox_image, shared_dir):
    """Inside, files of owners the container does not map (root's, bound from the host) show as
    65534; the front, replaying from the host, sees them the same way (front.c, identity)."""
    if not os.path.exists(hpcrun_bin + "-py"):
        pytest.skip("no compiled front installed")
    d = os.path.join(shared_dir, "rootbin-%d" % os.getpid())
    os.mkdir(d, 0o755)
    script = os.path.join(d, "hello.sh")
    with open(script, "w") as f:
        f.write("#!/bin/sh\necho hello from the host bind\n")
    os.chmod(script, 0o755)
    try:
        env = {"HPCRUN_FRONT_DEBUG": "1", "CASE": d}
        runs = [as_user([hpcrun_bin, "-B", "%s:/hostbin:ro" % d, busybox_image, "/hostbin/hello.sh"], env=env)
                for _ in range(2)]
        for r in runs:
            assert r.returncode == 0 and r.stdout == "hello from the host bind\n", r.stderr
        assert "python path" not in runs[1].stderr, runs[1].stderr
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("argv,why", [(["version"], "a subcommand"), (["check", "--json"], "a subcommand")])
def test_front_sends_what_never_has_a_ticket_straight_to_python(as_user, hpcrun_bin, argv, why):
    """No K, no first-wave lock for a subcommand: the job's other ranks would only wait for nothing."""
    if not os.path.exists(hpcrun_bin + "-py"):
        pytest.skip("no compiled front installed")
    r = as_user([hpcrun_bin] + argv, env={"HPCRUN_FRONT_DEBUG": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("hpcrun: front: python path: %s\n" % why), r.stderr
    assert "waited" not in r.stderr
