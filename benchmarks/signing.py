#!/usr/bin/env python3
"""What the signature policy costs (require_signature = yes, docs/sign.md).

For an image with MB of incompressible payload, page cache warm, signed with
a fresh ed25519 key:
  payload sha256        the full read verification makes (signature.payload_digest)
  ssh-keygen checks     find-principals + verify of one signature (signature.check_signatures)
  verify_image          both, what the keeper does once per node and image
and launches as root (kernel mount, in place) with HPCRUN_CONF:
  cold, policy off      `hpcrun IMG true`, no container on the node
  cold, policy on       the same with require_signature = yes: the keeper verifies first
  join, policy on       a rank joining a running container: no verification
  staged, policy off/on mount_strategy = fuse (Debian's squashfuse: the payload is staged once per
                        node and hashed while copied), so the keeper skips its own read; the copy
                        in run_dir/stage/ is kept across launches (docs/staging.md)

    python3 benchmarks/signing.py [--mb 200] [--dir /tmp] [--rounds 5]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import imagetools  # noqa: E402
from checks import keepers_of  # noqa: E402
from hpcrun import imagefile, signature  # noqa: E402


def timed(fn, rounds):
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out), min(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    hpcrun = shutil.which("hpcrun") or os.path.join(os.path.dirname(sys.executable), "hpcrun")
    d = tempfile.mkdtemp(prefix="hpcrun-bench-sign-", dir=a.dir)
    try:
        root = os.path.join(d, "root")
        imagetools.make_busybox_root(root)
        with open(os.path.join(root, "big"), "wb") as f:
            for _ in range(a.mb):
                f.write(os.urandom(1 << 20))
        img = imagetools.make_image(root, os.path.join(d, "big.img"))
        shutil.rmtree(root)
        key = os.path.join(d, "key")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench@site", "-f", key], check=True)
        subprocess.run([hpcrun, "sign", "-k", key, img], check=True, stdout=subprocess.DEVNULL)
        allowed = os.path.join(d, "allowed_signers")
        with open(key + ".pub") as f:
            open(allowed, "w").write("bench@site " + f.read())
        conf_on, conf_off = os.path.join(d, "on.conf"), os.path.join(d, "off.conf")
        open(conf_on, "w").write("require_signature = yes\nallowed_signers = %s\nlinger = 0\n" % allowed)
        open(conf_off, "w").write("linger = 0\n")
        staged_on, staged_off = os.path.join(d, "son.conf"), os.path.join(d, "soff.conf")
        open(staged_on, "w").write(open(conf_on).read() + "mount_strategy = fuse\n")
        open(staged_off, "w").write("linger = 0\nmount_strategy = fuse\n")

        fd = os.open(img, os.O_RDONLY)
        size = os.fstat(fd).st_size
        h = imagefile.read_header(img, fd, size)
        sigs = signature.read_signatures(img, fd, h, size)
        msg = signature.message(h)
        print("image: %d MiB payload, 1 ed25519 signature; median (min) of %d" % (h.size >> 20, a.rounds))
        rows = [("payload sha256", lambda: signature.payload_digest(img, fd, h)),
                ("ssh-keygen checks", lambda: signature.check_signatures(sigs, msg, allowed)),
                ("verify_image", lambda: signature.verify_image(img, allowed))]

        def launch(conf, *argv):
            r = subprocess.run([hpcrun, img] + list(argv), env=dict(os.environ, HPCRUN_CONF=conf),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if r.returncode:
                raise SystemExit("launch failed: %s" % r.stderr.decode())

        def wait_gone():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and keepers_of(img):
                time.sleep(0.05)

        def cold(conf):
            wait_gone()
            launch(conf, "true")

        rows += [("cold launch, policy off", lambda: cold(conf_off)),
                 ("cold launch, policy on", lambda: cold(conf_on)),
                 ("staged, policy off", lambda: cold(staged_off)),
                 ("staged, policy on", lambda: cold(staged_on))]
        for name, fn in rows:
            med, low = timed(fn, a.rounds)
            print("  %-24s %8.1f ms (%.1f)" % (name, med * 1e3, low * 1e3))
        wait_gone()
        holder = subprocess.Popen([hpcrun, img, "sleep", "60"], env=dict(os.environ, HPCRUN_CONF=conf_on))
        time.sleep(1.5)
        med, low = timed(lambda: launch(conf_on, "true"), a.rounds)
        print("  %-24s %8.1f ms (%.1f)" % ("join, policy on", med * 1e3, low * 1e3))
        holder.kill()
        holder.wait()
        wait_gone()
        os.close(fd)
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
