#!/usr/bin/env python3
"""What staging a payload costs: the copy alone, and the copy with the sha256 check.

An unprivileged launch of an hpcrun image copies its payload once per node
into run_dir/stage/ (Debian's squashfuse has no offset option) and checks the
header's sha256 on the bytes it writes (docs/staging.md).  This measures, for
an image with MB of incompressible payload, page cache warm:
  copy_file_range      the in-kernel copy staging used before the check (same file system only)
  read+write           the same copy through a buffer, no hash
  read+hash+write      the same, hashing each block before writing it
  hash only            sha256 of the payload, no copy
  stage._copy_payload  what a keeper does (read+hash+write, stage.COPY_BLOCK blocks)
and, with --launch, cold launches (`hpcrun IMG true`, no container on the node)
as the given user, so the copy's share of a launch shows.

    python3 benchmarks/staging.py [--mb 400] [--dir /tmp] [--rounds 5] [--launch --user hpcrun-test]
        [--hpcrun PATH]     (another hpcrun to launch with, e.g. an older checkout's, for before/after)
"""
import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import imagetools  # noqa: E402
from hpcrun import image as image_mod, stage  # noqa: E402


def make_big_image(d, mb):
    root = os.path.join(d, "root")
    imagetools.make_busybox_root(root)
    with open(os.path.join(root, "big"), "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    img = imagetools.make_image(root, os.path.join(d, "big.img"))
    subprocess.run(["rm", "-rf", root], check=True)
    return img


def copy_file_range(img, out):
    with open(img["path"], "rb") as src, open(out, "wb") as dst:
        left, off = img["size"], img["offset"]
        while left:
            n = os.copy_file_range(src.fileno(), dst.fileno(), min(left, 1 << 30), off)
            left -= n
            off += n


def read_write(img, out, hash_too):
    h = hashlib.sha256()
    buf = bytearray(stage.COPY_BLOCK)
    view = memoryview(buf)
    with open(img["path"], "rb", buffering=0) as src, open(out, "wb", buffering=0) as dst:
        src.seek(img["offset"])
        left = img["size"]
        while left:
            n = src.readinto(view[:min(left, len(buf))])
            if hash_too:
                h.update(view[:n])
            dst.write(view[:n])
            left -= n


def hash_only(img, out):
    h = hashlib.sha256()
    buf = bytearray(stage.COPY_BLOCK)
    view = memoryview(buf)
    with open(img["path"], "rb", buffering=0) as src:
        src.seek(img["offset"])
        left = img["size"]
        while left:
            n = src.readinto(view[:min(left, len(buf))])
            h.update(view[:n])
            left -= n


def staged(img, out):
    d = os.open(os.path.dirname(out), os.O_RDONLY | os.O_DIRECTORY)
    try:                                # read + hash + write, as a keeper does
        stage._copy_payload(img, d, os.path.basename(out)[:-len(".sqfs")], out)
    finally:
        os.close(d)


def median_ms(fn, img, out, rounds):
    times = []
    for _ in range(rounds):
        if os.path.exists(out):
            os.unlink(out)
        os.sync()                       # no earlier round's dirty pages in this one's writeback
        t = time.perf_counter()
        fn(img, out)
        times.append((time.perf_counter() - t) * 1e3)
    os.unlink(out) if os.path.exists(out) else None
    return statistics.median(times), min(times)


def cold_launches(hpcrun, path, user, rounds):
    argv = [hpcrun, path, "true"]
    if user:
        import pwd
        pw = pwd.getpwnam(user)
        argv = ["setpriv", "--reuid=%d" % pw.pw_uid, "--regid=%d" % pw.pw_gid, "--init-groups", "--"] + argv
    env = dict(os.environ, HPCRUN_LINGER="0")
    times = []
    for _ in range(rounds):
        time.sleep(1.5)                 # the previous container is gone (linger 0 + the keeper's poll)
        os.sync()
        t = time.perf_counter()
        subprocess.run(argv, env=env, check=True, cwd="/")
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=400)
    p.add_argument("--dir", default="/tmp", help="where the image and the copies go")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--launch", action="store_true")
    p.add_argument("--user")
    p.add_argument("--hpcrun", default=os.path.join(os.path.dirname(sys.executable), "hpcrun"))
    a = p.parse_args()
    d = tempfile.mkdtemp(prefix="hpcrun-bench-staging-", dir=a.dir)
    os.chmod(d, 0o755)
    try:
        path = make_big_image(d, a.mb)
        img = image_mod.open_image(path).describe()
        out = os.path.join(d, "staged.sqfs")
        print("payload %.0f MB, page cache warm, %s" % (img["size"] / 1e6, a.dir))
        for name, fn in (("copy_file_range", copy_file_range), ("read+write", lambda i, o: read_write(i, o, False)),
                         ("read+hash+write", lambda i, o: read_write(i, o, True)), ("hash only", hash_only),
                         ("stage._copy_payload", staged)):
            med, best = median_ms(fn, img, out, a.rounds)
            print("%-20s median %6.0f ms  best %6.0f ms  (%.2f ms/MB)" % (name, med, best, med / (img["size"] / 1e6)))
        if a.launch:
            med, best = cold_launches(a.hpcrun, path, a.user, a.rounds)
            print("%-20s median %6.0f ms  best %6.0f ms  (%s)" % ("cold launch", med, best, a.user or "root"))
    finally:
        subprocess.run(["rm", "-rf", d])


if __name__ == "__main__":
    main()
