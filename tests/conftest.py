"""Shared fixtures: the installed hpcrun, a real unprivileged user, real images.

Images are built once per session in a world-readable directory so the
unprivileged test user can use them too (pytest's tmp_path is root-only).
That directory is a file system of its own (a tmpfs mounted for the session),
as images on a cluster lie on shared storage, never on the file system of the
node-local /tmp where run directories and staged copies live.
"""
import os
import pwd
import shutil
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import imagetools  # noqa: E402

TEST_USER = "hpcrun-test"

# The suite tests hpcrun as users get it: installed from the wheel into the venv
# (make test), never the source tree beside these tests.
import hpcrun  # noqa: E402
if not os.environ.get("HPCRUN_TEST_SOURCE_TREE") and not hpcrun.__file__.startswith(sys.prefix + os.sep):
    raise SystemExit("tests: hpcrun imported from %s, not from the venv's installed wheel (%s); "
                     "run `make test`" % (hpcrun.__file__, sys.prefix))


@pytest.fixture(scope="session")
def hpcrun_bin():
    path = os.path.join(os.path.dirname(sys.executable), "hpcrun")
    assert os.access(path, os.X_OK), "hpcrun console script missing: run make venv"
    return path


@pytest.fixture(scope="session")
def shared_dir():
    """A world-readable scratch directory for the whole session, on its own
    file system (root only: as a user, a plain directory in /tmp).  Setuid
    and exec are honoured there, as on the host file systems tests compare
    with.  Unmounted at the end, lazily: a lingering container may still
    hold an image open."""
    d = tempfile.mkdtemp(prefix="hpcrun-tests-")
    mounted = os.getuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "mode=0755,size=8g", "hpcrun-test-images", d]).returncode == 0
    if mounted:
        subprocess.run(["mount", "--make-private", d], check=True)
        assert os.stat(d).st_dev != os.stat(os.path.dirname(d)).st_dev
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", d], check=True)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def test_user():
    """A real unprivileged user (created when running as root)."""
    if os.getuid() != 0:
        return pwd.getpwuid(os.getuid())
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", TEST_USER], check=True)
        return pwd.getpwnam(TEST_USER)


def user_cmd(user, argv):
    """argv run as `user` (no-op when we are that user already)."""
    if os.getuid() == user.pw_uid:
        return list(argv)
    return ["setpriv", "--reuid=%d" % user.pw_uid, "--regid=%d" % user.pw_gid, "--init-groups",
            "--reset-env", "--"] + list(argv)


@pytest.fixture(scope="session")
def as_user(test_user):
    """run(argv, **kw) as the unprivileged user, from its home, with a sane env."""
    def run(argv, env=None, cwd=None, prefix=(), **kw):
        e = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": test_user.pw_dir,
             "USER": test_user.pw_name, "LOGNAME": test_user.pw_name, "LANG": "C.UTF-8"}
        e.update(env or {})
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 120)
        argv = user_cmd(test_user, ["env"] + ["%s=%s" % kv for kv in e.items()] + list(argv))
        return subprocess.run(list(prefix) + argv, cwd=cwd or test_user.pw_dir, **kw)
    return run


@pytest.fixture(scope="session")
def site_config(shared_dir):
    """site_config(text) -> an argv prefix that runs a command as if the site's
    /etc/hpcrun/hpcrun.conf held `text` (and returns the file's path as
    .path on the list, to change it later).

    A user's HPCRUN_CONF can only add restrictions (docs/config.md), so site
    settings for the unprivileged test user (site policy, GPU or MPI wiring)
    must come from the site's own file.  The command runs in a private mount
    namespace where an overlay on /etc holds hpcrun/hpcrun.conf: nothing on
    the host's /etc changes, and no other launch sees it."""
    if os.getuid() != 0:
        pytest.skip("needs root to stand in for the site's /etc/hpcrun")

    class Prefix(list):
        path = None

    def make(text):
        base = tempfile.mkdtemp(prefix="site-", dir=shared_dir)
        os.makedirs(os.path.join(base, "upper", "hpcrun"))
        os.mkdir(os.path.join(base, "work"))
        prefix = Prefix(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                         'mount -t overlay hpcrun-site -o "lowerdir=/etc,upperdir=$0/upper,workdir=$0/work" /etc'
                         ' && exec "$@"', base])
        prefix.path = os.path.join(base, "upper", "hpcrun", "hpcrun.conf")
        with open(prefix.path, "w") as f:
            f.write(text)
        os.chmod(prefix.path, 0o644)
        return prefix
    return make


@pytest.fixture(scope="session")
def busybox_root(shared_dir):
    root = os.path.join(shared_dir, "busybox-root")
    imagetools.make_busybox_root(root, runscript=["/bin/echo", "runscript says"],
                                 env=[("IMAGE_VAR", "from-image"), ("PATH", "/bin:/usr/bin")])
    return root


@pytest.fixture(scope="session")
def busybox_image(shared_dir, busybox_root):
    """An hpcrun single-file image of the busybox root (chmod 755)."""
    return imagetools.make_image(busybox_root, os.path.join(shared_dir, "busybox.img"))


@pytest.fixture(scope="session")
def busybox_squashfs(shared_dir, busybox_root):
    return imagetools.mksquashfs(busybox_root, os.path.join(shared_dir, "busybox.sqfs"))
