"""pytest fixtures shared by tests/test_pbs_*.py (imported with `from ... import *`)."""
import os
import shlex
import shutil
import subprocess
import tempfile

import pytest

from . import harness, mom, server

__all__ = ["pub_dir", "pbs_server", "pbs_mom", "write_file", "make_sif_stub", "install_hooks",
           "submit_job"]


@pytest.fixture
def pub_dir(shared_dir):
    """A fresh world-traversable directory (the test user must reach files in it)."""
    d = tempfile.mkdtemp(prefix="pbs-", dir=shared_dir)
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def write_file(path, data=b"", mode=0o644, owner=None):
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, *owner)
    return path


def make_sif_stub(path):
    """Just the SIF signature at byte 32: the hook's check is the cheap one."""
    return write_file(path, b"#!/usr/bin/env run-singularity\n\0" + b"SIF_MAGIC\0" + b"\0" * 200)


def install_hooks(srv, config=None, cwd=None):
    """Feed install.sh's printed qmgr commands to the emulated server."""
    script = os.path.join(harness.REPO, "plugins", "pbs", "install.sh")
    args = [script] + (["--config", config] if config else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=cwd).stdout
    for line in out.splitlines():
        words = shlex.split(line)
        assert words[:2] == ["qmgr", "-c"], line
        rc, msg = srv.qmgr(words[2])
        assert rc == 0, (line, msg)
    return out


@pytest.fixture
def pbs_server():
    return server.Server()


@pytest.fixture
def pbs_mom(pbs_server):
    m = mom.Mom(pbs_server)
    yield m
    for jobid in list(pbs_server.jobs):
        m.cleanup(jobid)
    m.close()


def submit_job(srv, script, user, cwd, args=(), env=None):
    e = {"PATH": "/usr/bin:/bin", "HOME": user.pw_dir, "LANG": "C.UTF-8"}
    e.update(env or {})
    return srv.qsub(script, args=args, user=user, cwd=cwd, env=e)
