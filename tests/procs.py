"""Waiting on the node's keepers from a test: find them, and poll for a state."""
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
