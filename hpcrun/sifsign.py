"""Apptainer's PGP signatures of SIF files, checked with gpgv (docs/sign.md).

An Apptainer (apptainer/sif v2, pkg/integrity) PGP signature is a signature
object whose data is a clear-signed message; its descriptor links it to an
object group (or one object) and names the signing key's fingerprint in its
extra field (u32 hash type, then 20 bytes).  The signed body is JSON:

    {"version": 1, "header": {"digest": "sha256:..."},
     "objects": [{"relativeId": 0, "descriptorDigest": "sha256:...", "objectDigest": "sha256:..."}, ...]}

  header digest       over the header's launch script, magic, version and ID
  descriptorDigest    over the descriptor's data type, used, relative ID (its ID
                      minus the group's smallest ID), linked ID, size, creation
                      time, uid, gid, name and extra (little endian, as stored)
  objectDigest        over the object's bytes

Verifying (as apptainer/sif's groupVerifier does): gpgv checks the message
against the given keyring, with a temporary home that is removed after, and
hpcrun uses only the text gpgv says is signed; the key that signed must be the
one the descriptor names; the objects the message lists must be exactly the
group's; and every digest is recomputed from the file.  A signature is good
only if all of that holds, and it is accepted for running the image only if
it covers the primary system partition (a signature of the definition file
alone says nothing about what runs).  DSSE signatures are listed, never
verified here.  Not on the launch path: imported by verify, and by the keeper
when the site requires signatures.
"""
import base64
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import tempfile

from hpcrun import errors, imagefile, sif

_INTEGRITY = struct.Struct("<iBIIqqqq")       # data type, used, relative ID, linked ID, size, ctime, uid, gid
DIGESTS = ("sha224", "sha256", "sha384", "sha512")  # apptainer/sif's, less SHA-1
GPGV_TIMEOUT = 60
SIGNATURES_MAX = 64
_ARMOR = b"-----BEGIN PGP PUBLIC KEY BLOCK-----"


class Result:
    """One signature object's verdict.  signer: the verified primary key
    fingerprint (and uid) when good; reason: why not; tampered: a key in the
    keyring signed it but the file no longer matches (65)."""
    __slots__ = ("id", "kind", "signs", "claimed", "signer", "uid", "reason", "tampered", "covers")

    def __init__(self, sig_id, kind, signs, claimed):
        self.id, self.kind, self.signs, self.claimed = sig_id, kind, signs, claimed
        self.signer = self.uid = self.reason = None
        self.tampered = False
        self.covers = []

    @property
    def principal(self):
        """Who signed, once verified (cmd_check and the policy name it)."""
        if self.signer is None:
            return None
        return "%s (%s)" % (self.uid, self.signer) if self.uid else self.signer

    def describe(self):
        return {"kind": self.kind, "signs": self.signs, "keys": self.claimed, "verified": self.signer is not None,
                "signer": self.signer, "uid": self.uid, "reason": self.reason, "objects": self.covers}


def gpgv():
    exe = shutil.which("gpgv") or ("/usr/bin/gpgv" if os.path.exists("/usr/bin/gpgv") else None)
    if not exe:
        raise errors.Error(errors.UNAVAILABLE, "gpgv is not installed (Apptainer's PGP signatures are checked "
                           "with it)", "apt-get install gpgv")
    return exe


def read_keyring(path, site):
    """The keyring's bytes (binary OpenPGP packets; an ASCII-armored file is
    decoded here, since gpgv reads only binary keyrings).  For the site's
    policy the file must be root's and not writable by others, like
    allowed_signers."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise errors.Error(errors.CONFIG if site else errors.NOINPUT, "keyring not readable: %s" % e.strerror, path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > (16 << 20):
            raise errors.Error(errors.CONFIG if site else errors.NOINPUT,
                               "keyring is not a regular file of at most 16 MiB", path)
        if site and (st.st_uid != 0 or st.st_mode & 0o022):
            raise errors.Error(errors.CONFIG, "sif_keyring must be owned by root and not group or world "
                               "writable (a user could add a key)", path)
        data = b""
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if data.lstrip().startswith(_ARMOR):
        data = _dearmor(data, path, site)
    if not data:
        raise errors.Error(errors.CONFIG if site else errors.DATA, "keyring is empty", path)
    return data


def _dearmor(data, path, site):
    """The packets of every PUBLIC KEY BLOCK in an armored file (RFC 4880 6.2):
    header lines up to a blank line, base64, a '=' checksum line."""
    out = b""
    lines = data.replace(b"\r", b"").split(b"\n")
    i = 0
    try:
        while i < len(lines):
            if lines[i].strip() != _ARMOR:
                i += 1
                continue
            i += 1
            while lines[i].strip():            # armor headers (Comment: ...)
                i += 1
            body = []
            i += 1
            while not lines[i].startswith(b"-----END"):
                if not lines[i].startswith(b"="):
                    body.append(lines[i].strip())
                i += 1
            out += base64.b64decode(b"".join(body), validate=True)
    except (IndexError, ValueError):
        raise errors.Error(errors.CONFIG if site else errors.DATA, "keyring is not a valid armored public key "
                           "block", path)
    return out


def _gpgv_check(keyring_file, message, home):
    """gpgv on one clear-signed message: (verdict, primary fingerprint, uid,
    signed text).  verdict: good, bad (the text was changed), nokey,
    expired, revoked, error."""
    msg_path = os.path.join(home, "message")        # no .asc/.sig suffix: gpgv would look for a data file
    out_path = os.path.join(home, "signed-text")
    with open(msg_path, "wb") as f:
        f.write(message)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GNUPGHOME": home, "LC_ALL": "C"}
    try:
        p = subprocess.run([gpgv(), "--homedir", home, "--keyring", keyring_file, "--status-fd", "1",
                            "--output", out_path, msg_path], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=env, close_fds=True, timeout=GPGV_TIMEOUT)
    except subprocess.TimeoutExpired:
        return "error", None, None, None
    status = [ln.split()[1:] for ln in p.stdout.decode("utf-8", "replace").splitlines()
              if ln.startswith("[GNUPG:] ") and len(ln.split()) > 1]
    words = [s[0] for s in status]
    fpr, uid = None, None
    for s in status:
        if s[0] == "VALIDSIG" and len(s) >= 11:
            fpr = s[10].upper()
        elif s[0] == "GOODSIG" and len(s) >= 3:
            uid = _shown(" ".join(s[2:]))
    if words.count("NEWSIG") != 1:
        return "error", None, None, None           # one message, one signature, as Apptainer writes
    if "BADSIG" in words:
        return "bad", None, None, None
    if "EXPKEYSIG" in words or "EXPSIG" in words:
        return "expired", None, None, None
    if "REVKEYSIG" in words:
        return "revoked", None, None, None
    if "NO_PUBKEY" in words or "ERRSIG" in words:
        return "nokey", None, None, None
    if p.returncode != 0 or "GOODSIG" not in words or fpr is None:
        return "error", None, None, None
    with open(out_path, "rb") as f:
        return "good", fpr, uid, f.read()


def _shown(text):
    return text if text.isprintable() else ascii(text)


def _parse_digest(value):
    algo, _, hexdigest = str(value).partition(":")
    if algo not in DIGESTS or len(hexdigest) != 2 * hashlib.new(algo).digest_size:
        raise ValueError("digest %r" % str(value)[:80])
    int(hexdigest, 16)
    return algo, hexdigest.lower()


def _header_bytes(fd):
    fields = sif._HEADER.unpack(os.pread(fd, sif._HEADER.size, 0))
    return fields[0] + fields[1] + fields[2] + fields[4]      # launch, magic, version, ID (not arch)


def descriptor_bytes(d, relative_id):
    """The integrity-protected fields of descriptor d (a sif._DESCR tuple)."""
    return _INTEGRITY.pack(d[0], d[1], relative_id, d[4], d[6], d[8], d[10], d[11]) + d[12] + d[13]


def object_digest(path, fd, offset, size, algo, file_size):
    if offset < 0 or size < 0 or offset + size > file_size:
        raise errors.Error(errors.DATA, "truncated SIF: a signed object lies beyond the end of the file", path)
    h = hashlib.new(algo)
    pos, end = offset, offset + size
    while pos < end:
        chunk = os.pread(fd, min(1 << 20, end - pos), pos)
        if not chunk:
            raise errors.Error(errors.DATA, "truncated SIF: a signed object ends early", path)
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


def group_objects(descriptors, linked):
    """(objects a signature linked to `linked` must cover, the group's
    smallest ID): a group's non-signature objects, or the one object."""
    if linked & sif.GROUP_MASK:
        members = [d for d in descriptors if d[3] == linked]
        objects = [d for d in members if d[0] != sif.DATA_SIGNATURE]
    else:
        objects = [d for d in descriptors if d[2] == linked and d[0] != sif.DATA_SIGNATURE]
        members = [d for d in descriptors if objects and d[3] == objects[0][3]] or objects
    return objects, min((d[2] for d in members), default=0)


def check_metadata(path, fd, file_size, descriptors, linked, body):
    """Compare the signed body with the file.  Returns the IDs covered;
    raises ValueError (not Apptainer's format) or errors.Error 65 (changed)."""
    doc = json.loads(body.decode("utf-8"))
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("objects"), list):
        raise ValueError("not an Apptainer version 1 signature body")
    objects, min_id = group_objects(descriptors, linked)
    by_id = {d[2]: d for d in objects}
    listed = {}
    for o in doc["objects"]:
        if not isinstance(o, dict) or not isinstance(o.get("relativeId"), int) or "objectDigest" not in o:
            raise ValueError("an object entry without relativeId or objectDigest")
        if min_id + o["relativeId"] in listed:
            raise ValueError("object %d listed twice" % (min_id + o["relativeId"]))
        listed[min_id + o["relativeId"]] = o
    if sorted(listed) != sorted(by_id):
        raise errors.Error(errors.DATA, "SIF changed after signing: the signature covers objects %s, the %s "
                           "holds %s" % (sorted(listed), "group" if linked & sif.GROUP_MASK else "link",
                                         sorted(by_id)), path)
    algo, want = _parse_digest(doc.get("header", {}).get("digest") if isinstance(doc.get("header"), dict) else None)
    if hashlib.new(algo, _header_bytes(fd)).hexdigest() != want:
        raise errors.Error(errors.DATA, "SIF changed after signing: header (launch script, version or ID)", path)
    for oid in sorted(listed):
        d, o = by_id[oid], listed[oid]
        algo, want = _parse_digest(o.get("descriptorDigest"))
        if hashlib.new(algo, descriptor_bytes(d, oid - min_id)).hexdigest() != want:
            raise errors.Error(errors.DATA, "SIF changed after signing: descriptor of object %d" % oid, path)
        algo, want = _parse_digest(o.get("objectDigest"))
        if object_digest(path, fd, d[5], d[6], algo, file_size) != want:
            raise errors.Error(errors.DATA, "SIF changed after signing: data of object %d" % oid, path)
    return sorted(listed)


def verify(path, keyring, site=False, expect_ident=None, keys=None):
    """Check every signature object of the SIF at path against keyring (a
    file; keys: its bytes, already read).  Returns (results, primary
    partition's ID or None)."""
    if keys is None:
        keys = read_keyring(keyring, site)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    home = tempfile.mkdtemp(prefix="hpcrun-gpgv-")
    try:
        st = os.fstat(fd)
        if expect_ident is not None and imagefile.identity("sif", st) != expect_ident:
            raise errors.Error(errors.DATA, "image changed while its container was being started", path)
        descriptors = sif._descriptors(path, fd, st.st_size)
        primary = [d[2] for d in descriptors if d[0] == sif.DATA_PARTITION
                   and sif._PARTITION.unpack_from(d[13])[1] == sif.PART_PRIMSYS]
        keyring_file = os.path.join(home, "keyring.gpg")
        with open(keyring_file, "wb") as f:
            f.write(keys)
        claimed = sif.signatures(path, fd, st.st_size)
        results = []
        sig_descs = [d for d in descriptors if d[0] == sif.DATA_SIGNATURE]
        if len(sig_descs) > SIGNATURES_MAX:       # each costs a gpgv run
            raise errors.Error(errors.DATA, "SIF has %d signature objects (at most %d are checked)"
                               % (len(sig_descs), SIGNATURES_MAX), path)
        for d, c in zip(sig_descs, claimed):
            r = Result(d[2], c["kind"], c["signs"], c["keys"])
            results.append(r)
            if c["kind"] == "dsse":
                r.reason = "not verified: DSSE signatures are not checked by hpcrun (apptainer verify checks them)"
                continue
            if c["kind"] != "pgp":
                r.reason = "not verified: not a PGP or DSSE signature"
                continue
            readable = 0 < d[6] <= sif.SIGNATURE_MAX and 0 <= d[5] <= st.st_size - d[6]
            data = os.pread(fd, d[6], d[5]) if readable else b""
            verdict, fpr, uid, body = _gpgv_check(keyring_file, data.rstrip(b"\0"), home)
            if verdict == "nokey":
                r.reason = "key not in the keyring"
            elif verdict in ("expired", "revoked"):
                r.reason = "key %s in the keyring" % verdict
            elif verdict == "bad":
                r.tampered = True
                r.reason = "signed text changed after signing (gpg: BAD signature)"
            elif verdict != "good":
                r.reason = "not a valid PGP signature (gpgv could not check it)"
            elif not c["keys"] or c["keys"][0] != fpr:
                r.tampered = True
                r.reason = "made by key %s, but the descriptor names %s" % (fpr, ", ".join(c["keys"]) or "none")
            else:
                try:
                    r.covers = check_metadata(path, fd, st.st_size, descriptors, d[4], body)
                    r.signer, r.uid = fpr, uid
                except errors.Error as e:
                    r.tampered = True
                    r.reason = e.what
                except (ValueError, UnicodeDecodeError) as e:
                    r.reason = "not verified: signed text is not Apptainer's signature format (%s)" % e
        return results, (primary[0] if primary else None)
    finally:
        os.close(fd)
        shutil.rmtree(home, ignore_errors=True)


def accepted(path, results, primary):
    """The policy's and verify's verdict: the results that accept the image
    (good and covering the primary partition); raises 65 when a key in the
    keyring signed something the file no longer matches, 77 otherwise."""
    bad = [r for r in results if r.tampered]
    if bad:
        raise errors.Error(errors.DATA, bad[0].reason, path)
    good = [r for r in results if r.signer and primary in r.covers]
    if good:
        return good
    if not results:
        raise errors.Error(errors.NOPERM, "not signed: the SIF has no signature object", path)
    reasons = []
    for r in results:
        if r.signer:
            reasons.append("%s %s: good, but does not cover the primary partition (object %s)"
                           % (r.kind.upper(), r.signer, primary))
        else:
            reasons.append("%s %s: %s" % (r.kind.upper(), ", ".join(r.claimed) or "(no key named)", r.reason))
    raise errors.Error(errors.NOPERM, "no accepted signature: " + "; ".join(reasons), path)
