"""The core launcher, for real: real images, real namespaces, a real unprivileged user.

Nothing is mocked.  Most behaviour is checked twice, as root (no user
namespace, kernel loop mount) and as the unprivileged test user (user
namespace, squashfuse on a staged payload), because the two take different
paths through join.py / node.py / stage.py / rootfs.py.

Sections:
  1. identity            uid/gid/name inside are the caller's
  2. exec in place       same PID, exit status, signals, descriptors, stdin
  3. privileges          setuid binaries do not raise privileges; NoNewPrivs
  4. binds and env       -B forms, HPCRUN_BIND, --pwd, --env*, --cleanenv, deny list, --no-home
  5. bind through links  an image's symlink never redirects a bind onto a host path
  6. errors             one line, the documented code, no traceback, nothing left mounted
  7. image kinds         hpcrun, SquashFS, directory, SIF, the executable image
  8. --dry-run           the plan as JSON, nothing started
  9. the node container  workspace hygiene; 256 ranks at once share one container
"""
import json
import os
import pwd
import grp
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from checks import assert_one_error  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import imagetools  # noqa: E402

from hpcrun import errors  # noqa: E402

BUSYBOX = imagetools.BUSYBOX
SIF_DIR = "/work/shared/data/sif"
SIF_HELLO = "Hello from Sylabs!\n"       # /hello.txt in the SIF test images (apptainer/sif test data)


# ---------------------------------------------------------------- callers ---

class Caller:
    """Runs commands as one user with a small, fixed environment.

    As the test user: setpriv (ids) then `env -i` (environment); both exec in
    place, so a Popen's pid is hpcrun's pid and hence the program's."""

    def __init__(self, pw, hpcrun):
        self.pw = pw
        self.hpcrun_bin = hpcrun
        self.uid, self.gid, self.home = pw.pw_uid, pw.pw_gid, pw.pw_dir
        self.name = pw.pw_name
        self.is_me = pw.pw_uid == os.getuid()
        self.run_dir = "/tmp/hpcrun-%d" % self.uid

    def __repr__(self):
        return "Caller(%s)" % self.name

    def env(self, extra=None):
        e = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.home, "USER": self.name,
             "LOGNAME": self.name, "LANG": "C.UTF-8", "HPCRUN_LINGER": "1"}
        e.update(extra or {})
        return e

    def argv(self, argv, env=None):
        e = self.env(env)
        wrap = ["env", "-i"] + ["%s=%s" % kv for kv in e.items()]
        if not self.is_me:
            wrap = ["setpriv", "--reuid=%d" % self.uid, "--regid=%d" % self.gid, "--init-groups",
                    "--reset-env", "--"] + wrap
        return wrap + [str(a) for a in argv]

    def popen(self, argv, env=None, cwd=None, **kw):
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        return subprocess.Popen(self.argv(argv, env), cwd=cwd or self.home, **kw)

    def run(self, argv, env=None, cwd=None, timeout=120, **kw):
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(argv, env), cwd=cwd or self.home, timeout=timeout, **kw)

    def hpcrun(self, *args, env=None, cwd=None, **kw):
        return self.run([self.hpcrun_bin] + list(args), env=env, cwd=cwd, **kw)

    def ok(self, *args, **kw):
        """hpcrun ... that must succeed; returns stdout."""
        r = self.hpcrun(*args, **kw)
        assert r.returncode == 0, "rc=%d\nstdout: %s\nstderr: %s" % (r.returncode, r.stdout, r.stderr)
        return r.stdout

    def dry_run(self, *args, **kw):
        return json.loads(self.ok("--dry-run", *args, **kw))


@pytest.fixture(scope="module")
def root_caller(hpcrun_bin):
    if os.getuid() != 0:
        pytest.skip("needs root")
    return Caller(pwd.getpwuid(0), hpcrun_bin)


@pytest.fixture(scope="module")
def user_caller(hpcrun_bin, test_user):
    if test_user.pw_uid == 0:
        pytest.skip("no unprivileged user")
    return Caller(test_user, hpcrun_bin)


@pytest.fixture(params=["root", "user"])
def caller(request):
    """Both: root (no user namespace, loop mount) and the unprivileged user (userns, FUSE)."""
    return request.getfixturevalue(request.param + "_caller")


# ---------------------------------------------------------------- helpers ---

def processes(comm):
    """[(pid, cmdline)] of processes whose comm is `comm`."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/comm" % name) as f:
                if f.read().strip() != comm:
                    continue
            with open("/proc/%s/cmdline" % name, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out.append((int(name), cmd))
    return out


# comm of a keeper's FUSE daemon: hpcrun's own (15 characters of hpcrun-squashfuse), or Debian's
FUSE_COMMS = ("hpcrun-squashfu", "squashfuse_ll", "squashfuse")


def fuse_daemons():
    return [pc for comm in FUSE_COMMS for pc in processes(comm)]


def keepers_of(fragment):
    return [pid for pid, cmd in processes("hpcrun-keeper") if fragment in cmd]


def eventually(pred, timeout=30.0):
    """Poll pred() until true; a keeper leaves up to `linger` + ~1 s after its last user."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def host_mounts(fragment):
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if fragment in line]


def payload_digest(img):
    """The payload sha256 from an hpcrun image's header line (the staged copy's name)."""
    with open(img, "rb") as f:
        f.readline()
        return f.readline().split()[4].decode()


def private_dir(base, owner, mode=0o755):
    """A fresh directory owned by `owner` (a Caller), under base."""
    d = tempfile.mkdtemp(dir=base)
    os.chown(d, owner.uid, owner.gid)
    os.chmod(d, mode)
    return d


def write(path, text, mode=0o644):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def static_program(c_source, out):
    """Compile a static C program (the busybox image has no libc); None without gcc."""
    gcc = shutil.which("gcc")
    if not gcc or not os.path.exists("/usr/lib/x86_64-linux-gnu/libc.a") and \
            not os.path.exists("/usr/lib/libc.a"):
        return None
    src = out + ".c"
    write(src, c_source)
    r = subprocess.run([gcc, "-static", "-O2", "-o", out, src], capture_output=True, text=True)
    return out if r.returncode == 0 else None


EUID_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("ruid=%d euid=%d\n", (int)getuid(), (int)geteuid()); return 0; }
"""


# ----------------------------------------------------------------- images ---

@pytest.fixture(scope="module")
def core_dir(shared_dir):
    d = tempfile.mkdtemp(prefix="core-", dir=shared_dir)
    os.chmod(d, 0o755)
    return d


@pytest.fixture(scope="module")
def euid_prog(core_dir):
    """A static program printing its real and effective uid, setuid root, on a
    host filesystem that honours setuid (shared_dir under /tmp)."""
    d = os.path.join(core_dir, "suid")
    os.mkdir(d, 0o755)
    prog = static_program(EUID_C, os.path.join(d, "euid"))
    if prog is None:
        pytest.skip("gcc with a static libc needed to build a setuid test program")
    os.chown(prog, 0, 0)
    os.chmod(prog, 0o4755)
    return prog


@pytest.fixture(scope="module")
def core_root(core_dir, euid_prog):
    """The busybox root plus what these tests need: a setuid-root program,
    symlinks that point out of the image, a non-executable file."""
    root = os.path.join(core_dir, "root")
    imagetools.make_busybox_root(root, runscript=["/bin/echo", "runscript says"],
                                 env=[("IMAGE_VAR", "from-image"), ("PATH", "/bin:/usr/bin")])
    shutil.copy(euid_prog, os.path.join(root, "bin/euid"))
    os.chmod(os.path.join(root, "bin/euid"), 0o4755)          # mksquashfs -all-root: owned by root
    os.symlink("/etc", os.path.join(root, "evil"))               # absolute: /etc of the host?
    os.symlink("../../../../../../../../etc", os.path.join(root, "rel"))  # relative, climbs past /
    os.symlink("/tmp", os.path.join(root, "tmplink"))            # onto a host bind
    os.symlink("/loop2", os.path.join(root, "loop1"))            # a cycle
    os.symlink("loop1", os.path.join(root, "loop2"))
    write(os.path.join(root, "bin/notexec"), "#!/bin/sh\necho should not run\n", 0o644)
    # a host program copied in without its loader, a script whose interpreter is not there
    with open("/bin/true", "rb") as f:
        elf = f.read()
    loader = b"/lib64/ld-linux-x86-64.so.2"
    assert loader in elf
    with open(os.path.join(root, "bin/noloader"), "wb") as f:
        f.write(elf.replace(loader, b"/lib64/ld-nolib-x86-64.so.2"))
    os.chmod(os.path.join(root, "bin/noloader"), 0o755)
    write(os.path.join(root, "bin/nointerp"), "#!/usr/bin/no-such-python3 -u\nprint(1)\n", 0o755)
    os.makedirs(os.path.join(root, "data"))
    write(os.path.join(root, "data/readme"), "image data\n")
    return root


@pytest.fixture(scope="module")
def core_image(core_dir, core_root):
    return imagetools.make_image(core_root, os.path.join(core_dir, "core.img"))


def fresh_image(directory, busybox_root, name):
    """An hpcrun image with unique content, hence a unique sha256 and plan key."""
    root = os.path.join(directory, name + "-root")
    shutil.copytree(busybox_root, root, symlinks=True)
    write(os.path.join(root, "etc/unique"), uuid.uuid4().hex + "\n")
    img = imagetools.make_image(root, os.path.join(directory, name + ".img"))
    shutil.rmtree(root)
    return img


# ============================================================ 1. identity ===

def test_ids_inside_are_the_callers(caller, core_image):
    # `id -un` / `id -gn` resolve through /etc/passwd and /etc/group: the
    # image only knows root, so for the test user they come from the entries
    # hpcrun generates.
    out = caller.ok(core_image, "sh", "-c", "id -u; id -g; id -un; id -gn").split()
    assert out == [str(caller.uid), str(caller.gid), caller.name, grp.getgrgid(caller.gid).gr_name]


def test_files_written_in_a_bind_belong_to_the_caller(caller, core_dir, core_image):
    # The uid map is identity: what the program creates is owned by the caller outside.
    d = private_dir(core_dir, caller)
    caller.ok("-B", "%s:/out" % d, core_image, "touch", "/out/made-inside")
    st = os.stat(os.path.join(d, "made-inside"))
    assert (st.st_uid, st.st_gid) == (caller.uid, caller.gid)


# ======================================================= 2. exec in place ===

def test_program_has_the_pid_its_parent_started(caller, core_image):
    # No fork: the process the launcher (srun, mpirun, here Popen) started is the program.
    p = caller.popen([caller.hpcrun_bin, core_image, "sh", "-c", "echo $$"])
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert out.strip() == str(p.pid)


@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_code_passes_through(caller, core_image, code):
    r = caller.hpcrun(core_image, "sh", "-c", "exit %d" % code)
    assert r.returncode == code, r.stderr
    assert r.stderr == ""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGPIPE])
def test_death_by_signal_is_seen_by_the_parent(caller, core_image, sig):
    # The parent must see "killed by signal" (returncode -N), not an exit code
    # 128+N made up by an intermediate process.  SIGPIPE also checks that
    # Python's "ignore SIGPIPE" is not inherited by the program.
    p = caller.popen([caller.hpcrun_bin, core_image, "sh", "-c", "kill -%d $$; echo survived" % sig])
    out, err = p.communicate(timeout=120)
    assert p.returncode == -sig, (p.returncode, out, err)
    assert "survived" not in out


def test_signal_sent_to_the_pid_reaches_the_program(caller, core_image):
    p = caller.popen([caller.hpcrun_bin, core_image, "sh", "-c", "echo ready; exec sleep 60"])
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGTERM


def test_inherited_descriptor_survives(caller, core_image):
    # Launchers hand ranks descriptors (PMI_FD, PMIX sockets); they must still be open inside.
    r, w = os.pipe()
    try:
        p = caller.popen([caller.hpcrun_bin, core_image, "sh", "-c", "echo through-fd-$0 >&%d" % w, "x"],
                         pass_fds=(w,))
        os.close(w)
        w = None
        p.communicate(timeout=120)
        data = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
    assert p.returncode == 0
    assert data == b"through-fd-x\n"


def test_argv_passes_verbatim(caller, core_image):
    # No shell in between: spaces, empty strings, globs and $ reach the program as given.
    args = ["a b", "", "*", "$HOME", "--env", "-B", "x=y", "'q'"]
    out = caller.ok(core_image, "printf", "[%s]\\n", *args)
    assert out.splitlines() == ["[%s]" % a for a in args]


def test_process_group_session_and_umask_are_the_callers(caller, core_image):
    # Job control and srun's signal forwarding address the process group; the
    # umask decides the mode of every file the program writes.
    p = caller.popen([caller.hpcrun_bin, core_image, "sh", "-c", "cut -d' ' -f5,6 /proc/$$/stat; umask"],
                     start_new_session=True, umask=0o027)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    pgrp_sid, umask = out.split("\n")[:2]
    assert pgrp_sid.split() == [str(p.pid), str(p.pid)]
    assert int(umask, 8) == 0o027


def test_shell_reads_commands_from_stdin(caller, core_image):
    r = caller.hpcrun("shell", core_image, input="id -u\nexit 3\n")
    assert (r.returncode, r.stdout) == (3, "%d\n" % caller.uid), r.stderr


def test_stdin_and_stdout_are_the_callers(caller, core_image):
    r = caller.hpcrun(core_image, "tr", "a-z", "A-Z", input="hello from the host\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "HELLO FROM THE HOST\n"


# =========================================================== 3. privileges ===

def test_setuid_root_program_works_as_setuid_on_the_host(user_caller, euid_prog):
    # Control for the next tests: outside any container this program does
    # gain euid 0, so "euid stays the user's" below means something.
    r = user_caller.run([euid_prog])
    assert r.stdout.strip() == "ruid=%d euid=0" % user_caller.uid


def test_setuid_root_program_in_image_does_not_raise_privileges(user_caller, core_image):
    out = user_caller.ok(core_image, "/bin/euid")
    assert out.strip() == "ruid=%d euid=%d" % (user_caller.uid, user_caller.uid)
    # and the image's shell, through `id`, agrees
    assert user_caller.ok(core_image, "id", "-u").strip() == str(user_caller.uid)


def test_setuid_root_program_from_a_host_bind_does_not_raise_privileges(user_caller, core_image, euid_prog):
    # A bind is a host filesystem that honours setuid outside: inside it must not.
    out = user_caller.ok("-B", "%s:/hostbin" % os.path.dirname(euid_prog), core_image, "/hostbin/euid")
    assert out.strip() == "ruid=%d euid=%d" % (user_caller.uid, user_caller.uid)


def test_no_new_privs_is_set(caller, core_image):
    out = caller.ok(core_image, "grep", "NoNewPrivs", "/proc/self/status")
    assert out.split() == ["NoNewPrivs:", "1"]


# ====================================================== 4. binds and env ===

def test_bind_src_dst_is_read_write(caller, core_dir, core_image):
    d = private_dir(core_dir, caller)
    write(os.path.join(d, "in"), "from host\n")
    out = caller.ok("-B", "%s:/mnt/x" % d, core_image, "sh", "-c", "cat /mnt/x/in; echo from inside > /mnt/x/out")
    assert out == "from host\n"
    with open(os.path.join(d, "out")) as f:
        assert f.read() == "from inside\n"


def test_bind_src_only_keeps_the_path(caller, core_dir, core_image):
    d = private_dir(core_dir, caller)
    write(os.path.join(d, "f"), "same path\n")
    assert caller.ok("-B", d, core_image, "cat", os.path.join(d, "f")) == "same path\n"


@pytest.mark.parametrize("mode", ["", ":ro"])
def test_relative_bind_source_without_destination(caller, core_dir, core_image, mode):
    """-B 'my data' from the directory holding it: the source is the cwd's and
    it lands at the same absolute path (it was refused: 'destination must be absolute')."""
    d = private_dir(core_dir, caller)
    os.mkdir(os.path.join(d, "my data"), 0o755)
    write(os.path.join(d, "my data", "f"), "relative\n")
    out = caller.ok("-B", "my data" + mode, core_image, "cat", os.path.join(d, "my data", "f"), cwd=d)
    assert out == "relative\n"


@pytest.mark.parametrize("spec", ["%s:/ro:ro", "%s:ro"])
def test_bind_ro_is_really_read_only(caller, core_dir, core_image, spec):
    d = private_dir(core_dir, caller)
    write(os.path.join(d, "f"), "original\n", 0o666)
    dst = "/ro" if spec.startswith("%s:/ro") else d
    r = caller.hpcrun("-B", spec % d, core_image, "sh", "-c",
                      "cat {0}/f; touch {0}/new && echo created; echo changed > {0}/f && echo wrote; "
                      "grep -q ' {0} ro[, ]' /proc/self/mountinfo && echo ro-mount".format(dst))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["original", "ro-mount"], r.stdout
    assert "Read-only file system" in r.stderr
    assert sorted(os.listdir(d)) == ["f"]
    with open(os.path.join(d, "f")) as f:
        assert f.read() == "original\n"


def test_bind_ro_file(caller, core_dir, core_image):
    d = private_dir(core_dir, caller)
    f = write(os.path.join(d, "conf"), "v=1\n", 0o666)
    r = caller.hpcrun("-B", "%s:/etc/app.conf:ro" % f, core_image, "sh", "-c",
                      "cat /etc/app.conf; echo v=2 > /etc/app.conf && echo wrote")
    assert r.stdout == "v=1\n"
    with open(f) as fh:
        assert fh.read() == "v=1\n"


def _two_dirs(caller, core_dir):
    a, b = private_dir(core_dir, caller), private_dir(core_dir, caller)
    write(os.path.join(a, "f"), "A\n")
    write(os.path.join(b, "f"), "B\n")
    return a, b


def test_bind_comma_list(caller, core_dir, core_image):
    a, b = _two_dirs(caller, core_dir)
    out = caller.ok("-B", "%s:/a,%s:/b:ro" % (a, b), core_image, "cat", "/a/f", "/b/f")
    assert out == "A\nB\n"


def test_bind_attached_short_option(caller, core_dir, core_image):
    a, b = _two_dirs(caller, core_dir)
    assert caller.ok("-B%s:/a" % a, "--bind=%s:/b" % b, core_image, "cat", "/a/f", "/b/f") == "A\nB\n"


def test_hpcrun_bind_environment_variable(caller, core_dir, core_image):
    a, b = _two_dirs(caller, core_dir)
    out = caller.ok(core_image, "cat", "/a/f", "/b/f", env={"HPCRUN_BIND": "%s:/a, %s:/b" % (a, b)})
    assert out == "A\nB\n"


def test_later_bind_of_the_same_destination_wins(caller, core_dir, core_image):
    a, b = _two_dirs(caller, core_dir)
    assert caller.ok("-B", "%s:/x" % a, "-B", "%s:/x" % b, core_image, "cat", "/x/f") == "B\n"


def test_traverse_only_bind_source(user_caller, core_dir, core_image):
    # A directory the user may enter but not list (0711, like PBS's
    # mom_priv/jobs) is a valid bind source; one it may not enter is not.
    c = user_caller
    d = os.path.join(core_dir, "traverse-only")
    if not os.path.exists(d):
        os.mkdir(d)
        write(os.path.join(d, "job.sh"), "echo job\n")
    os.chmod(d, 0o711)
    assert c.ok("-B", "%s:/jobs" % d, core_image, "cat", "/jobs/job.sh") == "echo job\n"
    os.chmod(d, 0o700)
    try:
        assert_one_error(c.hpcrun("-B", "%s:/jobs" % d, core_image, "true"), errors.NOINPUT, "bind source")
    finally:
        os.chmod(d, 0o711)


@pytest.mark.parametrize("where", ["under-tmp", "outside-default-binds"])
def test_default_working_directory_is_the_callers(caller, core_dir, core_image, where):
    # The current directory is bound at its real path when no other bind covers it.
    d = private_dir(core_dir if where == "under-tmp" else "/", caller)
    try:
        write(os.path.join(d, "here"), "cwd bound\n")
        assert caller.ok(core_image, "sh", "-c", "pwd; cat here", cwd=d) == "%s\ncwd bound\n" % d
    finally:
        if where != "under-tmp":
            shutil.rmtree(d)


def test_pwd(caller, core_dir, core_image):
    d = private_dir(core_dir, caller)
    out = caller.ok("-B", "%s:/work" % d, "--pwd", "/work", core_image, "sh", "-c", "pwd; echo $PWD; touch rel")
    assert out.split() == ["/work", "/work"]
    assert os.path.exists(os.path.join(d, "rel"))
    assert caller.ok("--pwd", "/data", core_image, "cat", "readme") == "image data\n"


def test_env_sources_and_precedence(caller, core_dir, core_image):
    # Later wins: host < image's /.hpcrun/env < HPCRUN_ENV_* < --env-file < --env;
    # values expand $NAME against what is set so far.
    envfile = write(os.path.join(core_dir, "env-%s" % caller.name),
                    "# comment\n\nexport FROM_FILE='quoted value'\nLEVEL=file\nMID=file\n"
                    "IMAGE_VAR=from-file\n")
    out = caller.ok("--env-file", envfile, "--env", "LEVEL=option", "--env", "EXPANDED=${IMAGE_VAR}-x",
                    core_image, "sh", "-c",
                    'echo "$FROM_FILE|$LEVEL|$MID|$FROM_PREFIX|$EXPANDED|$IMAGE_VAR|$FROM_HOST"; env',
                    env={"HPCRUN_ENV_LEVEL": "prefix", "HPCRUN_ENV_MID": "prefix", "HPCRUN_ENV_FROM_PREFIX": "p",
                         "FROM_HOST": "h", "IMAGE_VAR": "from-host"})
    first, rest = out.split("\n", 1)
    assert first == "quoted value|option|file|p|from-file-x|from-file|h"
    names = {line.split("=", 1)[0] for line in rest.splitlines()}
    assert not any(n.startswith("HPCRUN_ENV_") for n in names)          # the carrier variables do not
    assert "HPCRUN_CONTAINER" in names


def test_image_path_is_reset(caller, core_image):
    # PATH is the image's, not the host's (which names host directories).
    out = caller.ok(core_image, "sh", "-c", "echo $PATH", env={"PATH": "/host/only:/usr/bin:/bin"})
    assert out.strip() == "/bin:/usr/bin"


def test_cleanenv(caller, core_image):
    env = {"FROM_HOST": "h", "SLURM_JOB_ID": "123", "PMI_RANK": "0", "TERM": "xterm"}
    out = caller.ok("--cleanenv", "--env", "ASKED=1", core_image, "env", env=env)
    got = dict(line.split("=", 1) for line in out.splitlines())
    assert "FROM_HOST" not in got
    assert got["SLURM_JOB_ID"] == "123" and got["PMI_RANK"] == "0"    # launcher wiring survives
    assert got["HOME"] == caller.home and got["TERM"] == "xterm"
    assert got["ASKED"] == "1"
    # control: without --cleanenv the variable does pass
    assert "FROM_HOST=h" in caller.ok(core_image, "env", env=env).splitlines()


def test_deny_list_is_dropped_and_shown_by_dry_run(caller, core_image):
    env = {"LD_PRELOAD": "", "LD_LIBRARY_PATH": "/nonexistent/host/lib", "PYTHONPATH": "/host/py"}
    out = caller.ok(core_image, "env", env=env)
    names = {line.split("=", 1)[0] for line in out.splitlines()}
    assert not names & {"LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH"}
    plan = caller.dry_run(core_image, "env", env=env)
    assert {"LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH"} <= set(plan["env"]["dropped"])
    assert not {"LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH"} & set(plan["env"]["set"])


def test_explicit_env_may_still_set_a_denied_name(caller, core_image):
    # The deny list is about leaking the *host's* values; asking for one explicitly is allowed.
    out = caller.ok("--env", "LD_LIBRARY_PATH=/opt/lib", core_image, "sh", "-c", "echo $LD_LIBRARY_PATH",
                    env={"LD_LIBRARY_PATH": "/host/lib"})
    assert out.strip() == "/opt/lib"


def test_no_home(caller, core_image):
    marker = os.path.join(caller.home, ".hpcrun-core-marker")
    write(marker, "home\n")
    os.chown(marker, caller.uid, caller.gid)
    try:
        # run from / so that the current directory (the home) is not bound on its own
        assert caller.ok(core_image, "cat", marker, cwd="/") == "home\n"
        r = caller.hpcrun("--no-home", core_image, "cat", marker, cwd="/")
        assert r.returncode != 0 and r.stdout == ""
        plan = caller.dry_run("--no-home", core_image, "true", cwd="/")
        assert not [b for b in plan["binds"] if b["src"] == caller.home]
    finally:
        os.unlink(marker)


# ================================================ 5. binds through links ===

@pytest.mark.parametrize("link", ["evil", "rel"])
def test_bind_through_image_symlink_stays_inside_the_image(caller, core_dir, core_image, link):
    # The image has /evil -> /etc and /rel -> ../../../../etc.  Resolved
    # inside the image both mean the image's /etc; the host's /etc must not
    # get a new entry, and the bind must show at the image's /etc.
    probe = "hpcrun-core-probe-%s" % uuid.uuid4().hex[:8]
    d = private_dir(core_dir, caller)
    write(os.path.join(d, "f"), "bound\n")
    r = caller.hpcrun("-B", "%s:/%s/%s" % (d, link, probe), core_image, "cat", "/etc/%s/f" % probe)
    assert not os.path.lexists("/etc/" + probe), "bind destination created on the host"
    assert r.returncode == 0, r.stderr
    assert r.stdout == "bound\n"


def test_bind_of_a_file_through_image_symlink(caller, core_dir, core_image):
    # /evil/passwd-probe -> image /etc: a file destination is created in the
    # overlay, never as /etc/<probe> on the host.
    probe = "hpcrun-core-file-%s" % uuid.uuid4().hex[:8]
    d = private_dir(core_dir, caller)
    f = write(os.path.join(d, "f"), "file bound\n")
    r = caller.hpcrun("-B", "%s:/evil/%s" % (f, probe), core_image, "cat", "/etc/" + probe)
    assert not os.path.lexists("/etc/" + probe)
    assert (r.returncode, r.stdout) == (0, "file bound\n"), r.stderr


def test_bind_through_symlink_onto_a_host_bind_creates_nothing_on_the_host(caller, core_dir, core_image):
    # /tmplink -> /tmp, and /tmp is the host's /tmp (default bind): a missing
    # destination there would have to be made on the host.  hpcrun refuses.
    probe = "hpcrun-core-probe-%s" % uuid.uuid4().hex[:8]
    d = private_dir(core_dir, caller)
    r = caller.hpcrun("-B", "%s:/tmplink/%s" % (d, probe), core_image, "true")
    assert not os.path.lexists("/tmp/" + probe), "bind destination created on the host"
    assert_one_error(r, errors.USAGE, "host filesystem")


def test_bind_over_the_root_is_refused(caller, core_dir, core_image):
    # `-B DIR:/` would put a host directory in place of the image's root; the
    # mount points of the binds that follow (/etc/passwd, /var/tmp, ...) would
    # then be created in DIR on the host.  It must be refused up front.
    d = private_dir(core_dir, caller)
    for dst in ("/", "/."):
        r = caller.hpcrun("-B", "%s:%s" % (d, dst), core_image, "true", env={"HPCRUN_LINGER": "0"})
        assert os.listdir(d) == [], "mount points created on the host in %s: %s" % (d, os.listdir(d))
        assert r.returncode in (errors.USAGE, errors.NOPERM), r.stderr
        assert_one_error(r, r.returncode, "bind")


def test_user_bind_over_a_parent_of_a_default_bind(user_caller, core_dir, core_image):
    # Binding a directory at /home is common (site home layouts); the default
    # $HOME bind (/home/<user>) below it must not make the launch fail with an
    # error about a bind the user never asked for.
    c = user_caller
    d = private_dir(core_dir, c)
    write(os.path.join(d, "marker"), "mine\n")
    r = c.hpcrun("-B", "%s:/home" % d, core_image, "cat", "/home/marker", cwd="/")
    assert "%s:%s" % (c.home, c.home) not in r.stderr, r.stderr
    assert (r.returncode, r.stdout) == (0, "mine\n"), r.stderr
    assert os.listdir(d) == ["marker"]


def test_default_binds_off(caller, core_dir, core_image):
    # `default_binds = no` (site config): no /tmp, /proc, $HOME from the host;
    # the launch itself must still work.
    conf = write(os.path.join(core_dir, "nodefault-%s.conf" % caller.name), "default_binds = no\n")
    r = caller.hpcrun(core_image, "sh", "-c", "echo ok; ls /tmp | wc -l",
                      env={"HPCRUN_CONF": conf, "HPCRUN_LINGER": "0"}, cwd="/")
    assert "NoneType" not in r.stderr
    assert (r.returncode, r.stdout.split()) == (0, ["ok", "0"]), r.stderr     # the image's own, empty /tmp


# ================================================================ 6. errors ===

def _copy(src, directory, name, mode=0o644):
    dst = os.path.join(directory, name)
    shutil.copyfile(src, dst)
    os.chmod(dst, mode)
    return dst


@pytest.fixture(scope="module")
def bad(core_dir, core_image, busybox_squashfs):
    """Broken inputs, world-readable unless the case is about readability."""
    d = os.path.join(core_dir, "bad")
    os.mkdir(d, 0o755)
    p = {"dir": d}
    p["missing"] = os.path.join(d, "no-such.img")
    p["text"] = write(os.path.join(d, "text.img"), "this is a text file, not an image\n")
    rnd = random.Random(1234)
    with open(os.path.join(d, "random.img"), "wb") as f:
        f.write(bytes(rnd.getrandbits(8) for _ in range(65536)))
    p["random"] = os.path.join(d, "random.img")
    p["empty"] = write(os.path.join(d, "empty.img"), "")
    size = os.path.getsize(core_image)
    p["truncated"] = _copy(core_image, d, "truncated.img")
    os.truncate(p["truncated"], size // 2)
    p["truncated_sqfs"] = _copy(busybox_squashfs, d, "truncated.sqfs")
    os.truncate(p["truncated_sqfs"], os.path.getsize(busybox_squashfs) // 2)
    p["version"] = _copy(core_image, d, "version2.img")
    with open(p["version"], "r+b") as f:
        head = f.read(4096)
        assert b"\nHPCRUN-IMAGE 1 " in head
        f.seek(0)
        f.write(head.replace(b"\nHPCRUN-IMAGE 1 ", b"\nHPCRUN-IMAGE 2 ", 1))
    p["unreadable"] = _copy(core_image, d, "unreadable.img", 0o000)
    p["sif_empty"] = _copy(os.path.join(SIF_DIR, "empty.sif"), d, "empty.sif")
    p["sif_json"] = _copy(os.path.join(SIF_DIR, "one-object-generic-json.sif"), d, "json.sif")
    p["sif_truncated"] = _copy(os.path.join(SIF_DIR, "one-group.sif"), d, "truncated.sif")
    os.truncate(p["sif_truncated"], 36864 + 100)      # partition starts at 36864
    p["secret"] = os.path.join(d, "secret")           # forbidden by the site config
    os.mkdir(p["secret"], 0o755)
    os.mkdir(os.path.join(p["secret"], "sub"), 0o755)
    os.symlink(p["secret"], os.path.join(d, "secret-link"))
    p["conf"] = write(os.path.join(d, "hpcrun.conf"), "# test site\nforbid_bind = /nonexistent, %s\n" % p["secret"])
    p["unreadable_file"] = write(os.path.join(d, "unreadable-file"), "x\n", 0o000)
    p["envfile_bad"] = write(os.path.join(d, "bad.env"), "GOOD=1\nthis line is not an assignment\n")
    return p


# (id, hpcrun args built from (bad, image), exit code, message fragment, who)
ERROR_CASES = [
    ("image-missing", lambda b, img: [b["missing"], "true"], errors.NOINPUT, "image not found", "both"),
    ("image-unreadable", lambda b, img: [b["unreadable"], "true"], errors.NOINPUT, "not readable", "user"),
    ("not-an-image-text", lambda b, img: [b["text"], "true"], errors.DATA, "not an image", "both"),
    ("not-an-image-random", lambda b, img: [b["random"], "true"], errors.DATA, "not an image", "both"),
    ("not-an-image-empty", lambda b, img: [b["empty"], "true"], errors.DATA, "empty", "both"),
    ("image-is-a-device", lambda b, img: ["/dev/null", "true"], errors.DATA, "not an image", "both"),
    ("truncated-image", lambda b, img: [b["truncated"], "true"], errors.DATA, "truncated", "both"),
    ("truncated-squashfs", lambda b, img: [b["truncated_sqfs"], "true"], errors.DATA, "truncated", "both"),
    ("unsupported-version", lambda b, img: [b["version"], "true"], errors.DATA, "version 2", "both"),
    ("sif-without-partition", lambda b, img: [b["sif_empty"], "true"], errors.DATA, "no primary", "both"),
    ("sif-json-object-only", lambda b, img: [b["sif_json"], "true"], errors.DATA, "no primary", "both"),
    ("sif-truncated", lambda b, img: [b["sif_truncated"], "true"], errors.DATA, "truncated", "both"),
    ("command-not-found", lambda b, img: [img, "no-such-command"], errors.NOTFOUND, "not found", "both"),
    ("command-not-found-abs", lambda b, img: [img, "/bin/no-such"], errors.NOTFOUND, "not found", "both"),
    ("command-not-executable", lambda b, img: [img, "/bin/notexec"], errors.NOTEXEC, "not executable", "both"),
    ("command-is-a-directory", lambda b, img: [img, "/etc"], errors.NOTEXEC, "not executable", "both"),
    ("command-without-its-loader", lambda b, img: [img, "/bin/noloader"], errors.NOTFOUND,
     "its ELF loader /lib64/ld-nolib-x86-64.so.2 is not in the image", "both"),
    ("script-without-its-interpreter", lambda b, img: [img, "nointerp"], errors.NOTFOUND,
     "its #! interpreter /usr/bin/no-such-python3 is not in the image", "both"),
    ("bind-source-missing", lambda b, img: ["-B", b["missing"] + ":/x", img, "true"], errors.NOINPUT,
     "bind source not found", "both"),
    ("bind-source-unreadable", lambda b, img: ["-B", b["unreadable_file"] + ":/x", img, "true"], errors.NOINPUT,
     "bind source", "user"),
    ("bind-too-many-fields", lambda b, img: ["-B", "a:b:c:d", img, "true"], errors.USAGE, "malformed bind", "both"),
    ("bind-empty-source", lambda b, img: ["-B", ":/x", img, "true"], errors.USAGE, "malformed bind", "both"),
    ("bind-bad-mode", lambda b, img: ["-B", "/tmp:/x:rx", img, "true"], errors.USAGE, "mode", "both"),
    ("bind-relative-destination", lambda b, img: ["-B", "/tmp:../../x", img, "true"], errors.USAGE,
     "absolute", "both"),
    ("bind-destination-escapes", lambda b, img: ["-B", "/tmp:/../../x", img, "true"], errors.NOPERM,
     "escapes", "both"),
    ("bind-destination-escapes-env", lambda b, img: [img, "true"], errors.NOPERM, "escapes", "both"),
    ("bind-destination-symlink-loop", lambda b, img: ["-B", "/usr:/loop1/x", img, "true"], errors.USAGE,
     "symbolic links", "both"),
    ("bind-destination-through-a-file", lambda b, img: ["-B", "/usr:/data/readme/x", img, "true"], errors.USAGE,
     "non-directory", "both"),
    ("bind-forbidden", lambda b, img: ["-B", b["secret"] + ":/s", img, "true"], errors.NOPERM, "forbidden", "both"),
    ("bind-forbidden-subdir", lambda b, img: ["-B", b["secret"] + "/sub:/s", img, "true"], errors.NOPERM,
     "forbidden", "both"),
    ("bind-forbidden-via-symlink", lambda b, img: ["-B", b["dir"] + "/secret-link:/s", img, "true"],
     errors.NOPERM, "forbidden", "both"),
    ("bind-forbidden-parent", lambda b, img: ["-B", b["dir"] + ":/s", img, "true"], errors.NOPERM,
     "forbids", "both"),     # binding a parent would carry the forbidden path in
    ("option-after-image", lambda b, img: [img, "--bind", "/tmp", "true"], errors.USAGE, "before IMAGE", "both"),
    ("option-after-image-eq", lambda b, img: [img, "--env=A=1", "true"], errors.USAGE, "before IMAGE", "both"),
    ("option-after-image-attached", lambda b, img: [img, "-B/tmp", "true"], errors.USAGE, "before IMAGE", "both"),
    ("unknown-option", lambda b, img: ["--frobnicate", img, "true"], errors.USAGE, "unknown option", "both"),
    ("missing-image", lambda b, img: ["--cleanenv"], errors.USAGE, "missing IMAGE", "both"),
    ("missing-command", lambda b, img: [img], errors.USAGE, "missing COMMAND", "both"),
    ("option-needs-value", lambda b, img: ["-B"], errors.USAGE, "needs a value", "both"),
    ("malformed-env", lambda b, img: ["--env", "1BAD=x", img, "true"], errors.USAGE, "--env", "both"),
    ("env-file-missing", lambda b, img: ["--env-file", b["missing"], img, "true"], errors.NOINPUT, "env file",
     "both"),
    ("env-file-bad-line", lambda b, img: ["--env-file", b["envfile_bad"], img, "true"], errors.USAGE,
     "line 2", "both"),
    ("pwd-missing-inside", lambda b, img: ["--pwd", "/no/such/dir", img, "true"], errors.NOINPUT,
     "working directory", "both"),
    ("bad-mpi-value", lambda b, img: ["--mpi", "maybe", img, "true"], errors.USAGE, "--mpi", "both"),
]


def _error_params():
    out = []
    for case in ERROR_CASES:
        for who in ("root", "user"):
            if case[4] in ("both", who):
                out.append(pytest.param(case, who, id="%s-%s" % (case[0], who)))
    return out


@pytest.mark.parametrize("case,who", _error_params())
def test_error(request, bad, core_image, case, who):
    name, args, code, fragment, _ = case
    c = request.getfixturevalue(who + "_caller")
    env = {"HPCRUN_CONF": bad["conf"], "HPCRUN_LINGER": "0"}
    if name == "bind-destination-escapes-env":
        env["HPCRUN_BIND"] = "/tmp:/a/../../../x"
    watched = (core_image, bad["dir"], c.run_dir + "/")
    mounts_before = [l for w in watched for l in host_mounts(w)]
    r = c.hpcrun(*args(bad, core_image), env=env)
    assert_one_error(r, code, fragment)
    assert r.stdout == ""
    # Nothing left behind: no mount on the host naming the image or run dir,
    # and no keeper (whose namespace holds the container's mounts) survives.
    assert [l for w in watched for l in host_mounts(w)] == mounts_before
    assert eventually(lambda: not keepers_of(core_image) and not keepers_of(bad["dir"])), \
        "a keeper outlived its only user"


@pytest.mark.parametrize("size", ["small", "large"])
def test_reader_leaving_early_is_not_an_internal_error(root_caller, core_image, size):
    # `hpcrun --dry-run IMG | head`: the JSON is cut short, which is the
    # reader's choice, not a bug in hpcrun.  A large plan fails mid-write, a
    # small one at the final flush; neither may print "internal error" or a
    # Python traceback.  The status is the shell's for SIGPIPE (128+13).
    env = {"BIG": "x" * 100000} if size == "large" else {}
    p = root_caller.popen([root_caller.hpcrun_bin, "--dry-run", core_image, "true"], env=env)
    p.stdout.close()
    err = p.stderr.read()
    p.wait(timeout=60)
    assert err == ""
    assert p.returncode == 128 + signal.SIGPIPE


@pytest.mark.parametrize("text", [None, "no equals sign here\n", "default_binds = perhaps\n",
                                  "mount_strategy = teleport\n"])
def test_bad_site_config(caller, core_dir, core_image, text):
    # A broken configuration is the administrator's problem and says so (78).
    path = os.path.join(core_dir, "conf-%s-%d.conf" % (caller.name, abs(hash(text))))
    if text is not None:
        write(path, text)
    r = caller.hpcrun(core_image, "true", env={"HPCRUN_CONF": path, "HPCRUN_LINGER": "0"})
    assert_one_error(r, errors.CONFIG)
    assert eventually(lambda: not keepers_of(core_image))


def _without_user_namespaces(argv, uid, gid, env):
    """Run argv as uid/gid where creating a user namespace fails, as on a host with
    user.max_user_namespaces = 0.  That sysctl is per user namespace: set it to 0 in a
    fresh one that maps every id to itself (the host's own, which the CI sandbox may not
    let us change, stays as it is).  Returns (exit status, stdout, stderr)."""
    from hpcrun import linux
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(go_w)
            os.close(ready_r)
            linux.unshare(linux.CLONE_NEWUSER)
            os.write(ready_w, b"u")
            os.read(go_r, 1)                 # the parent has written our id maps
            with open("/proc/sys/user/max_user_namespaces", "w") as f:
                f.write("0")
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    os.close(go_r)
    os.close(ready_w)
    os.read(ready_r, 1)
    for name in ("uid_map", "gid_map"):
        with open("/proc/%d/%s" % (pid, name), "w") as f:
            f.write("0 0 65536")
    os.write(go_w, b"g")
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    return os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()


def test_user_namespaces_disabled_on_the_host(user_caller, core_image):
    env = {"PATH": "/usr/bin:/bin", "HOME": user_caller.home, "HPCRUN_LINGER": "0"}
    # a bind no other test uses: a fresh container, not a join of a lingering one
    argv = [user_caller.hpcrun_bin, "-B", "/var/tmp:/mnt/userns-off-%d" % os.getpid(), core_image, "true"]
    code, out, err = _without_user_namespaces(argv, user_caller.uid, user_caller.gid, env)
    assert_one_error(subprocess.CompletedProcess(argv, code, out, err), errors.UNAVAILABLE,
                     "user namespaces are disabled")
    assert not host_mounts(core_image)
    assert eventually(lambda: not keepers_of(core_image))


def test_users_hpcrun_conf_only_adds_restrictions(user_caller, core_dir, core_image):
    # A user's HPCRUN_CONF, whoever owns it, comes after the site's files and
    # may only restrict or set the user's own choices (tests/test_images.py,
    # "site policy", has the cases with a site file).
    for owner, mode in ((user_caller.uid, 0o644), (0, 0o644)):
        path = os.path.join(core_dir, "own-%d-%o.conf" % (owner, mode))
        write(path, "forbid_bind = /var/tmp\n")
        os.chown(path, owner, 0)
        os.chmod(path, mode)
        r = user_caller.hpcrun("-B", "/var/tmp:/v", core_image, "true", env={"HPCRUN_CONF": path})
        assert_one_error(r, errors.NOPERM, "forbidden")
        write(path, "mount_strategy = extract\n")
        r = user_caller.hpcrun(core_image, "true", env={"HPCRUN_CONF": path})
        assert_one_error(r, errors.CONFIG, "cannot set mount_strategy")


# =========================================================== 7. image kinds ===

@pytest.mark.parametrize("kind", ["hpcrun", "squashfs", "dir"])
def test_image_kinds(caller, busybox_image, busybox_squashfs, busybox_root, kind):
    img = {"hpcrun": busybox_image, "squashfs": busybox_squashfs, "dir": busybox_root}[kind]
    out = caller.ok(img, "sh", "-c", "head -1 /etc/os-release; echo $HPCRUN_CONTAINER; echo $IMAGE_VAR")
    assert out.splitlines() == ['PRETTY_NAME="hpcrun test image (busybox)"', img, "from-image"]
    assert caller.dry_run(img, "true")["image"]["kind"] == kind


def test_directory_image_is_not_changed(caller, core_dir, busybox_root):
    # A sandbox is the host's directory: what the program writes goes to the
    # container's writable layer (or fails), never into the directory.
    sandbox = os.path.join(core_dir, "sandbox-" + caller.name)
    if not os.path.exists(sandbox):
        shutil.copytree(busybox_root, sandbox, symlinks=True)
    os.chown(os.path.join(sandbox, "etc/os-release"), caller.uid, caller.gid)   # writable for the caller
    os.chmod(os.path.join(sandbox, "bin"), 0o777)
    caller.hpcrun(sandbox, "sh", "-c", "touch /bin/new-file; echo changed > /etc/os-release")
    assert not os.path.exists(os.path.join(sandbox, "bin/new-file"))
    with open(os.path.join(sandbox, "etc/os-release")) as f:
        assert f.read().startswith("PRETTY_NAME=")


@pytest.mark.parametrize("sif", ["one-group.sif", "two-groups.sif", "one-group-signed-pgp.sif",
                                 "one-group-signed-dsse.sif"])
def test_sif(caller, core_dir, sif):
    # Real SIF files from the SIF reference tooling; their SquashFS holds only
    # /hello.txt, so busybox is bound in as /bin/cat (busybox picks the applet by name).
    path = os.path.join(core_dir, "kinds-" + sif)
    if not os.path.exists(path):
        _copy(os.path.join(SIF_DIR, sif), core_dir, "kinds-" + sif)
    out = caller.ok("-B", "%s:/bin/cat" % BUSYBOX, path, "/bin/cat", "/hello.txt")
    assert out == SIF_HELLO
    plan = caller.dry_run(path, "true")
    assert (plan["image"]["kind"], plan["image"]["offset"]) == ("sif", 36864)


def test_executable_image_runs_its_runscript(caller, core_dir, busybox_root, hpcrun_bin):
    # The header's first line is `#!/usr/bin/env -S hpcrun run`: ./img ARGS runs the runscript.
    d = private_dir(core_dir, caller)
    img = imagetools.make_image(busybox_root, os.path.join(d, "app.img"))
    os.chmod(img, 0o755)
    with open(img, "rb") as f:
        assert f.readline() == b"#!/usr/bin/env -S hpcrun run\n"
    path = "%s:/usr/bin:/bin" % os.path.dirname(hpcrun_bin)
    r = caller.run(["./app.img", "one", "two words"], env={"PATH": path}, cwd=d)
    assert (r.returncode, r.stdout) == (0, "runscript says one two words\n"), r.stderr
    # the same, spelled out
    assert caller.ok("run", img, "x") == "runscript says x\n"
    # by absolute path, from elsewhere
    r = caller.run([img, "ok"], env={"PATH": path}, cwd="/")
    assert r.stdout == "runscript says ok\n"


def test_run_without_runscript(caller, core_dir):
    root = os.path.join(core_dir, "norunscript-root")
    if not os.path.exists(root):
        imagetools.make_busybox_root(root)
    img = os.path.join(core_dir, "norunscript.sqfs")
    if not os.path.exists(img):
        imagetools.mksquashfs(root, img)
    r = caller.hpcrun("run", img)
    assert_one_error(r, errors.NOTFOUND, "runscript")


# ============================================================== 8. dry-run ===

def test_dry_run_prints_the_plan(caller, core_dir, core_image):
    d = private_dir(core_dir, caller)
    env = {"LD_PRELOAD": "", "LD_LIBRARY_PATH": "/host/lib", "HPCRUN_ENV_FROM_PREFIX": "p"}
    plan = caller.dry_run("-B", "%s:/in:ro" % d, "--env", "K=V", "--pwd", "/in", core_image, "prog", "a b",
                          env=env)
    assert plan["image"]["path"] == core_image and plan["image"]["kind"] == "hpcrun"
    assert plan["argv"] == ["prog", "a b"]
    assert plan["cwd"] == "/in"
    assert (plan["uid"], plan["gid"], plan["userns"]) == (caller.uid, caller.gid, caller.uid != 0)
    user_binds = [b for b in plan["binds"] if b["why"] == "user"]
    assert [(b["src"], b["dst"], b["ro"]) for b in user_binds] == [(d, "/in", True)]
    assert {"/dev", "/proc", "/sys", "/tmp"} <= {b["dst"] for b in plan["binds"]}
    assert plan["env"]["user"] == {"FROM_PREFIX": "p", "K": "V"}
    assert {"LD_PRELOAD", "LD_LIBRARY_PATH"} <= set(plan["env"]["dropped"])
    assert plan["env"]["set"]["HPCRUN_CONTAINER"] == core_image
    assert plan["image_meta"].get("runscript") == ["/bin/echo", "runscript says"]
    assert len(plan["key"]) == 24
    # nothing was started for it
    assert not os.path.exists(os.path.join(caller.run_dir, plan["key"] + ".pid"))


def test_dry_run_validates_like_a_launch(caller, bad, core_image):
    # --dry-run must refuse what a launch would refuse (same codes).
    r = caller.hpcrun("--dry-run", bad["truncated"], "true")
    assert_one_error(r, errors.DATA)
    r = caller.hpcrun("--dry-run", "-B", "a:b:c:d", core_image, "true")
    assert_one_error(r, errors.USAGE)


# ==================================================== 9. the node container ===

def _key(caller, image, *args, cwd=None, env=None):
    return caller.dry_run(*args, image, "true", cwd=cwd, env=env)["key"]


def _run_dir_entries(caller, key):
    try:
        return sorted(n for n in os.listdir(caller.run_dir) if n.startswith(key))
    except FileNotFoundError:
        return []


def test_container_workspace_is_not_visible_inside(caller, core_dir, busybox_root):
    # The keeper's workspace (run_dir/<key>.d: image mount, overlay, upper
    # layer) is node plumbing.  The default /tmp bind must not carry copies
    # of those mounts into the container.
    img = fresh_image(private_dir(core_dir, caller), busybox_root, "ws")
    out = caller.ok(img, "cat", "/proc/self/mountinfo", cwd="/", env={"HPCRUN_LINGER": "0"})
    mount_points = [line.split()[4] for line in out.splitlines()]
    leaked = [m for m in mount_points if m.startswith(caller.run_dir + "/")]
    assert leaked == [], "container sees its own workspace mounts: %s" % leaked[:5]


@pytest.mark.parametrize("how", ["normal-exit", "keeper-error"])
def test_run_dir_is_clean_after_the_container_goes(caller, core_dir, busybox_root, how):
    # After the last process leaves and `linger` passes, the keeper removes
    # its record, lock and workspace: nothing named after the key remains.
    d = private_dir(core_dir, caller)
    img = fresh_image(d, busybox_root, "clean")
    if how == "normal-exit":
        args = (img,)
        key = _key(caller, img, cwd="/")
        caller.ok(*args, "true", cwd="/", env={"HPCRUN_LINGER": "0"})
    else:
        # a bind of a directory onto an image file: refused inside the keeper, after it mounted things
        args = ("-B", "%s:/etc/os-release" % d, img)
        key = _key(caller, img, *args[:2], cwd="/")
        r = caller.hpcrun(*args, "true", cwd="/", env={"HPCRUN_LINGER": "0"})
        assert_one_error(r, errors.USAGE, "directory")
    assert eventually(lambda: not keepers_of(img)), "keeper did not exit"
    assert _run_dir_entries(caller, key) == []


def test_keeper_is_shared_and_goes_away(user_caller, core_dir, busybox_root):
    # Two overlapping launches with the same plan share one container (same
    # mount namespace); when both are gone the keeper exits.
    c = user_caller
    img = fresh_image(private_dir(core_dir, c), busybox_root, "shared")
    env = {"HPCRUN_LINGER": "0"}
    first = c.popen([c.hpcrun_bin, img, "sh", "-c", "readlink /proc/self/ns/mnt; read x"], env=env,
                    stdin=subprocess.PIPE, cwd="/")
    try:
        ns1 = first.stdout.readline().strip()
        ns2 = c.ok(img, "readlink", "/proc/self/ns/mnt", env=env, cwd="/").strip()
        assert ns1 and ns1 == ns2
        assert len(keepers_of(img)) == 1
    finally:
        first.communicate("\n", timeout=60)
    assert first.returncode == 0
    assert eventually(lambda: not keepers_of(img))


def test_keeper_leaves_when_its_run_dir_is_removed(user_caller, core_dir, busybox_root):
    # A cleaner of /tmp (systemd-tmpfiles, a job epilogue, a test's clean-up)
    # removes the run directory while a keeper lingers: no rank can find that
    # keeper any more, so it must leave, not wait for a lock file forever.
    c = user_caller
    d = private_dir(core_dir, c)
    img = fresh_image(d, busybox_root, "rundir-gone")
    run_dir = os.path.join(d, "run")
    conf = os.path.join(d, "hpcrun.conf")
    write(conf, "run_dir = %s\n" % run_dir)
    env = {"HPCRUN_LINGER": "2", "HPCRUN_CONF": conf}
    assert c.hpcrun(img, "true", env=env, cwd="/").returncode == 0
    assert len(keepers_of(img)) == 1
    shutil.rmtree(run_dir)
    assert eventually(lambda: not keepers_of(img), timeout=20), "keeper outlived its run directory"


def test_a_killed_stagers_half_copy_is_removed(user_caller, core_dir, busybox_root):
    # A stager killed mid-copy leaves <payload>.sqfs.<pid>.tmp; the next one removes it.
    c = user_caller
    d = private_dir(core_dir, c)
    img = fresh_image(d, busybox_root, "stale")
    env = {"HPCRUN_LINGER": "0"}
    assert c.hpcrun(img, "true", env=env).returncode == 0          # makes run_dir/stage
    stage_dir = os.path.join(c.run_dir, "stage")
    from hpcrun import image, stage
    stale = os.path.join(stage_dir, "%s.sqfs.999999.tmp" % stage.staged_name(image.open_image(img).describe()))
    write(stale, "half a payload")
    os.chown(stale, c.uid, c.gid)
    assert eventually(lambda: not keepers_of(img))                  # the first container is gone
    assert c.hpcrun(img, "true", env=env).returncode == 0
    assert not os.path.exists(stale)


def test_two_containers_of_one_image_share_one_staged_copy(user_caller, core_dir, busybox_root):
    # Different binds make different keys, hence two keepers; the payload
    # staged for FUSE is still copied once, both containers start while the
    # other holds it, and the last one to leave deletes it.
    c = user_caller
    d = private_dir(core_dir, c)
    img = fresh_image(d, busybox_root, "twokeys")
    digest = payload_digest(img)
    env = {"HPCRUN_LINGER": "0"}
    stage_dir = os.path.join(c.run_dir, "stage")
    hold = "cat /etc/unique; read x"
    a, unique = _hold(c, img, env)
    b = None
    try:
        b = c.popen([c.hpcrun_bin, "-B", "%s:/extra" % d, img, "sh", "-c", hold], env=env,
                    stdin=subprocess.PIPE, cwd="/")
        assert b.stdout.readline() == unique
        assert len(keepers_of(img)) == 2
        assert len([n for n in os.listdir(stage_dir) if digest in n and n.endswith(".sqfs")]) == 1
    finally:
        for p in (a, b):
            if p is not None:
                p.communicate("\n", timeout=60)
    assert (a.returncode, b.returncode) == (0, 0)
    assert eventually(lambda: not keepers_of(img))
    assert [n for n in os.listdir(stage_dir) if digest in n] == []


def _hold(c, img, env=None):
    """A rank that stays inside until its stdin gets a line; returns (popen, first output line)."""
    p = c.popen([c.hpcrun_bin, img, "sh", "-c", "cat /etc/unique; read x"], env=env or {"HPCRUN_LINGER": "0"},
                stdin=subprocess.PIPE, cwd="/")
    line = p.stdout.readline()
    if not line:
        p.wait(timeout=60)
        raise AssertionError("holding rank failed: %s" % p.stderr.read())
    return p, line


def _pipe_inodes(pid):
    out = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            t = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if t.startswith("pipe:"):
            out.add(t)
    return out


def test_keeper_holds_none_of_the_ranks_descriptors(caller, core_dir, busybox_root):
    # The keeper is forked from the first rank.  If it kept that rank's
    # stdout/stderr (or its other descriptors) a reader waiting for EOF would
    # wait for the keeper, i.e. `linger` seconds after the job.
    img = fresh_image(private_dir(core_dir, caller), busybox_root, "fds")
    r, w = os.pipe()
    try:
        p = caller.popen([caller.hpcrun_bin, img, "sh", "-c", "cat /etc/unique; read x"],
                         env={"HPCRUN_LINGER": "0"}, stdin=subprocess.PIPE, cwd="/", pass_fds=(w,))
        try:
            assert p.stdout.readline().strip()
            rank_pipes = {"pipe:[%d]" % os.fstat(fd).st_ino for fd in (p.stdout.fileno(), p.stderr.fileno(),
                                                                       p.stdin.fileno(), w)}
            keepers = keepers_of(img)
            assert len(keepers) == 1
            assert _pipe_inodes(keepers[0]) & rank_pipes == set()
        finally:
            p.communicate("\n", timeout=60)
    finally:
        os.close(r)
        os.close(w)
    assert p.returncode == 0


def _dead(pid):
    """Gone, or a zombie not yet reaped (its /proc/PID/stat, start time included, is still there)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_a_killed_keeper_is_replaced(caller, core_dir, busybox_root):
    # A keeper that dies (OOM killer, admin) leaves a record naming a dead
    # PID; the next launch must notice and start a new container, also while
    # the dead keeper is still an unreaped zombie (its reaper is init, which
    # may take its time: ~1 s on this machine).
    img = fresh_image(private_dir(core_dir, caller), busybox_root, "killed")
    p, unique = _hold(caller, img)
    try:
        (old,) = keepers_of(img)
        os.kill(old, signal.SIGKILL)
        assert eventually(lambda: _dead(old))
        assert caller.ok(img, "cat", "/etc/unique", cwd="/", env={"HPCRUN_LINGER": "0"}) == unique
    finally:
        try:
            p.communicate("\n", timeout=60)
        except Exception:
            p.kill()
            p.wait()
    assert eventually(lambda: not keepers_of(img))


N_RANKS = 256


def test_many_ranks_at_once_share_one_container(user_caller, core_dir, busybox_root, tmp_path):
    # 256 hpcrun processes started together on one (fresh) image, as the
    # unprivileged user: all succeed, all run in the same mount namespace, and
    # the node holds one keeper, one squashfuse and one staged payload.
    c = user_caller
    d = private_dir(core_dir, c)
    img = fresh_image(d, busybox_root, "many")
    digest = payload_digest(img)
    # linger 5 s: ranks start over a second or so and a rank may finish before
    # the next one joins; with linger 0 the keeper could rightly leave in such
    # a gap and a second container would be correct, not a failure.
    env = {"HPCRUN_LINGER": "5"}
    outs = []
    procs = []
    # One rank in the middle stays inside (blocked on stdin) so that the
    # container can be counted after the others are done; which rank creates
    # the container is left to the race.
    anchor_at = N_RANKS // 2
    try:
        for i in range(N_RANKS):
            out = open(tmp_path / ("out.%d" % i), "w+")
            outs.append(out)
            if i == anchor_at:
                cmd = [c.hpcrun_bin, img, "sh", "-c", "readlink /proc/self/ns/mnt; read x"]
                procs.append(c.popen(cmd, env=env, cwd="/", stdin=subprocess.PIPE, stdout=out,
                                     stderr=subprocess.STDOUT))
            else:
                cmd = [c.hpcrun_bin, img, "readlink", "/proc/self/ns/mnt"]
                procs.append(c.popen(cmd, env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT))
        codes = {i: p.wait(timeout=180) for i, p in enumerate(procs) if i != anchor_at}
        assert eventually(lambda: os.path.getsize(outs[anchor_at].name) > 0, 60)
        texts = []
        for o in outs:
            o.seek(0)
            texts.append(o.read())
        failed = [(i, codes[i], texts[i]) for i in codes if codes[i] != 0]
        assert failed == [], "%d ranks failed, first: %r" % (len(failed), failed[:3])
        namespaces = {t.strip() for t in texts}
        assert len(namespaces) == 1 and next(iter(namespaces)).startswith("mnt:["), namespaces

        keepers = keepers_of(img)
        assert len(keepers) == 1, keepers
        assert os.readlink("/proc/%d/ns/mnt" % keepers[0]) == namespaces.pop()
        key = _key(c, img, cwd="/")
        assert key + ".pid" in _run_dir_entries(c, key)
        staged = [n for n in os.listdir(os.path.join(c.run_dir, "stage")) if digest in n and n.endswith(".sqfs")]
        assert len(staged) == 1, staged
        fuse = [pid for pid, cmd in fuse_daemons() if digest in cmd or img in cmd]
        assert len(fuse) == 1, fuse
    finally:
        for i, p in enumerate(procs):
            if i == anchor_at:
                try:
                    p.communicate("\n", timeout=60)
                except Exception:
                    p.kill()
            elif p.poll() is None:
                p.kill()
            p.wait()
        for o in outs:
            o.close()
    # the last rank gone, the keeper leaves and takes the staged payload with it
    assert eventually(lambda: not keepers_of(img), 60)
    assert [n for n in os.listdir(os.path.join(c.run_dir, "stage")) if digest in n] == []


# ============================================================ 10. the floors ===

def _hpcrun_imports():
    """{module: {imported hpcrun module, top level or lazy}} read from the installed package's source."""
    import ast
    import hpcrun
    pkg = os.path.dirname(hpcrun.__file__)
    graph = {}
    for name in os.listdir(pkg):
        if not name.endswith(".py"):
            continue
        mod = name[:-3]
        tree = ast.parse(open(os.path.join(pkg, name)).read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "hpcrun":
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hpcrun."):
                deps.add(node.module.split(".")[1])
        graph[mod] = deps - {"VERSION", mod}
    return graph


# The node container's floors (docs/design.md): each may import only what is listed.
FLOORS = {
    "entry": set(),
    "join": {"errors", "fdio", "node", "rankcalls"},
    "node": {"errors", "fdio", "linux", "stage", "rootfs", "mpi", "gpu", "plan", "signature"},
    "signature": {"errors", "fdio", "imagefile", "sifsign"},
    "sifsign": {"errors", "imagefile", "sif"},
    "stage": {"errors", "fdio", "linux", "imagefile"},
    "imagefile": {"errors"},
    "rootfs": {"errors", "fdio", "linux"},
    "fdio": set(),
    "linux": set(),
    "rankcalls": {"linux"},
    "ticket": set(),
}


def test_import_floors():
    graph = _hpcrun_imports()
    assert graph["rankos"] == set()          # the floor below all: os for the rank's modules (rankos.py)
    for mod, allowed in FLOORS.items():
        allowed = allowed | {"rankos"}
        assert graph[mod] <= allowed, "%s imports %s (allowed: %s)" % (mod, graph[mod] - allowed, allowed)
    # no circles among the package's modules (subpackages counted as one)
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import circle: %s" % " -> ".join(path + [m])
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            visit(d, path + [m])
        state[m] = "done"
    for m in sorted(graph):
        visit(m, [])


# ================================================ 11. hostile images, mount side ===

def hostile_image(caller, core_dir, busybox_root, name, edit, meta=None):
    """A fresh image from the busybox root after edit(root); unique, so its own container."""
    d = private_dir(core_dir, caller)
    root = os.path.join(d, name + "-root")
    shutil.copytree(busybox_root, root, symlinks=True)
    write(os.path.join(root, "etc/unique"), uuid.uuid4().hex + "\n")
    edit(root)
    img = imagetools.make_image(root, os.path.join(d, name + ".img"), meta=meta)
    shutil.rmtree(root)
    return d, img


def host_state(paths):
    """What a launch must not change on the host: for each path, None or (inode, mtime, size)."""
    out = {}
    for p in paths:
        try:
            st = os.lstat(p)
            out[p] = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            out[p] = None
    return out


def planted(base, user):
    """Where the old mount-point code created files when base led to the container's root."""
    names = ["etc", "etc/hosts", "etc/resolv.conf", "etc/localtime", "etc/passwd", "etc/group", "home",
             "home/" + user, "root", "hpcrun-probe"]
    return [os.path.join(base, n) for n in names]


def assert_nothing_left(caller, img, key):
    assert eventually(lambda: not keepers_of(img)), "keeper left running"
    assert eventually(lambda: _run_dir_entries(caller, key) == [], 10), _run_dir_entries(caller, key)
    assert not [pid for pid, cmd in fuse_daemons() if key in cmd]


@pytest.mark.parametrize("where", ["/var/tmp", "/tmp", "home"])
def test_magic_link_in_the_image_leads_nowhere(caller, core_dir, busybox_root, where):
    # /var/tmp -> /proc/self/root in the image: followed through the host's
    # /proc it is the host's real root.  Resolved inside the image root with
    # magic links refused, the default bind there is refused: 77, and nothing
    # is created or mounted on the host.
    link = caller.home if where == "home" else where

    def edit(root):
        p = os.path.join(root, link.lstrip("/"))
        shutil.rmtree(p, ignore_errors=True)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        os.symlink("/proc/self/root", p)
    d, img = hostile_image(caller, core_dir, busybox_root, "magic", edit)
    watched = planted("/", caller.name) + planted("/var/tmp", caller.name) + planted("/tmp", caller.name) + \
        planted(caller.home, caller.name)
    before = host_state(watched)
    key = _key(caller, img, cwd="/")
    r = caller.hpcrun(img, "cat", "/etc/hostname", cwd="/", env={"HPCRUN_LINGER": "0"})
    assert_one_error(r, errors.NOPERM, "magic link", link)
    assert host_state(watched) == before
    assert_nothing_left(caller, img, key)


def test_link_through_another_process_root_is_refused(caller, core_dir, busybox_root):
    # /home -> /proc/1/root/home: init's root, unreadable for the user (EACCES
    # while resolving $HOME's bind): one line, nothing made.  Root's $HOME is
    # /root, not under the link: its launch just works.
    def edit(root):
        shutil.rmtree(os.path.join(root, "home"))
        os.symlink("/proc/1/root/home", os.path.join(root, "home"))
    d, img = hostile_image(caller, core_dir, busybox_root, "init-root", edit)
    watched = planted("/home", caller.name) + planted(caller.home, caller.name)
    before = host_state(watched)
    key = _key(caller, img, cwd="/")
    r = caller.hpcrun(img, "true", cwd="/", env={"HPCRUN_LINGER": "0"})
    if caller.is_me:
        assert r.returncode == 0, r.stderr
    else:
        assert_one_error(r, errors.USAGE, "path in the image cannot be resolved")
    assert host_state(watched) == before
    assert_nothing_left(caller, img, key)


def test_bind_onto_a_magic_link_is_refused(caller, core_dir, core_image):
    # -B DIR:/proc/self/root would be DIR over the container's root, and the
    # generated /etc/passwd and /etc/group would then be made in DIR.
    d = private_dir(core_dir, caller)
    for dst in ("/proc/self/root", "/proc/self/cwd/x", "/proc/../proc/self/root/etc", "/dev/fd/0"):
        r = caller.hpcrun("-B", "%s:%s" % (d, dst), core_image, "true", cwd="/", env={"HPCRUN_LINGER": "0"})
        assert os.listdir(d) == [], "created in the bind source %s: %s" % (d, os.listdir(d))
        assert_one_error(r, errors.NOPERM, "magic link")


@pytest.mark.parametrize("link,target", [("up", "../../../../.."), ("abs", "/"), ("dotdot", "/etc/../..")])
def test_links_in_a_bind_destinations_parents_stay_in_the_image(caller, core_dir, busybox_root, link, target):
    # Relative and absolute links and '..' chains in the destination's parents
    # end at the image's root; the destination is created there, not on the host.
    probe = "hpcrun-core-probe-%s" % uuid.uuid4().hex[:8]
    d, img = hostile_image(caller, core_dir, busybox_root, "parents",
                           lambda root: os.symlink(target, os.path.join(root, "etc", link)))
    src = private_dir(core_dir, caller)
    write(os.path.join(src, "f"), "bound\n")
    r = caller.hpcrun("-B", "%s:/etc/%s/../%s/x/%s" % (src, link, link, probe), img, "cat", "/x/%s/f" % probe,
                      cwd="/", env={"HPCRUN_LINGER": "0"})
    assert not os.path.lexists("/x/" + probe) and not os.path.lexists("/" + probe)
    assert (r.returncode, r.stdout) == (0, "bound\n"), r.stderr


def test_read_only_bind_is_read_only_all_the_way_down(caller, core_dir, core_image):
    # A file system mounted below SRC comes along with a recursive bind; :ro
    # must cover it too (mount_setattr AT_RECURSIVE).
    src = private_dir(core_dir, caller)
    sub = os.path.join(src, "sub")
    os.mkdir(sub)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0777", "hpcrun-core-sub", sub], check=True)
    try:
        r = caller.hpcrun("-B", "%s:/data2:ro" % src, core_image, "sh", "-c",
                          "touch /data2/sub/x 2>/dev/null && echo writable-sub; "
                          "touch /data2/x 2>/dev/null && echo writable-top; echo done",
                          cwd="/", env={"HPCRUN_LINGER": "0"})
        assert (r.returncode, r.stdout) == (0, "done\n"), r.stderr
        assert os.listdir(sub) == []
    finally:
        subprocess.run(["umount", "-l", sub], check=True)


def test_mounts_are_locked_against_the_namespaces_own_capabilities(user_caller, core_dir, core_image):
    # What a rank holds between setns and execve (all capabilities of the
    # container's user namespace) must not undo a :ro bind, unmount a bind or
    # change what later ranks see: ranks join a child namespace pair whose
    # mounts the kernel locked.  Here Python's ctypes does what booby-trapped
    # image code once did inside hpcrun.
    c = user_caller
    d = private_dir(core_dir, c)
    write(os.path.join(d, "f"), "ro\n")
    env = {"HPCRUN_LINGER": "0"}
    anchor = c.popen([c.hpcrun_bin, "-B", "%s:/data2:ro" % d, core_image, "sh", "-c", "echo in; read x"],
                     env=env, stdin=subprocess.PIPE, cwd="/")
    try:
        assert anchor.stdout.readline() == "in\n"
        prog = ("import ctypes, os, sys\n"
                "from hpcrun import linux\n"
                "pid = int(sys.argv[1])\n"
                "for ns, flag in (('user', linux.CLONE_NEWUSER), ('mnt', linux.CLONE_NEWNS)):\n"
                "    linux.setns(os.open('/proc/%d/ns/%s' % (pid, ns), os.O_RDONLY), flag)\n"
                "out = []\n"
                "for what, call in (('remount-rw', lambda: linux.mount(None, '/data2', None, linux.MS_REMOUNT | "
                "linux.MS_BIND)),\n"
                "                   ('umount', lambda: linux.umount2('/data2', linux.MNT_DETACH)),\n"
                "                   ('umount-root', lambda: linux.umount2('/', linux.MNT_DETACH))):\n"
                "    try:\n"
                "        call(); out.append(what + ':done')\n"
                "    except OSError as e:\n"
                "        out.append(what + ':refused')\n"
                "print(' '.join(out))\n")
        r = c.run([sys.executable, "-c", prog, str(anchor.pid)], env=env, cwd="/")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["remount-rw:refused", "umount:refused", "umount-root:refused"], r.stdout
        # and a later rank still sees the bind, read-only
        r = c.hpcrun("-B", "%s:/data2:ro" % d, core_image, "sh", "-c", "cat /data2/f; touch /data2/f || echo ro",
                     env=env, cwd="/")
        assert r.stdout.split("\n")[:1] == ["ro"] and r.stdout.strip().endswith("ro"), (r.stdout, r.stderr)
    finally:
        anchor.communicate("\n", timeout=60)


TRAP = "open(%r, 'a').write(__name__ + '\\n')\n"


def test_no_byte_of_the_image_runs_inside_hpcrun(caller, core_dir, busybox_root):
    # The image plants Python modules where hpcrun's interpreter would look
    # after the join (its stdlib, encodings/, hpcrun's own package dir).  On
    # every path after the join (--debug's traceback, -v, run's json, errors)
    # none of them may run: each would write its name to a marker file.
    import hpcrun
    marker_dir = private_dir(core_dir, caller, 0o777)
    marker = os.path.join(marker_dir, "ran")
    stdlib = os.path.dirname(os.__file__)
    pkg = os.path.dirname(hpcrun.__file__)
    trap = TRAP % marker

    def edit(root):
        for rel in ("traceback.py", "json/__init__.py", "json/decoder.py", "linecache.py", "tokenize.py",
                    "encodings/__init__.py", "encodings/latin_1.py", "encodings/cp1252.py", "encodings/ascii.py",
                    "encodings/utf_16.py", "encodings/idna.py", "codecs.py", "_sitebuiltins.py"):
            path = os.path.join(root, stdlib.lstrip("/"), rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write(path, trap)
        for rel in ("linux.py", "rankcalls.py", "fdio.py", "errors.py", "cmd_inspect.py", "__init__.py"):
            path = os.path.join(root, pkg.lstrip("/"), rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write(path, trap)
    d, img = hostile_image(caller, core_dir, busybox_root, "trap", edit)
    env = {"HPCRUN_LINGER": "0", "LANG": "C", "LC_ALL": "C"}
    cases = [(("--debug", img, "/no/such/cmd"), errors.NOTFOUND),
             (("--debug", "-v", img, "/bin/notexec-missing"), errors.NOTFOUND),
             (("-v", img, "true"), 0),
             (("run", "--debug", img), 0),
             (("--debug", "--pwd", "/no/such/dir", img, "true"), errors.NOINPUT)]
    for args, code in cases:
        r = caller.hpcrun(*args, cwd="/", env=env)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert not os.path.exists(marker), "image code ran inside hpcrun (%s): %s" % (
            " ".join(args), open(marker).read())


@pytest.mark.parametrize("path", ["/etc/passwd", "/etc/group", "/.hpcrun/image.json", "/.hpcrun/env",
                                  "/etc/ld.so.cache"])
def test_a_fifo_in_the_image_does_not_hang(caller, core_dir, busybox_root, path):
    # The keeper (passwd, group, image.json, the loader cache the MPI wiring
    # reads) and the rank (env) read files the image supplies: a FIFO there
    # must be refused, not opened blocking.
    def edit(root):
        p = os.path.join(root, path.lstrip("/"))
        if os.path.lexists(p):
            os.unlink(p)
        os.mkfifo(p)
    d, img = hostile_image(caller, core_dir, busybox_root, "fifo", edit, meta={})
    key = _key(caller, img, cwd="/")
    r = caller.hpcrun(img, "echo", "ran", cwd="/", env={"HPCRUN_LINGER": "0"}, timeout=60)
    assert (r.returncode, r.stdout) == (0, "ran\n"), r.stderr
    assert_nothing_left(caller, img, key)


def test_a_keeper_that_is_not_ready_in_time_is_stopped(root_caller, core_dir, busybox_root):
    # Every wait for a keeper has a time limit (keeper_timeout); past it the
    # rank stops the keeper and removes what it left: no keeper, no
    # squashfuse, no <key>.d, <key>.lock or <key>.pid.
    c = root_caller
    conf = write(os.path.join(core_dir, "timeout.conf"), "keeper_timeout = 0.001\n")
    d, img = hostile_image(c, core_dir, busybox_root, "slow", lambda root: None)
    env = {"HPCRUN_CONF": conf, "HPCRUN_LINGER": "0"}
    key = _key(c, img, cwd="/", env=env)
    r = c.hpcrun(img, "true", cwd="/", env=env)
    assert_one_error(r, errors.OSERR, "not ready within")
    assert_nothing_left(c, img, key)
    assert not host_mounts(key)


def test_resolution_without_openat2(tmp_path, monkeypatch):
    # The component walk used where the kernel has no openat2: links followed
    # inside the root, magic links refused, '..' stops at the root.
    if os.getuid() != 0:
        pytest.skip("needs root (reads the test tree as the keeper would)")
    import errno as errno_mod
    from hpcrun import linux, rootfs

    def no_openat2(*args, **kw):
        raise OSError(errno_mod.ENOSYS, "no openat2")
    monkeypatch.setattr(linux, "openat2", no_openat2)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "f").write_text("inside\n")
    os.symlink("/etc", root / "abs")
    os.symlink("../../../../etc", root / "rel")
    os.symlink("/proc/self/root", root / "magic")
    os.symlink("loop", root / "loop")
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for p in ("/abs/f", "rel/f", "/etc/../../../etc/f", "abs/../rel/f"):
            assert rootfs.read_regular(root_fd, p) == b"inside\n", p
        with pytest.raises(FileNotFoundError):
            rootfs.open_in_root(root_fd, "/magic/etc")          # no /proc in this root
        slash = os.open("/", os.O_PATH | os.O_DIRECTORY)
        try:
            with pytest.raises(errors.Error) as e:
                rootfs.open_in_root(slash, "/proc/self/root/etc")
            assert e.value.code == errors.NOPERM
        finally:
            os.close(slash)
        with pytest.raises(errors.Error) as e:
            rootfs.open_in_root(root_fd, "/loop/x")
        assert e.value.code == errors.USAGE
    finally:
        os.close(root_fd)


@pytest.mark.parametrize("target", ["/etc/env-real", "/dev/zero"])
def test_image_env_file_through_a_link(caller, core_dir, busybox_root, target):
    # /.hpcrun/env as a link: to a regular file it is read as before; to a
    # device it is never opened (stat first), and the launch goes on.
    def edit(root):
        write(os.path.join(root, "etc/env-real"), "LINKED_VAR=linked\n")
        env = os.path.join(root, ".hpcrun/env")
        if os.path.lexists(env):
            os.unlink(env)
        os.symlink(target, env)
    d, img = hostile_image(caller, core_dir, busybox_root, "envlink", edit)
    r = caller.hpcrun(img, "sh", "-c", "echo ${LINKED_VAR:-unset}", cwd="/", env={"HPCRUN_LINGER": "0"},
                      timeout=60)
    assert (r.returncode, r.stdout) == (0, "linked\n" if target.startswith("/etc") else "unset\n"), r.stderr


def test_read_only_without_mount_setattr(tmp_path):
    # Where the kernel has no mount_setattr(2), :ro remounts the bind and every
    # mount below it, one by one.  In a child with a mount namespace of its own.
    if os.getuid() != 0:
        pytest.skip("needs root (a mount namespace in a child)")
    import errno as errno_mod
    from hpcrun import linux, rootfs
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    dst.mkdir()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            def no_mount_setattr(*args, **kw):
                raise OSError(errno_mod.ENOSYS, "no mount_setattr")
            linux.mount_setattr = no_mount_setattr
            linux.unshare(linux.CLONE_NEWNS)
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            linux.mount("hpcrun-test", str(src / "sub"), "tmpfs", 0, "mode=0755")
            linux.mount(str(src), str(dst), None, linux.MS_BIND | linux.MS_REC)
            fd = os.open(str(dst), os.O_PATH)
            rootfs._read_only(fd, "test")
            out = []
            for p in (dst / "x", dst / "sub" / "x"):
                try:
                    open(p, "w").close()
                    out.append("writable")
                except OSError as e:
                    out.append(errno_mod.errorcode[e.errno])
            os.write(w, " ".join(out).encode())
        except BaseException as e:
            os.write(w, repr(e).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode()
    os.waitpid(pid, 0)
    assert said == "EROFS EROFS", said
    assert os.listdir(src) == ["sub"]


def test_debug_is_accepted_by_every_subcommand(hpcrun_bin, tmp_path):
    """Errors say `rerun with --debug`: subcommands take it too (they refused it as an unknown option, 64)."""
    missing = str(tmp_path / "no-such.img")
    for sub in (["inspect"], ["verify"], ["broadcast", "--mpi", "no"], ["run-help"]):
        r = subprocess.run([hpcrun_bin] + sub + ["--debug", missing], capture_output=True, text=True, timeout=60)
        assert r.returncode == errors.NOINPUT and "Traceback" in r.stderr, (sub, r.returncode, r.stderr)
        assert r.stderr.splitlines()[-1].startswith("hpcrun: error: ") and "no-such.img" in r.stderr, r.stderr
    r = subprocess.run([hpcrun_bin, "install-entry", "--debug", "--bin", missing], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == errors.NOINPUT and "no such directory" in r.stderr, r.stderr
