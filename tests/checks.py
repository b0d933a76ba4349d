"""Checks the test files share: the error contract, and waiting on the node's keepers."""
import os
import time


def keepers_of(fragment):
    """PIDs of hpcrun keepers whose command line holds `fragment` (an image path, a key)."""
    out = []
    for name in os.listdir("/proc"):
        try:
            with open("/proc/%s/comm" % name) as f:
                if f.read().strip() != "hpcrun-keeper":
                    continue
            with open("/proc/%s/cmdline" % name, "rb") as f:
                if fragment.encode() in f.read():
                    out.append(int(name))
        except OSError:
            continue
    return out


def eventually(pred, timeout=30.0, step=0.05):
    """True once pred() holds; False if it still does not after `timeout` seconds.
    (A refusing keeper reports first, then removes what it made and exits.)"""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def assert_one_error(r, code, *fragments):
    """The error contract: one stderr line `hpcrun: error: ...`, the code, no traceback."""
    lines = r.stderr.splitlines()
    assert r.returncode == code, "expected %d, got %d: %r" % (code, r.returncode, r.stderr)
    assert len(lines) == 1, "expected one stderr line: %r" % r.stderr
    assert lines[0].startswith("hpcrun: error: "), lines[0]
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
