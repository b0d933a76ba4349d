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

from hpcrun import errors, fdio, imagefile

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


def enforce(img, cfg, payload_checked_later=False, cache_dir_fd=None):
    """The site's policy (require_signature = yes), once per node and image
    (the keeper): an image with no signature from an allowed, valid key is
    refused (77) before anything is mounted.  hpcrun images are checked
    against allowed_signers, SIF files against sif_keyring (sifsign.py).
    payload_checked_later: the payload will be staged, and staging checks it
    against the same header sha256 (65 on a mismatch) before it is mounted.
    cache_dir_fd: the run directory, where an acceptance is remembered for
    this file identity and trust file (docs/sign.md, "The verified-identity
    cache"), so another keeper for the same image skips the hash.  Returns
    the results (at least one accepted)."""
    allowed = cfg.get("allowed_signers")
    keyring = cfg.get("sif_keyring")
    if not allowed and not keyring:
        raise errors.Error(errors.CONFIG, "require_signature = yes needs allowed_signers = FILE (hpcrun images) "
                           "or sif_keyring = FILE (SIF files) in the config")
    if img["kind"] == "sif" and keyring:
        from hpcrun import sifsign
        keys = sifsign.read_keyring(keyring, site=True)
        trust = "sif_keyring:" + hashlib.sha256(keys).hexdigest()
        hit = _cached(cache_dir_fd, img, trust)
        if hit is not None:
            return hit
        results, primary = sifsign.verify(img["path"], keyring, site=True, expect_ident=img["ident"], keys=keys)
        good = sifsign.accepted(img["path"], results, primary)
        _remember(cache_dir_fd, img, trust, good)
        return good
    if img["kind"] != "hpcrun":
        raise errors.Error(errors.NOPERM, "this site requires signed images; a %s image carries no hpcrun "
                           "signature (hpcrun build it, then hpcrun sign)%s" % (
                               img["kind"], "; SIF signatures are not accepted here (no sif_keyring)"
                               if img["kind"] == "sif" else ""), img["path"])
    if not allowed:
        raise errors.Error(errors.NOPERM, "this site accepts only SIF files signed by a key in its sif_keyring "
                           "(no allowed_signers for hpcrun images)", img["path"])
    check_allowed_signers(allowed, site=True)
    trust = "allowed_signers:" + _file_digest(allowed)
    hit = _cached(cache_dir_fd, img, trust)
    if hit is not None:
        return hit
    _, results = verify_image(img["path"], allowed, img["ident"], check_payload=not payload_checked_later)
    if not results:
        raise errors.Error(errors.NOPERM, "this site requires signed images; this one is not signed "
                           "(hpcrun sign)", img["path"])
    if any(r.principal for r in results):
        # Remembered only after a full read of the payload, and only if the
        # file ssh-keygen read is the one digested (it may change meanwhile).
        if not payload_checked_later and _file_digest(allowed) == trust.split(":", 1)[1]:
            _remember(cache_dir_fd, img, trust, [r for r in results if r.principal])
        return results
    if not any(r.matches for r in results):
        raise errors.Error(errors.DATA, results[0].reason, img["path"])
    raise errors.Error(errors.NOPERM, "no accepted signature: " + "; ".join(
        "%s %s (%s): %s" % (r.sig.key_type, r.sig.fingerprint, r.sig.claimed or "no name", r.reason)
        for r in results if r.matches), img["path"])


# ------------------------------------------------ verified-identity cache ---
#
# run_dir/verified/<sha256 of format, image identity, trust file digest>: a
# JSON record {"format", "ident", "trust", "checked_at", "signers"} written
# atomically (temporary name, rename), 0600 in a 0700 directory of the user's.
# Trusted only when every field matches and it is younger than CACHE_TTL (a
# key whose valid-before date passes, or whose gpg key expires, is refused
# again within that time).  It is the user's own file: it binds hpcrun, not
# the user (docs/security.md, "Signed images").

CACHE_DIR = "verified"
CACHE_FORMAT = "hpcrun-verified 1"
CACHE_TTL = 3600
CACHE_SCAN_MAX = 1000


class Cached:
    """An acceptance remembered from an earlier keeper."""
    __slots__ = ("principal",)

    def __init__(self, principal):
        self.principal = principal


def _file_digest(path):
    data = fdio.read_regular(path)          # never blocks on a FIFO
    if data is None:
        raise errors.Error(errors.CONFIG, "allowed_signers is not a regular file of at most 16 MiB", path)
    return hashlib.sha256(data).hexdigest()


def _cache_name(img, trust):
    return hashlib.sha256(("%s\0%s\0%s" % (CACHE_FORMAT, img["ident"], trust)).encode()).hexdigest()


def _cache_dir(dir_fd, create):
    """The cache directory's fd, or None when there is none we can trust."""
    if dir_fd is None:
        return None
    if create:
        try:
            os.mkdir(CACHE_DIR, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            pass
        except OSError:
            return None
    try:
        fd = os.open(CACHE_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        return None
    return fd


def _cached(dir_fd, img, trust):
    """The remembered acceptance of this image identity and trust file, or None."""
    import json
    import stat
    import time
    cache = _cache_dir(dir_fd, create=False)
    if cache is None:
        return None
    try:
        fd = os.open(_cache_name(img, trust), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=cache)
    except OSError:
        return None
    finally:
        os.close(cache)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size > 65536:
            return None
        rec = json.loads(os.read(fd, 65536).decode("utf-8"))
        age = time.time() - rec["checked_at"]
        if (rec.get("format") != CACHE_FORMAT or rec.get("ident") != img["ident"] or rec.get("trust") != trust
                or not 0 <= age < CACHE_TTL or not rec.get("signers")):
            return None
        signers = [str(s) for s in rec["signers"]]
    except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)
    # The identity the launch planned with must still be the file's (as
    # verify_image checks through its descriptor).
    try:
        now = imagefile.identity(img["kind"], os.stat(img["path"]))
    except OSError as e:
        raise errors.Error(errors.NOINPUT, "image not readable: %s" % e.strerror, img["path"])
    if now != img["ident"]:
        raise errors.Error(errors.DATA, "image changed while its container was being started", img["path"])
    return [Cached(s) for s in signers]


def _remember(dir_fd, img, trust, accepted):
    """Record an acceptance; a cache that cannot be written is no error."""
    import json
    import time
    cache = _cache_dir(dir_fd, create=True)
    if cache is None:
        return
    name = _cache_name(img, trust)
    tmp = "%s.%d.tmp" % (name, os.getpid())
    rec = {"format": CACHE_FORMAT, "ident": img["ident"], "trust": trust, "checked_at": time.time(),
           "signers": [r.principal for r in accepted]}
    try:
        _prune(cache, rec["checked_at"])
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=cache)
        try:
            os.write(fd, json.dumps(rec, sort_keys=True).encode())
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=cache, dst_dir_fd=cache)
    except OSError:
        fdio.remove(cache, tmp)
    finally:
        os.close(cache)


def _prune(cache, now):
    """Remove records past their time (and leftovers of an interrupted write)."""
    for i, name in enumerate(os.listdir(cache)):
        if i >= CACHE_SCAN_MAX:
            break
        try:
            st = os.stat(name, dir_fd=cache, follow_symlinks=False)
        except OSError:
            continue
        if now - st.st_mtime >= CACHE_TTL or (name.endswith(".tmp") and now - st.st_mtime > 60):
            fdio.remove(cache, name)
