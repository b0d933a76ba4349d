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
                        (its record in run_dir/verified/ removed before each round)
  cold, policy, record  the same with the record of an earlier keeper present: no hash
                        (the verified-identity cache; docs/sign.md)
  join, policy on       a rank joining a running container: no verification
  staged, policy off/on mount_strategy = fuse (Debian's squashfuse: the payload is staged once per
                        node and hashed while copied), so the keeper skips its own read; the copy
                        in run_dir/stage/ is kept across launches (docs/staging.md)
and the same payload as the primary partition of a SIF signed with a fresh
gpg ed25519 key (tests/siftools.py), require_signature with sif_keyring:
  SIF sifsign.verify    gpgv + every digest the signature lists (the partition's included)
  SIF cold, policy ...  off, on without a record, on with one

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
import siftools  # noqa: E402
from checks import keepers_of  # noqa: E402
from hpcrun import imagefile, signature, sifsign  # noqa: E402
from hpcrun import image as images  # noqa: E402


def forget(path):
    """Remove the verified-identity record of the image at path (root's run_dir)."""
    ident = images.open_image(path).describe()["ident"]
    d = "/tmp/hpcrun-%d/verified" % os.getuid()
    for name in os.listdir(d) if os.path.isdir(d) else []:
        try:
            with open(os.path.join(d, name)) as f:
                if ident in f.read():
                    os.unlink(os.path.join(d, name))
        except OSError:
            pass


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
        home = os.path.join(d, "gnupg")
        fpr = siftools.gpg_key(home, "bench")
        keyring = siftools.export_key(home, fpr, os.path.join(d, "keys.gpg"))
        parts = [siftools.obj(siftools.DEFFILE, b"Bootstrap: scratch\n"),
                 siftools.partition(os.pread(fd, h.size, h.offset))]
        sif_img = siftools.write(os.path.join(d, "big.sif"), parts + [siftools.pgp_signature(
            siftools.clearsign(siftools.pgp_body(parts), home, fpr), fpr)])
        del parts
        sif_on = os.path.join(d, "sif-on.conf")
        open(sif_on, "w").write("require_signature = yes\nsif_keyring = %s\nlinger = 0\n" % keyring)
        sigs = signature.read_signatures(img, fd, h, size)
        msg = signature.message(h)
        print("image: %d MiB payload, 1 ed25519 signature; median (min) of %d" % (h.size >> 20, a.rounds))
        rows = [("payload sha256", lambda: signature.payload_digest(img, fd, h)),
                ("ssh-keygen checks", lambda: signature.check_signatures(sigs, msg, allowed)),
                ("verify_image", lambda: signature.verify_image(img, allowed))]

        def launch(conf, *argv, path=img):
            r = subprocess.run([hpcrun, path] + list(argv), env=dict(os.environ, HPCRUN_CONF=conf),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if r.returncode:
                raise SystemExit("launch failed: %s" % r.stderr.decode())

        def wait_gone(path=img):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and keepers_of(path):
                time.sleep(0.05)

        def cold(conf, path=img, record=None):
            wait_gone(path)
            if record is False:
                forget(path)
            launch(conf, "true", path=path)

        rows += [("cold launch, policy off", lambda: cold(conf_off)),
                 ("cold launch, policy on", lambda: cold(conf_on, record=False)),
                 ("cold, policy, record", lambda: cold(conf_on, record=True)),
                 ("staged, policy off", lambda: cold(staged_off)),
                 ("staged, policy on", lambda: cold(staged_on)),
                 ("SIF sifsign.verify", lambda: sifsign.verify(sif_img, keyring)),
                 ("SIF cold, policy off", lambda: cold(conf_off, sif_img)),
                 ("SIF cold, policy on", lambda: cold(sif_on, sif_img, record=False)),
                 ("SIF cold, policy, record", lambda: cold(sif_on, sif_img, record=True))]
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
        wait_gone(sif_img)
        forget(img)
        forget(sif_img)
        os.close(fd)
    finally:
        subprocess.run(["gpgconf", "--homedir", os.path.join(d, "gnupg"), "--kill", "gpg-agent"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
