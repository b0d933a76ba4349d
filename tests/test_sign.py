"""Signed images: hpcrun sign / verify with real OpenSSH keys (ssh-keygen), and
the site policy require_signature = yes enforced by the node's keeper.

Keys are made by the unprivileged test user in its own directory; the
site's allowed_signers file is root's.  Every image is a private copy."""
import hashlib
import json
import os
import shutil
import subprocess
import tempfile

import pytest

from checks import assert_one_error, eventually, keepers_of

from hpcrun import errors, imagefile

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen (openssh-client) missing")


@pytest.fixture(scope="module")
def keys(shared_dir, test_user, as_user):
    """Two keys of the test user (alice: allowed; mallory: unknown) and the
    site's allowed_signers files: one that allows alice, one where her key
    has expired (valid-before in the past: how a key is revoked)."""
    d = tempfile.mkdtemp(prefix="sign-keys-", dir=shared_dir)
    os.chmod(d, 0o755)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    k = {}
    for name in ("alice", "mallory"):
        k[name] = os.path.join(d, name)
        r = as_user(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name + "@site", "-f", k[name]])
        assert r.returncode == 0, r.stderr
    with open(k["alice"] + ".pub") as f:
        pub = f.read().strip()
    site = tempfile.mkdtemp(prefix="sign-site-", dir=shared_dir)
    os.chmod(site, 0o755)
    for name, options in (("allowed", 'namespaces="hpcrun-image"'), ("revoked", 'valid-before="20200101"')):
        k[name] = os.path.join(site, name)
        with open(k[name], "w") as f:
            f.write("alice@site %s %s\n" % (options, pub))
        os.chmod(k[name], 0o644)
    return k


@pytest.fixture
def image(shared_dir, busybox_image, test_user):
    """A private copy of the busybox image, owned by the test user."""
    d = tempfile.mkdtemp(prefix="sign-img-", dir=shared_dir)
    os.chmod(d, 0o755)
    path = os.path.join(d, "img.img")
    shutil.copy(busybox_image, path)
    os.chown(path, test_user.pw_uid, test_user.pw_gid)
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(d, ignore_errors=True)


def hpcrun(as_user, *argv, **kw):
    return as_user(["hpcrun"] + list(argv), **kw)


def sign(as_user, keys, img, who="alice"):
    r = hpcrun(as_user, "sign", "-k", keys[who], img)
    assert r.returncode == 0, r.stderr
    return r


def payload_bytes(img):
    with open(img, "rb") as f:
        h = imagefile.read_header(img, f.fileno())
        f.seek(0)
        return hashlib.sha256(f.read(h.offset + h.size)).hexdigest(), h


@pytest.fixture(scope="module")
def as_user(as_user, hpcrun_bin):
    """The shared as_user, with the venv's hpcrun first on PATH."""
    bindir = os.path.dirname(hpcrun_bin)

    def run(argv, env=None, **kw):
        e = {"PATH": "%s:/usr/local/bin:/usr/bin:/bin" % bindir}
        e.update(env or {})
        return as_user(argv, env=e, **kw)
    return run


# ------------------------------------------------------------ sign/verify ---

def test_round_trip_keeps_the_payload(as_user, keys, image):
    before, h = payload_bytes(image)
    r = hpcrun(as_user, "inspect", "--json", image)
    assert json.loads(r.stdout)["signatures"] == []
    out = sign(as_user, keys, image).stdout
    assert "alice@site" in out and "SHA256:" in out
    sign(as_user, keys, image, "mallory")              # several signatures
    after, h2 = payload_bytes(image)
    assert after == before and (h2.offset, h2.size, h2.sha256) == (h.offset, h.size, h.sha256)
    d = json.loads(hpcrun(as_user, "inspect", "--json", image).stdout)
    assert [s["signer_claimed"] for s in d["signatures"]] == ["alice@site", "mallory@site"]
    assert "claimed" in hpcrun(as_user, "inspect", image).stdout
    r = hpcrun(as_user, "verify", "--allowed-signers", keys["allowed"], image)
    assert r.returncode == 0, r.stderr
    assert "good signature by alice@site" in r.stdout
    assert "mallory@site): key not in allowed_signers" in r.stdout
    # the same key again adds nothing
    size = os.path.getsize(image)
    assert "already signed" in sign(as_user, keys, image).stdout
    assert os.path.getsize(image) == size
    # a signed image still launches (trailer ignored without policy)
    r = hpcrun(as_user, image, "echo", "inside", env={"HPCRUN_LINGER": "0"})
    assert (r.returncode, r.stdout) == (0, "inside\n"), r.stderr


def test_unsigned_and_unknown_signer_are_77(as_user, keys, image):
    r = hpcrun(as_user, "verify", "--allowed-signers", keys["allowed"], image)
    assert_one_error(r, errors.NOPERM, "not signed")
    sign(as_user, keys, image, "mallory")
    r = hpcrun(as_user, "verify", "--allowed-signers", keys["allowed"], image)
    assert_one_error(r, errors.NOPERM, "no signature from an allowed")
    assert "key not in allowed_signers" in r.stdout


def test_revoked_key_is_77(as_user, keys, image):
    sign(as_user, keys, image)
    r = hpcrun(as_user, "verify", "--allowed-signers", keys["revoked"], image)
    assert_one_error(r, errors.NOPERM)
    assert "expired" in r.stdout


def test_tampered_payload_is_65(as_user, keys, image):
    sign(as_user, keys, image)
    _, h = payload_bytes(image)
    with open(image, "r+b") as f:                      # a byte near the payload's end
        f.seek(h.offset + h.size - 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xff]))
    r = hpcrun(as_user, "verify", "--allowed-signers", keys["allowed"], image)
    assert_one_error(r, errors.DATA, "does not match its header")


def test_tampered_metadata_is_65(as_user, keys, image):
    sign(as_user, keys, image)
    with open(image, "r+b") as f:
        head = f.read(4096)
        at = head.index(b"runscript says")
        f.seek(at)
        f.write(b"RUNSCRIPT SAYS")                     # same length, still valid JSON
    assert json.loads(hpcrun(as_user, "inspect", "--json", image).stdout)["runscript"][1] == "RUNSCRIPT SAYS"
    r = hpcrun(as_user, "verify", "--allowed-signers", keys["allowed"], image)
    assert_one_error(r, errors.DATA, "changed after signing")


def test_garbage_after_the_payload_is_65(as_user, keys, image):
    with open(image, "ab") as f:
        f.write(b"HPCRUN-SIGNATURE 999999 x\nshort")
    r = hpcrun(as_user, "verify", "--allowed-signers", keys["allowed"], image)
    assert_one_error(r, errors.DATA, "bad signature block")
    assert_one_error(hpcrun(as_user, "inspect", image), errors.DATA, "bad signature block")


def test_sign_refuses_what_it_cannot_sign(as_user, keys, image, busybox_squashfs):
    r = hpcrun(as_user, "sign", "-k", keys["alice"], busybox_squashfs)
    assert r.returncode in (errors.DATA, errors.CANTCREATE), r.stderr     # root's file: not writable either
    assert_one_error(r, r.returncode)
    r = hpcrun(as_user, "sign", "-k", keys["alice"] + ".missing", image)
    assert_one_error(r, errors.NOINPUT, "key not found")
    _, h = payload_bytes(image)
    with open(image, "r+b") as f:                      # a payload that does not match its header is not signed
        f.seek(h.offset + 200)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xff]))
    size = os.path.getsize(image)
    assert_one_error(hpcrun(as_user, "sign", "-k", keys["alice"], image), errors.DATA, "does not match")
    assert os.path.getsize(image) == size
    assert_one_error(hpcrun(as_user, "verify", image), errors.USAGE, "allowed_signers")


# ------------------------------------------------------------ site policy ---

def _policy(site_config, keys, which="allowed"):
    return site_config("require_signature = yes\nallowed_signers = %s\n" % keys[which])


def _nothing_left(as_user, test_user, image, prefix):
    """No keeper, no run-dir entry of this image's key, no mount of it."""
    plan = json.loads(hpcrun(as_user, "--dry-run", image, "true", prefix=prefix).stdout)
    run_dir = "/tmp/hpcrun-%d" % test_user.pw_uid

    def clean():
        left = [n for n in (os.listdir(run_dir) if os.path.isdir(run_dir) else []) if n.startswith(plan["key"])]
        with open("/proc/self/mountinfo") as f:
            mounts = [ln for ln in f if os.path.dirname(image) in ln]
        return left == [] and mounts == [] and not keepers_of(image)
    return eventually(clean)


def test_policy_refuses_unsigned_unknown_revoked(as_user, test_user, keys, image, site_config):
    policy = _policy(site_config, keys)
    env = {"HPCRUN_LINGER": "0"}
    r = hpcrun(as_user, image, "true", prefix=policy, env=env)
    assert_one_error(r, errors.NOPERM, "requires signed images", "not signed")
    assert _nothing_left(as_user, test_user, image, policy)
    sign(as_user, keys, image, "mallory")
    r = hpcrun(as_user, image, "true", prefix=policy, env=env)
    assert_one_error(r, errors.NOPERM, "no accepted signature", "key not in allowed_signers")
    sign(as_user, keys, image)
    r = hpcrun(as_user, image, "echo", "ok", prefix=_policy(site_config, keys, "revoked"), env=env)
    assert_one_error(r, errors.NOPERM, "expired")
    r = hpcrun(as_user, image, "echo", "ok", prefix=policy, env=env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok\n", "")


def test_policy_refuses_tampered_and_other_kinds(as_user, test_user, keys, image, busybox_squashfs, site_config):
    policy = _policy(site_config, keys)
    env = {"HPCRUN_LINGER": "0"}
    r = hpcrun(as_user, busybox_squashfs, "true", prefix=policy, env=env)
    assert_one_error(r, errors.NOPERM, "squashfs image carries no hpcrun signature")
    sign(as_user, keys, image)
    _, h = payload_bytes(image)
    with open(image, "r+b") as f:
        f.seek(h.offset + h.size - 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xff]))
    r = hpcrun(as_user, image, "true", prefix=policy, env=env)
    assert_one_error(r, errors.DATA, "does not match its header")
    assert _nothing_left(as_user, test_user, image, policy)


def test_policy_off_runs_unsigned(as_user, image, site_config):
    r = hpcrun(as_user, image, "echo", "ok", prefix=site_config("require_signature = no\n"),
               env={"HPCRUN_LINGER": "0"})
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


def test_policy_is_the_sites(as_user, keys, image, site_config, shared_dir, test_user):
    # a user's HPCRUN_CONF can neither set the policy nor name the signers
    d = tempfile.mkdtemp(prefix="sign-conf-", dir=shared_dir)
    os.chmod(d, 0o755)
    conf = os.path.join(d, "my.conf")
    with open(conf, "w") as f:
        f.write("allowed_signers = %s\n" % keys["allowed"])
    os.chmod(conf, 0o644)
    r = hpcrun(as_user, image, "true", env={"HPCRUN_CONF": conf})
    assert_one_error(r, errors.CONFIG, "cannot set allowed_signers")
    # an allowed_signers file the user could add a key to is a config error
    mine = os.path.join(d, "signers")
    shutil.copy(keys["allowed"], mine)
    os.chown(mine, test_user.pw_uid, test_user.pw_gid)
    sign(as_user, keys, image)
    r = hpcrun(as_user, image, "true", prefix=site_config("require_signature = yes\nallowed_signers = %s\n" % mine),
               env={"HPCRUN_LINGER": "0"})
    assert_one_error(r, errors.CONFIG, "owned by root")
    r = hpcrun(as_user, image, "true", prefix=site_config("require_signature = yes\n"), env={"HPCRUN_LINGER": "0"})
    assert_one_error(r, errors.CONFIG, "needs allowed_signers")


def test_policy_as_root(hpcrun_bin, keys, image, shared_dir):
    # root: HPCRUN_CONF replaces the site's file; the kernel mounts the image in place
    if os.getuid() != 0:
        pytest.skip("needs root")
    d = tempfile.mkdtemp(prefix="sign-root-", dir=shared_dir)
    conf = os.path.join(d, "hpcrun.conf")
    with open(conf, "w") as f:
        f.write("require_signature = yes\nallowed_signers = %s\nlinger = 0\n" % keys["allowed"])
    env = dict(os.environ, HPCRUN_CONF=conf)

    def run(*argv):
        return subprocess.run([hpcrun_bin] + list(argv), env=env, capture_output=True, text=True, timeout=120)
    assert_one_error(run(image, "true"), errors.NOPERM, "not signed")
    r = subprocess.run([hpcrun_bin, "sign", "-k", keys["alice"], image], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = run(image, "echo", "ok")
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr
    assert run("verify", image).returncode == 0            # verify's default: the config's allowed_signers
    # mounted in place, the keeper reads the payload itself
    _, h = payload_bytes(image)
    with open(image, "r+b") as f:
        f.seek(h.offset + h.size - 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xff]))
    assert_one_error(run(image, "true"), errors.DATA, "does not match its header")
    assert eventually(lambda: not keepers_of(image))
    _forget("/tmp/hpcrun-0", image)         # the first launch's record (verified-identity cache)
    shutil.rmtree(d)


# ------------------------------------------------ Apptainer's signed SIFs ---

SIF_DIR = "/work/shared/data/sif"


@pytest.mark.skipif(not os.path.isdir(SIF_DIR), reason="no SIF examples")
@pytest.mark.parametrize("name,kind,keys", [
    ("one-group-signed-pgp.sif", "pgp", ["12045C8C0B1004D058DE4BEDA20C27EE7FF7BA84"]),
    ("one-group-signed-dsse.sif", "dsse", ["SHA256:x6l8ZblpSSXGaPMCzySedWg88BwIFcz8jlPb6el0mFs",
                                           "SHA256:BhCwr7qZulYcOMSl2Jt2DuYHxHNnN6th4NdMqR/PGa4"]),
    ("one-group.sif", None, None)])
def test_inspect_lists_sif_signatures(as_user, name, kind, keys):
    path = os.path.join(SIF_DIR, name)
    r = hpcrun(as_user, "inspect", "--json", path)
    assert r.returncode == 0, r.stderr
    sigs = json.loads(r.stdout)["signatures"]
    text = hpcrun(as_user, "inspect", path).stdout
    if kind is None:
        assert sigs == [] and "(not signed)" in text
        return
    assert [(s["kind"], s["keys"], s["hash"], s["signs"]) for s in sigs] == [(kind, keys, "sha256", "object group 1")]
    assert "claimed, not checked" in text and keys[0] in text


def test_signing_keeps_a_submission_pin(as_user, keys, image):
    # a job pinned at submission (--image-digest: the header's sha256) still
    # runs after the image was signed: signing appends, the header stays
    pin = json.loads(hpcrun(as_user, "inspect", "--json", image).stdout)["pin"]
    sign(as_user, keys, image)
    assert json.loads(hpcrun(as_user, "inspect", "--json", image).stdout)["pin"] == pin
    r = hpcrun(as_user, "--image-digest", pin, image, "echo", "ok", env={"HPCRUN_LINGER": "0"})
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


def test_check_reports_the_signature_policy(as_user, keys, image, site_config):
    # `hpcrun check IMAGE` promises the exit code the launch would have: 77 for an
    # image the site's require_signature refuses, 0 once it carries an accepted signature.
    policy = _policy(site_config, keys)
    r = hpcrun(as_user, "check", "--json", image, prefix=policy)
    rows = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert r.returncode == errors.NOPERM, r.stdout + r.stderr
    assert rows["signature"]["status"] == "FAIL" and "not signed" in rows["signature"]["value"], rows
    sign(as_user, keys, image)
    r = hpcrun(as_user, "check", image, prefix=policy)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "signature:" in r.stdout and "alice@site" in r.stdout, r.stdout
    r = hpcrun(as_user, "check", image, prefix=_policy(site_config, keys, "revoked"))
    assert r.returncode == errors.NOPERM and "expired" in r.stdout, r.stdout + r.stderr
    r = hpcrun(as_user, "check", image, prefix=site_config("require_signature = no\n"))
    assert r.returncode == 0 and "signature:" not in r.stdout, r.stdout + r.stderr


def test_check_names_a_bad_policy_value(as_user, image, site_config):
    r = hpcrun(as_user, "check", image, prefix=site_config("require_signature = maybe\n"))
    assert r.returncode == errors.CONFIG, r.stdout + r.stderr
    row = [ln for ln in r.stdout.splitlines() if ln.startswith("signature:")]
    assert len(row) == 1 and "bad boolean" in row[0] and "required by the site" not in row[0], r.stdout


# ------------------------------------- Apptainer's PGP signatures, with gpg ---
#
# SIFs written by siftools the way Apptainer writes them, signed by real gpg
# keys made here (a root-owned temporary GNUPGHOME, its agent stopped after);
# hpcrun checks them with gpgv.  The site's keyrings are root's files.

needs_gpg = pytest.mark.skipif(shutil.which("gpg") is None or shutil.which("gpgv") is None,
                               reason="gpg/gpgv (Debian gpg, gpgv) missing")


@pytest.fixture(scope="module")
def pgp(shared_dir, test_user, busybox_squashfs):
    """Keys alice and mallory; keyrings (binary, armored, both keys, garbage,
    one the user owns); a runnable SIF's objects (definition file + busybox
    as the primary partition) and make(name, ...) for signed copies."""
    if shutil.which("gpg") is None or shutil.which("gpgv") is None:
        pytest.skip("gpg/gpgv missing")
    import siftools
    d = tempfile.mkdtemp(prefix="sign-pgp-", dir=shared_dir)
    os.chmod(d, 0o755)
    home = os.path.join(d, "gnupg")
    k = {"home": home, "dir": d}
    try:
        for name in ("alice", "mallory", "gone"):
            k[name] = siftools.gpg_key(home, name)
        k["old"] = siftools.gpg_key(home, "old", expire="1d", when="20200101T000000")   # expired since
        k["alice.gpg"] = siftools.export_key(home, k["alice"], os.path.join(d, "alice.gpg"))
        k["alice.asc"] = siftools.export_key(home, k["alice"], os.path.join(d, "alice.asc"), armor=True)
        k["mallory.gpg"] = siftools.export_key(home, k["mallory"], os.path.join(d, "mallory.gpg"))
        k["both.gpg"] = os.path.join(d, "both.gpg")
        with open(k["both.gpg"], "wb") as f:
            f.write(open(k["alice.gpg"], "rb").read() + open(k["mallory.gpg"], "rb").read())
        k["garbage"] = os.path.join(d, "garbage")
        with open(k["garbage"], "wb") as f:
            f.write(b"not a keyring\n" * 10)
        k["users.gpg"] = os.path.join(d, "users.gpg")
        shutil.copy(k["alice.gpg"], k["users.gpg"])
        os.chown(k["users.gpg"], test_user.pw_uid, test_user.pw_gid)
        for name in ("alice.gpg", "alice.asc", "mallory.gpg", "both.gpg", "garbage"):
            os.chmod(k[name], 0o644)
        with open(busybox_squashfs, "rb") as f:
            objects = [siftools.obj(siftools.DEFFILE, b"Bootstrap: scratch\n"), siftools.partition(f.read())]

        def make(name, signer="alice", claim=None, ids=None, link=None, unsigned=False, when=None):
            path = os.path.join(d, name)
            sig = []
            if not unsigned:
                text = siftools.clearsign(siftools.pgp_body(objects, ids=ids), home, k[signer], when)
                sig = [siftools.pgp_signature(text, k[claim or signer], link=link)]
            return siftools.write(path, objects + sig)
        k["make"] = make
        yield k
    finally:
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def _gpgv_homes(uid):
    return {n for n in os.listdir("/tmp") if n.startswith("hpcrun-gpgv-") and os.stat("/tmp/" + n).st_uid == uid}


@needs_gpg
def test_sif_pgp_good_signature(as_user, test_user, pgp):
    path = pgp["make"]("good.sif")
    homes = _gpgv_homes(test_user.pw_uid)
    r = hpcrun(as_user, "verify", "--keyring", pgp["alice.gpg"], path)
    assert r.returncode == 0, r.stderr
    assert "good PGP signature by alice <alice@site> (%s), covers objects 1, 2" % pgp["alice"] in r.stdout
    r = hpcrun(as_user, "verify", "--json", "--keyring", pgp["alice.asc"], path)     # armored keys too
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["verified"], d["primary_object"]) == (True, 2)
    assert [(s["kind"], s["signer"], s["objects"], s["verified"]) for s in d["signatures"]] == [
        ("pgp", pgp["alice"], [1, 2], True)]
    # gpgv ran with a temporary home, removed after; the user's ~/.gnupg untouched
    assert _gpgv_homes(test_user.pw_uid) == homes
    assert not os.path.exists(os.path.join(test_user.pw_dir, ".gnupg"))


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


@needs_gpg
@pytest.mark.parametrize("where,message", [
    ("partition", "data of object 2"),
    ("descriptor", "descriptor of object 1"),        # the definition file's name field
    ("header", "header"),                            # the SIF's ID
    ("signed-text", "BAD signature"),
])
def test_sif_pgp_tampered_is_65(as_user, pgp, where, message):
    import siftools
    path = pgp["make"]("tampered-%s.sif" % where)
    data = open(path, "rb").read()
    descr = 4096
    prim = siftools.DESCR.unpack_from(data, descr + siftools.DESCR.size)
    sig = siftools.DESCR.unpack_from(data, descr + 2 * siftools.DESCR.size)
    offset = {"partition": prim[5] + prim[6] - 1000,
              "descriptor": descr + 73,                                  # name, byte 0
              "header": 32 + 10 + 3 + 3 + 5,                             # ID, byte 5
              "signed-text": data.index(b'"version":1', sig[5]) + 10}[where]
    _flip(path, offset)
    r = hpcrun(as_user, "verify", "--keyring", pgp["alice.gpg"], path)
    assert_one_error(r, errors.DATA, message)


@needs_gpg
def test_sif_pgp_unknown_key_and_wrong_keyring(as_user, pgp):
    by_mallory = pgp["make"]("mallory.sif", signer="mallory")
    by_alice = pgp["make"]("alice.sif")
    assert_one_error(hpcrun(as_user, "verify", "--keyring", pgp["alice.gpg"], by_mallory),
                     errors.NOPERM, "no accepted signature", pgp["mallory"], "key not in the keyring")
    assert_one_error(hpcrun(as_user, "verify", "--keyring", pgp["mallory.gpg"], by_alice),
                     errors.NOPERM, "key not in the keyring")
    assert_one_error(hpcrun(as_user, "verify", "--keyring", pgp["garbage"], by_alice),
                     errors.NOPERM, "key not in the keyring")
    assert_one_error(hpcrun(as_user, "verify", "--keyring", pgp["dir"] + "/none", by_alice),
                     errors.NOINPUT, "keyring not readable")
    assert_one_error(hpcrun(as_user, "verify", by_alice), errors.USAGE, "--keyring")
    # Apptainer's own signed test file: its key is not ours
    assert_one_error(hpcrun(as_user, "verify", "--keyring", pgp["alice.gpg"],
                            os.path.join(SIF_DIR, "one-group-signed-pgp.sif")),
                     errors.NOPERM, "12045C8C0B1004D058DE4BEDA20C27EE7FF7BA84", "key not in the keyring")
    # a good signature whose descriptor names another key (both in the keyring)
    forged = pgp["make"]("claims-alice.sif", signer="mallory", claim="alice")
    assert_one_error(hpcrun(as_user, "verify", "--keyring", pgp["both.gpg"], forged),
                     errors.DATA, "made by key %s, but the descriptor names %s" % (pgp["mallory"], pgp["alice"]))


@needs_gpg
def test_apptainers_own_signature_verifies_with_its_public_key(as_user, shared_dir):
    # A signature written by the SIF reference tooling, not by our tests: with
    # its test key's public half (tests/data/README.md) it is good; one byte of
    # the partition changed after signing is 65.
    keyring = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sif-test-key.pub.asc")
    real = os.path.join(SIF_DIR, "one-group-signed-pgp.sif")
    r = hpcrun(as_user, "verify", "--keyring", keyring, real)
    assert r.returncode == 0, r.stderr
    assert "good PGP signature by Unit Test <unit@test.com> (12045C8C0B1004D058DE4BEDA20C27EE7FF7BA84)" in r.stdout
    d = tempfile.mkdtemp(prefix="sign-real-", dir=shared_dir)
    os.chmod(d, 0o755)
    changed = os.path.join(d, "changed.sif")
    data = bytearray(open(real, "rb").read())
    data[36864 + 200] ^= 0xFF                 # inside the SquashFS partition (offset 36864, README there)
    with open(changed, "wb") as f:
        f.write(data)
    os.chmod(changed, 0o644)
    try:
        assert_one_error(hpcrun(as_user, "verify", "--keyring", keyring, changed), errors.DATA)
    finally:
        shutil.rmtree(d)


@needs_gpg
def test_sif_pgp_expired_and_revoked_keys_are_77(as_user, pgp):
    # gpgv itself exits 0 for a key that has expired since it signed: hpcrun refuses it
    import siftools
    old = pgp["make"]("old.sif", signer="old", when="20200101T010000")
    gone = pgp["make"]("gone.sif", signer="gone")
    siftools.revoke_key(pgp["home"], pgp["gone"])            # after it signed
    keyring = os.path.join(pgp["dir"], "old+gone.gpg")
    with open(keyring, "wb") as f:
        for name in ("old", "gone"):
            f.write(open(siftools.export_key(pgp["home"], pgp[name], os.path.join(pgp["dir"], name + ".gpg")),
                         "rb").read())
    os.chmod(keyring, 0o644)
    assert_one_error(hpcrun(as_user, "verify", "--keyring", keyring, old), errors.NOPERM, "key expired in the keyring")
    assert_one_error(hpcrun(as_user, "verify", "--keyring", keyring, gone), errors.NOPERM, "key revoked in the keyring")


@needs_gpg
def test_sif_dsse_is_listed_never_verified(as_user, pgp):
    path = os.path.join(SIF_DIR, "one-group-signed-dsse.sif")
    r = hpcrun(as_user, "verify", "--keyring", pgp["alice.gpg"], path)
    assert_one_error(r, errors.NOPERM, "DSSE", "not verified: DSSE")
    assert "not accepted: DSSE" in r.stdout and "good" not in r.stdout
    d = json.loads(hpcrun(as_user, "verify", "--json", "--keyring", pgp["alice.gpg"], path).stdout)
    assert [(s["kind"], s["verified"]) for s in d["signatures"]] == [("dsse", False)] and not d["verified"]


@needs_gpg
def test_sif_signature_of_the_definition_file_alone_is_not_enough(as_user, pgp):
    # a good signature of object 1 only (as `apptainer sign --sif-id 1`): what runs is unsigned
    path = pgp["make"]("deffile-only.sif", ids=[1], link=1)
    r = hpcrun(as_user, "verify", "--keyring", pgp["alice.gpg"], path)
    assert_one_error(r, errors.NOPERM, "does not cover the primary partition")
    assert "covers objects 1 (not the primary partition)" in r.stdout


@needs_gpg
def test_sif_policy(as_user, test_user, pgp, keys, image, site_config, shared_dir):
    policy = site_config("require_signature = yes\nsif_keyring = %s\n" % pgp["alice.gpg"])
    env = {"HPCRUN_LINGER": "0"}
    good = pgp["make"]("policy-good.sif")
    r = hpcrun(as_user, good, "echo", "ok", prefix=policy, env=env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok\n", "")
    r = hpcrun(as_user, "check", good, prefix=policy)          # the pre-flight says what the launch does
    assert r.returncode == 0 and "accepted, signed by alice <alice@site>" in r.stdout, r.stdout + r.stderr
    assert_one_error(hpcrun(as_user, pgp["make"]("policy-unsigned.sif", unsigned=True), "true", prefix=policy,
                            env=env), errors.NOPERM, "not signed")
    assert_one_error(hpcrun(as_user, pgp["make"]("policy-mallory.sif", signer="mallory"), "true", prefix=policy,
                            env=env), errors.NOPERM, "key not in the keyring")
    tampered = pgp["make"]("policy-tampered.sif")
    _flip(tampered, os.path.getsize(tampered) - 3000)     # inside the partition (the signature is ~1 KiB)
    assert_one_error(hpcrun(as_user, tampered, "true", prefix=policy, env=env), errors.DATA, "data of object 2")
    assert _nothing_left(as_user, test_user, tampered, policy)
    _forget("/tmp/hpcrun-%d" % test_user.pw_uid, good)
    # an hpcrun image where only SIFs are accepted; a keyring the user could write; the user's own file
    assert_one_error(hpcrun(as_user, image, "true", prefix=policy, env=env), errors.NOPERM, "accepts only SIF")
    assert_one_error(hpcrun(as_user, good, "true", prefix=site_config(
        "require_signature = yes\nsif_keyring = %s\n" % pgp["users.gpg"]), env=env), errors.CONFIG, "owned by root")
    conf = os.path.join(pgp["dir"], "my.conf")
    with open(conf, "w") as f:
        f.write("sif_keyring = %s\n" % pgp["alice.gpg"])
    os.chmod(conf, 0o644)
    assert_one_error(hpcrun(as_user, good, "true", env={"HPCRUN_CONF": conf}), errors.CONFIG, "cannot set sif_keyring")
    # both kinds accepted when both are configured
    both = site_config("require_signature = yes\nsif_keyring = %s\nallowed_signers = %s\n"
                       % (pgp["alice.gpg"], keys["allowed"]))
    sign(as_user, keys, image)
    for img in (good, image):
        r = hpcrun(as_user, img, "echo", "ok", prefix=both, env=env)
        assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr
    _forget("/tmp/hpcrun-%d" % test_user.pw_uid, good, image)


# ----------------------------------------------- the verified-identity cache ---

def _forget(run_dir, *paths):
    """Remove the cache records this test's images left in run_dir/verified."""
    idents = {"%d:%d" % (os.stat(p).st_dev, os.stat(p).st_ino) for p in paths}
    d = os.path.join(run_dir, "verified")
    for name in os.listdir(d) if os.path.isdir(d) else []:
        try:
            with open(os.path.join(d, name)) as f:
                ident = json.load(f)["ident"]
        except (OSError, ValueError, KeyError):
            continue
        if ":".join(ident.split(":")[1:3]) in idents:
            os.unlink(os.path.join(d, name))


def _records(run_dir, ident):
    d = os.path.join(run_dir, "verified")
    out = []
    for name in os.listdir(d) if os.path.isdir(d) else []:
        with open(os.path.join(d, name)) as f:
            rec = json.load(f)
        if rec["ident"] == ident:
            out.append((os.path.join(d, name), rec))
    return out


def test_cache_skips_the_hash_and_trusts_nothing_else(hpcrun_bin, keys, image, tmp_path, monkeypatch):
    """In process, as the keeper calls it: the first check reads the payload
    and records the acceptance; the next one for the same file identity and
    allowed_signers content does not read it; a record from the future or
    too old, a link, a directory others may write, another allowed_signers
    or a changed file are not trusted."""
    if os.getuid() != 0:
        pytest.skip("needs root to read the test user's key")
    from hpcrun import config, signature
    from hpcrun import image as images
    r = subprocess.run([hpcrun_bin, "sign", "-k", keys["alice"], image], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    dir_fd = os.open(str(run_dir), os.O_RDONLY | os.O_DIRECTORY)
    reads = []
    real = signature.verify_image
    monkeypatch.setattr(signature, "verify_image", lambda *a, **kw: reads.append(kw) or real(*a, **kw))

    def enforce(allowed=keys["allowed"], img=None, **kw):
        cfg = config.Config({"require_signature": ["yes"], "allowed_signers": [allowed]}, [])
        out = signature.enforce(img or images.open_image(image).describe(), cfg, cache_dir_fd=dir_fd, **kw)
        return [x.principal for x in out if x.principal]
    try:
        assert enforce() == ["alice@site"] and len(reads) == 1
        ident = images.open_image(image).describe()["ident"]
        [(path, rec)] = _records(str(run_dir), ident)
        assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(run_dir / "verified").st_mode & 0o777 == 0o700
        assert rec["signers"] == ["alice@site"] and rec["trust"].startswith("allowed_signers:")
        assert enforce() == ["alice@site"] and len(reads) == 1                # a hit: nothing read
        assert enforce(payload_checked_later=True) == ["alice@site"] and len(reads) == 1

        def forged(**change):
            bad = dict(rec, **change)
            with open(path, "w") as f:
                json.dump(bad, f)
        for change in ({"checked_at": rec["checked_at"] + 7200}, {"checked_at": rec["checked_at"] - 7200},
                       {"ident": ident.replace("hpcrun:", "sif:")}, {"format": "hpcrun-verified 0"}):
            forged(**change)
            before = len(reads)
            assert enforce() == ["alice@site"] and len(reads) == before + 1, change
        os.unlink(path)
        os.symlink(str(tmp_path / "elsewhere"), path)
        with open(tmp_path / "elsewhere", "w") as f:
            json.dump(rec, f)
        before = len(reads)
        enforce()
        assert len(reads) == before + 1 and os.path.islink(path) is False      # replaced by a real record
        os.chmod(run_dir / "verified", 0o770)
        before = len(reads)
        enforce()
        assert len(reads) == before + 1
        os.chmod(run_dir / "verified", 0o700)
        # a link in the directory's place: not followed, nothing written there
        os.rename(run_dir / "verified", tmp_path / "moved")
        os.symlink(str(tmp_path / "moved"), run_dir / "verified")
        names = sorted(os.listdir(tmp_path / "moved"))
        before = len(reads)
        enforce()
        assert len(reads) == before + 1 and sorted(os.listdir(tmp_path / "moved")) == names
        os.unlink(run_dir / "verified")
        os.rename(tmp_path / "moved", run_dir / "verified")
        # records past their time (and a left-over temporary) are pruned when one is written
        stale = run_dir / "verified" / ("0" * 64)
        stale.write_text("{}")
        os.utime(stale, (rec["checked_at"] - 7200,) * 2)
        os.unlink(path)
        enforce()
        assert not stale.exists() and os.path.exists(path)
        # another allowed_signers (a line added): verified again, then its own record
        other = tmp_path / "signers"
        other.write_text(open(keys["allowed"]).read() + "# a comment\n")
        before = len(reads)
        enforce(str(other))
        enforce(str(other))
        assert len(reads) == before + 1
        # a staged launch that skipped the payload records nothing
        os.utime(image)
        before = len(reads)
        enforce(payload_checked_later=True)
        enforce()
        assert len(reads) == before + 2
        # the file changed after the launch planned with it: the record is for the old identity
        planned = images.open_image(image).describe()
        os.utime(image, (1, 1))
        with pytest.raises(Exception) as e:
            enforce(img=planned)
        assert getattr(e.value, "code", None) == errors.DATA and "image changed" in e.value.what
    finally:
        os.close(dir_fd)


@needs_gpg
def test_a_second_keeper_uses_the_record(as_user, test_user, pgp, site_config):
    # two launches with other binds: two keepers; the first records the
    # acceptance under the user's run_dir, naming this file identity; a change
    # of the file is a new identity, checked again (65)
    run_dir = "/tmp/hpcrun-%d" % test_user.pw_uid
    policy = site_config("require_signature = yes\nsif_keyring = %s\n" % pgp["alice.gpg"])
    env = {"HPCRUN_LINGER": "0"}
    path = pgp["make"]("cached.sif")
    try:
        r = hpcrun(as_user, path, "echo", "one", prefix=policy, env=env)
        assert (r.returncode, r.stdout) == (0, "one\n"), r.stderr
        ident = json.loads(hpcrun(as_user, "--dry-run", path, "true", prefix=policy).stdout)["image"]["ident"]
        [(record, rec)] = _records(run_dir, ident)
        st = os.stat(record)
        assert (st.st_uid, st.st_mode & 0o777) == (test_user.pw_uid, 0o600)
        assert rec["signers"] == ["alice <alice@site> (%s)" % pgp["alice"]] and rec["trust"].startswith("sif_keyring:")
        r = hpcrun(as_user, "-B", "/tmp:/mnt", path, "echo", "two", prefix=policy, env=env)
        assert (r.returncode, r.stdout) == (0, "two\n"), r.stderr
        _flip(path, os.path.getsize(path) - 3000)
        r = hpcrun(as_user, "-B", "/tmp:/mnt", path, "true", prefix=policy, env=env)
        assert_one_error(r, errors.DATA, "data of object 2")
    finally:
        _forget(run_dir, path)


@needs_gpg
def test_sif_hostile_signature_objects(as_user, pgp, busybox_squashfs):
    # one line and a documented code, never a traceback or a gpgv per descriptor without end
    import siftools
    with open(busybox_squashfs, "rb") as f:
        parts = [siftools.obj(siftools.DEFFILE, b"Bootstrap: scratch\n"), siftools.partition(f.read())]
    text = siftools.clearsign(siftools.pgp_body(parts), pgp["home"], pgp["alice"])
    d = pgp["dir"]
    many = siftools.write(os.path.join(d, "many.sif"), parts + [siftools.pgp_signature(text, pgp["alice"])] * 65,
                          total=80)
    assert_one_error(hpcrun(as_user, "verify", "--keyring", pgp["alice.gpg"], many), errors.DATA,
                     "65 signature objects")
    # a good signature of something that is not Apptainer's digest list
    other = siftools.write(os.path.join(d, "not-json.sif"), parts + [siftools.pgp_signature(
        siftools.clearsign("SIFHASH:\n" + "0" * 64 + "\n", pgp["home"], pgp["alice"]), pgp["alice"])])
    assert_one_error(hpcrun(as_user, "verify", "--keyring", pgp["alice.gpg"], other), errors.NOPERM,
                     "not Apptainer's signature format")
    # an armored block that is no signature at all, and one that names no key
    junk = siftools.write(os.path.join(d, "junk.sif"), parts + [siftools.pgp_signature(
        b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n{}\n", pgp["alice"])])
    assert_one_error(hpcrun(as_user, "verify", "--keyring", pgp["alice.gpg"], junk), errors.NOPERM,
                     "not a valid PGP signature")
    # a signature text followed by a second signed message: one message, one signature
    twice = siftools.write(os.path.join(d, "twice.sif"), parts + [siftools.pgp_signature(text + text, pgp["alice"])])
    r = hpcrun(as_user, "verify", "--keyring", pgp["alice.gpg"], twice)
    assert_one_error(r, errors.NOPERM, "not a valid PGP signature")


@needs_gpg
def test_sif_under_the_policy_is_mounted_from_the_checked_file(as_user, test_user, pgp, site_config, shared_dir):
    # a node-local broadcast copy exists: the SIF still runs, from the file its signature was checked on
    policy = site_config("require_signature = yes\nsif_keyring = %s\n" % pgp["alice.gpg"])
    to = tempfile.mkdtemp(prefix="sign-bcast-", dir=shared_dir)
    os.chown(to, test_user.pw_uid, test_user.pw_gid)
    conf = os.path.join(pgp["dir"], "bcast.conf")
    with open(conf, "w") as f:
        f.write("broadcast_dir = %s\n" % to)
    os.chmod(conf, 0o644)
    env = {"HPCRUN_LINGER": "0", "HPCRUN_CONF": conf}
    good = pgp["make"]("bcast.sif")
    try:
        r = hpcrun(as_user, "broadcast", "--mpi", "no", "--no-job", good, env=env)
        assert r.returncode == 0, r.stderr
        assert any(n.endswith(".sqfs") for n in os.listdir(to)), os.listdir(to)
        r = hpcrun(as_user, "-v", good, "echo", "ok", prefix=policy, env=env)
        assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
        assert "broadcast copy" not in r.stderr
    finally:
        hpcrun(as_user, "broadcast", "--clean", "--no-job", env=env)
        _forget("/tmp/hpcrun-%d" % test_user.pw_uid, good)
        shutil.rmtree(to, ignore_errors=True)


@needs_gpg
def test_verify_keyring_on_hostile_sif_descriptors(as_user, pgp, busybox_squashfs):
    # test_hostile.py's malformed SIFs, through verify --keyring: one line, 65 or 77, printable output
    import siftools
    from test_hostile import SIF_CASES, _sif_patch
    with open(busybox_squashfs, "rb") as f:
        payload = f.read()
    for kind, (extra, patches, _) in sorted(SIF_CASES.items()):
        objects = [siftools.partition(payload)]
        if extra == "meta":
            objects.append(siftools.obj(siftools.GENERIC_JSON, b"{}", name="inspect-metadata.json"))
        elif extra is not None:
            objects.append(siftools.obj(siftools.SIGNATURE, b"-----BEGIN PGP SIGNED MESSAGE-----\n"
                                        if extra == "sig" else extra, extra=b"\1\0\0\0" + b"\xab" * 20))
        img = siftools.write(os.path.join(pgp["dir"], "hostile-%s.sif" % kind), objects)
        for at, value in patches:
            _sif_patch(img, at, value)
        r = hpcrun(as_user, "verify", "--keyring", pgp["alice.gpg"], img)
        assert r.returncode in (errors.DATA, errors.NOPERM), (kind, r.returncode, r.stderr)
        assert_one_error(r, r.returncode)
        assert all(line.isprintable() for line in r.stdout.splitlines()) and "good" not in r.stdout, (kind, r.stdout)
