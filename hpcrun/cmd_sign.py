"""hpcrun sign IMAGE [-k KEY]: add an OpenSSH signature to an hpcrun image.

The payload is read first and must match its header's sha256 (a signature
vouches for that digest); then ssh-keygen signs the header and metadata
(signature.message) and the signature is appended after the payload, under
an exclusive flock of the image.  An interrupted append is cut off again.
"""
import argparse
import fcntl
import os
import sys

from hpcrun import errors, imagefile, signature

DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_ed25519_sk", "id_ecdsa_sk", "id_rsa")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise errors.Error(errors.USAGE, message, self.prog)


def default_key():
    home = os.path.expanduser("~/.ssh")
    for name in DEFAULT_KEYS:
        if os.path.exists(os.path.join(home, name)):
            return os.path.join(home, name)
    raise errors.Error(errors.NOINPUT, "no ssh key found in ~/.ssh (give one with -k KEY, or ssh-keygen -t ed25519)")


def _claimed_name(key):
    """The key's comment (user@host) from KEY.pub, shown as the claimed signer."""
    pub = key if key.endswith(".pub") else key + ".pub"
    try:
        with open(pub, "rb") as f:
            fields = f.read(16384).split(None, 2)
    except OSError:
        return ""
    name = fields[2].strip() if len(fields) == 3 else b""
    # what read_signatures accepts back: no control bytes, no U+2028/U+0085 line breaks
    ok = imagefile._printable(name) and name.decode("utf-8").isprintable()
    return name.decode("utf-8")[:200] if ok else ""


def main(argv):
    p = Parser(prog="hpcrun sign", description="Sign an hpcrun image with an OpenSSH key (docs/sign.md).")
    p.add_argument("-k", "--key", metavar="KEY",
                   help="private key (or its .pub, with the key in ssh-agent); default ~/.ssh/id_ed25519, ...")
    p.add_argument("image", metavar="IMAGE")
    args = p.parse_args(argv)
    key = args.key or default_key()
    if not os.path.exists(key):
        raise errors.Error(errors.NOINPUT, "key not found", key)
    path = args.image
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise errors.Error(errors.NOINPUT, "image not found", path)
    except IsADirectoryError:
        raise errors.Error(errors.DATA, "only hpcrun image files can be signed, not a directory", path)
    except OSError as e:
        raise errors.Error(errors.CANTCREATE, "cannot write the signature into the image: %s" % e.strerror, path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        if not imagefile.is_hpcrun_image(os.pread(fd, 256, 0)):
            raise errors.Error(errors.DATA, "only hpcrun images can be signed (hpcrun build makes one)", path)
        h = imagefile.read_header(path, fd, st.st_size)
        imagefile.check_meta(path, h)
        sigs = signature.read_signatures(path, fd, h, st.st_size)
        signature.payload_digest(path, fd, h)
        rc, out, err = signature._keygen(["sign", "-f", key, "-n", signature.NAMESPACE], signature.message(h))
        if rc != 0:
            reason = [ln for ln in err.splitlines() if ln and not ln.startswith("Signing data")]
            raise errors.Error(errors.NOINPUT, "ssh-keygen could not sign: %s" % (reason[-1] if reason else rc), key)
        armored = out.encode()
        key_type, fingerprint = signature._signing_key(path, armored)
        name = _claimed_name(key)
        if any(s.fingerprint == fingerprint for s in sigs):
            print("%s: already signed by %s %s" % (path, key_type, fingerprint))
            return 0
        block = signature.BLOCK_TAG + b"%d %s\n" % (len(armored), name.encode()) + armored
        if os.fstat(fd).st_size != st.st_size:
            raise errors.Error(errors.DATA, "image changed while it was being signed", path)
        try:
            os.pwrite(fd, block, st.st_size)
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, st.st_size)
            raise
    finally:
        os.close(fd)
    sys.stdout.write("%s: signed by %s %s%s\n" % (path, key_type, fingerprint, " (%s)" % name if name else ""))
    return 0
