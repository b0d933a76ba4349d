"""OpenSSH signatures of hpcrun images (docs/sign.md).

What is signed is the image's identity, not its bytes: the fixed header line
(version, payload offset, size and sha256) and the metadata line, prefixed by
MESSAGE_TAG.  A signature is therefore only as good as the payload's match with
its header's sha256, so verification always reads the whole payload.

Signatures live in a trailer after the payload, where no header rule looks
(the header only requires the payload to lie inside the file), so signing
appends and never moves or changes the payload::

    <header page(s)> <payload> HPCRUN-SIGNATURE <n> <claimed signer>\\n <n bytes: ssh-keygen -Y sign output> ...

All cryptography is ssh-keygen's (`-Y sign`, `-Y find-principals`, `-Y verify`,
`-Y check-novalidate`, namespace NAMESPACE) against an `allowed_signers` file
(ssh-keygen(1), ALLOWED SIGNERS), whose `valid-before`/`valid-after` options
retire keys.  The key and fingerprint shown before verification are parsed
from the signature blob: they say which key signed, not that the key is
trusted.  Not on the launch path: the keeper imports this only when the site
requires signatures.
"""
import base64
import hashlib
import os
import shutil
import subprocess
import tempfile

from hpcrun import errors, imagefile

NAMESPACE = "hpcrun-image"
MESSAGE_TAG = b"hpcrun-image-signature 1\n"
BLOCK_TAG = b"HPCRUN-SIGNATURE "
TRAILER_MAX = 1 << 20      # bytes of signatures after the payload
SIGNATURES_MAX = 64
_ARMOR_BEGIN = b"-----BEGIN SSH SIGNATURE-----\n"
_ARMOR_END = b"-----END SSH SIGNATURE-----\n"


class Signature:
    __slots__ = ("armored", "claimed", "key_type", "fingerprint")

    def describe(self):
        return {"kind": "ssh", "signer_claimed": self.claimed, "key_type": self.key_type,
                "fingerprint": self.fingerprint}


def message(h):
    """The bytes signed for header h (imagefile.Header)."""
    fixed = b"%s %d %d %d %s\n" % (imagefile.MAGIC, h.version, h.offset, h.size, h.sha256.encode())
    return MESSAGE_TAG + fixed + h.meta_raw + b"\n"


def read_signatures(path, fd, h, file_size):
    """The trailer's signatures, in file order; a malformed trailer is 65."""
    start = h.offset + h.size
    if file_size - start > TRAILER_MAX:
        raise errors.Error(errors.DATA, "corrupt image: %d bytes after the payload (signatures take at most %d)"
                           % (file_size - start, TRAILER_MAX), path)
    raw = os.pread(fd, file_size - start, start)
    sigs = []
    pos = 0
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        line = raw[pos:nl] if nl >= 0 else b""
        if not line.startswith(BLOCK_TAG) or len(sigs) >= SIGNATURES_MAX:
            raise errors.Error(errors.DATA, "corrupt image: unexpected data after the payload at byte %d"
                               % (start + pos), path)
        size_field, _, claimed = line[len(BLOCK_TAG):].partition(b" ")
        try:
            n = imagefile._number(size_field)
        except ValueError:
            n = -1
        armored = raw[nl + 1:nl + 1 + n] if n > 0 else b""
        if (len(armored) != n or not armored.startswith(_ARMOR_BEGIN) or not armored.endswith(_ARMOR_END)
                or not imagefile._printable(claimed) or not claimed.decode("utf-8").isprintable()):
            raise errors.Error(errors.DATA, "corrupt image: bad signature block at byte %d" % (start + pos), path)
        sig = Signature()
        sig.armored = armored
        sig.claimed = claimed.decode("utf-8")
        sig.key_type, sig.fingerprint = _signing_key(path, armored)
        sigs.append(sig)
        pos = nl + 1 + n
    return sigs


def _signing_key(path, armored):
    """(key type, SHA256 fingerprint) of the key in an SSHSIG blob
    (PROTOCOL.sshsig: "SSHSIG", u32 version, string publickey, string
    namespace, ...).  Parsing only: ssh-keygen checks the signature."""
    try:
        blob = base64.b64decode(b"".join(armored.splitlines()[1:-1]), validate=True)
        if blob[:6] != b"SSHSIG":
            raise ValueError
        pos = 10
        fields = []
        for _ in range(2):
            n = int.from_bytes(blob[pos:pos + 4], "big")
            if pos + 4 + n > len(blob):
                raise ValueError
            fields.append(blob[pos + 4:pos + 4 + n])
            pos += 4 + n
        key, namespace = fields
        key_type = key[4:4 + int.from_bytes(key[:4], "big")].decode("ascii")
        if not key_type.isprintable() or " " in key_type:   # shown to users: no forged lines or escapes
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise errors.Error(errors.DATA, "corrupt image: a signature block is not an SSH signature", path)
    if namespace != NAMESPACE.encode():
        raise errors.Error(errors.DATA, "corrupt image: a signature is for namespace %r, not %s"
                           % (namespace.decode("ascii", "replace"), NAMESPACE), path)
    fp = base64.b64encode(hashlib.sha256(key).digest()).rstrip(b"=").decode("ascii")
    return key_type, "SHA256:" + fp


def payload_digest(path, fd, h):
    """Read the payload (the point of verifying) and check it against the header."""
    digest = hashlib.sha256()
    pos, end = h.offset, h.offset + h.size
    while pos < end:
        chunk = os.pread(fd, min(1 << 20, end - pos), pos)
        if not chunk:
            raise errors.Error(errors.DATA, "truncated image: payload ends early", path)
        digest.update(chunk)
        pos += len(chunk)
    imagefile.check_digest(path, h.sha256, digest.hexdigest())


def ssh_keygen():
    exe = shutil.which("ssh-keygen") or ("/usr/bin/ssh-keygen" if os.path.exists("/usr/bin/ssh-keygen") else None)
    if not exe:
        raise errors.Error(errors.UNAVAILABLE, "ssh-keygen is not installed (image signatures are OpenSSH "
                           "signatures)", "apt-get install openssh-client")
    return exe


def _keygen(args, stdin=b""):
    p = subprocess.run([ssh_keygen(), "-Y"] + args, input=stdin, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, close_fds=True)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


class Result:
    """One signature's verdict: good (principal set) or why not."""
    __slots__ = ("sig", "principal", "reason", "matches")

    def describe(self):
        d = self.sig.describe()
        d.update(verified=self.principal is not None, principal=self.principal, reason=self.reason)
        return d


def check_signatures(sigs, msg, allowed_signers):
    """Each signature checked against allowed_signers by ssh-keygen."""
    results = []
    tmp = tempfile.mkdtemp(prefix="hpcrun-verify-")
    try:
        for i, sig in enumerate(sigs):
            r = Result()
            r.sig, r.principal, r.reason, r.matches = sig, None, None, True
            sig_path = os.path.join(tmp, "%d.sig" % i)
            with open(sig_path, "wb") as f:
                f.write(sig.armored)
            rc, out, err = _keygen(["find-principals", "-s", sig_path, "-f", allowed_signers])
            principals = [p for p in out.splitlines() if p] if rc == 0 else []
            for principal in principals:
                rc, _, err2 = _keygen(["verify", "-f", allowed_signers, "-I", principal, "-n", NAMESPACE,
                                       "-s", sig_path], msg)
                if rc == 0:
                    r.principal = principal
                    break
            if r.principal is None:
                rc, _, _ = _keygen(["check-novalidate", "-n", NAMESPACE, "-s", sig_path], msg)
                if rc != 0:
                    r.matches = False
                    r.reason = "signature does not match the image's header (changed after signing)"
                elif principals:
                    r.reason = "signature not accepted for %s" % ", ".join(principals)
                else:
                    r.reason = _why_not_allowed(err)
            results.append(r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def _why_not_allowed(err):
    """ssh-keygen's reason (an expired or not yet valid key names itself on
    stderr), else: the key is not in the file."""
    for line in err.splitlines():
        if "expired" in line or "not yet valid" in line:
            return "key no longer valid in allowed_signers: " + line.split(": ", 1)[-1]
    return "key not in allowed_signers"


def verify_image(path, allowed_signers, expect_ident=None, check_payload=True):
    """Verify the image at path: header, payload digest (unless the caller
    checks it later, as staging does), then signatures.  Returns (header,
    results).  Raises 65 for a corrupt or changed image."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if expect_ident is not None and imagefile.identity("hpcrun", st) != expect_ident:
            raise errors.Error(errors.DATA, "image changed while its container was being started", path)
        h = imagefile.read_header(path, fd, st.st_size)
        sigs = read_signatures(path, fd, h, st.st_size)
        if check_payload:
            payload_digest(path, fd, h)
        results = check_signatures(sigs, message(h), allowed_signers) if sigs else []
        return h, results
    finally:
        os.close(fd)


def check_allowed_signers(path, site):
    """The allowed_signers file: present, and (for the site's policy) not one
    the user could add a key to."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise errors.Error(errors.CONFIG if site else errors.NOINPUT,
                           "allowed_signers file not readable: %s" % e.strerror, path)
    if site and (st.st_uid != 0 or st.st_mode & 0o022):
        raise errors.Error(errors.CONFIG, "allowed_signers must be owned by root and not group or world "
                           "writable (a user could add a key)", path)


def enforce(img, cfg, payload_checked_later=False):
    """The site's policy (require_signature = yes), once per node and image
    (the keeper): an image with no signature from an allowed, valid key is
    refused (77) before anything is mounted.  payload_checked_later: the
    payload will be staged, and staging checks it against the same header
    sha256 (65 on a mismatch) before it is mounted.  Returns the results
    (at least one accepted)."""
    allowed = cfg.get("allowed_signers")
    if not allowed:
        raise errors.Error(errors.CONFIG, "require_signature = yes needs allowed_signers = FILE in the config")
    check_allowed_signers(allowed, site=True)
    if img["kind"] != "hpcrun":
        raise errors.Error(errors.NOPERM, "this site requires signed images; a %s image carries no hpcrun "
                           "signature (hpcrun build it, then hpcrun sign)" % img["kind"], img["path"])
    _, results = verify_image(img["path"], allowed, img["ident"], check_payload=not payload_checked_later)
    if not results:
        raise errors.Error(errors.NOPERM, "this site requires signed images; this one is not signed "
                           "(hpcrun sign)", img["path"])
    if any(r.principal for r in results):
        return results
    if not any(r.matches for r in results):
        raise errors.Error(errors.DATA, results[0].reason, img["path"])
    raise errors.Error(errors.NOPERM, "no accepted signature: " + "; ".join(
        "%s %s (%s): %s" % (r.sig.key_type, r.sig.fingerprint, r.sig.claimed or "no name", r.reason)
        for r in results if r.matches), img["path"])
