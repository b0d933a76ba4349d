"""Write SIF files by the format's own rules (apptainer/sif v2, pkg/sif).

Layout: a 128-byte header, a table of `total` descriptors (585 bytes each)
at 4096, then the data objects, each aligned (partitions at 4096 by
default); a descriptor's size_with_padding counts the gap before its object.
test_sif.py checks this writer by rebuilding /work/shared/data/sif/
one-group.sif byte for byte from its parts.

An Apptainer build writes: a Def.FILE object, a generic JSON object named
inspect-metadata.json ({"data": {"attributes": ...}, "type": "container"}),
and the root file system as the primary system partition (SquashFS), whose
/.singularity.d holds runscript, env/*.sh, labels.json, runscript.help.

`apptainer sign` (PGP) adds a signature object per object group: pgp_body()
is the JSON it signs (apptainer/sif pkg/integrity: digests of the header's
launch/magic/version/ID, of each object's descriptor fields and data),
pgp_signature() the object, clear-signed by a real gpg.  test_sif.py checks
pgp_body against the body of /work/shared/data/sif/one-group-signed-pgp.sif.
"""
import hashlib
import json
import os
import struct
import subprocess

HEADER = struct.Struct("<32s10s3s3s16s8q")
DESCR = struct.Struct("<iBIIIqqqqqqq128s384s")
PARTITION = struct.Struct("<ii3s")
LAUNCH = b"#!/usr/bin/env run-singularity\n"
GO_ZERO_TIME = -62135596800            # Go's time.Time{} in Unix seconds: what deterministic images carry

DEFFILE, ENVVAR, LABELS, PARTITION_T, SIGNATURE, GENERIC_JSON = 0x4001, 0x4002, 0x4003, 0x4004, 0x4005, 0x4006
FS_SQUASH, FS_RAW = 1, 4
PART_SYSTEM, PART_PRIMSYS = 1, 2
ARCH = {"386": b"01", "amd64": b"02", "arm": b"03", "arm64": b"04"}
GROUP = 0xF0000000


def obj(dtype, data, name="", align=1, group=1, link=0, extra=b""):
    return {"type": dtype, "data": data, "name": name, "align": align, "group": group, "link": link,
            "extra": extra}


def partition(data, fstype=FS_SQUASH, parttype=PART_PRIMSYS, arch="amd64", **kw):
    kw.setdefault("align", 4096)
    return obj(PARTITION_T, data, extra=PARTITION.pack(fstype, parttype, ARCH[arch] + b"\0"), **kw)


def write(path, objects, total=48, launch=LAUNCH, ident=b"\0" * 16, when=GO_ZERO_TIME):
    descr_off = 4096
    data_off = descr_off + total * DESCR.size
    table, blobs, cur = [], [], data_off
    for i, o in enumerate(objects, 1):
        off = -(-cur // o["align"]) * o["align"]
        size = len(o["data"])
        table.append(DESCR.pack(o["type"], 1, i, GROUP | o["group"] if o["group"] else 0, o["link"], off, size,
                                off - cur + size, when, when, 0, 0, o["name"].encode(), o["extra"]))
        blobs.append((off, o["data"]))
        cur = off + size
    # the header's arch is the primary partition's ("00" without one)
    prim = [o["extra"][8:11] for o in objects if o["type"] == PARTITION_T and o["extra"][4:8] == b"\2\0\0\0"]
    head = HEADER.pack(launch, b"SIF_MAGIC\0", b"01\0", prim[0] if prim else b"00\0", ident,
                       when, when, total - len(objects), total, descr_off, total * DESCR.size, data_off,
                       cur - data_off)
    with open(path + ".tmp", "wb") as f:
        f.write(head)
        f.seek(descr_off)
        f.write(b"".join(table))
        f.write(b"\0" * (total - len(table)) * DESCR.size)
        for off, data in blobs:
            f.seek(off)
            f.write(data)
        f.truncate(max(cur, data_off))
    os.chmod(path + ".tmp", 0o755)
    os.rename(path + ".tmp", path)
    return path


def apptainer_tree(root, runscript=None, env=None, labels=None, helpfile=None):
    """Add what `apptainer build` writes under /.singularity.d to root.
    env: {"90-environment.sh": text, ...}; runscript: %runscript body."""
    sd = os.path.join(root, ".singularity.d")
    os.makedirs(os.path.join(sd, "env"), exist_ok=True)
    os.makedirs(os.path.join(sd, "libs"), exist_ok=True)
    os.makedirs(os.path.join(sd, "actions"), exist_ok=True)
    files = {"env/01-base.sh": "#!/bin/sh\n# \n",
             "env/99-base.sh": '#!/bin/sh\n# \nif [ -z "$LD_LIBRARY_PATH" ]; then\n'
                               '    LD_LIBRARY_PATH="/.singularity.d/libs"\nelse\n'
                               '    LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/.singularity.d/libs"\nfi\n'
                               'PS1="Apptainer> "\nexport LD_LIBRARY_PATH PS1\n',
             "labels.json": json.dumps(labels or {}, indent=1)}
    for name, text in (env or {}).items():
        files["env/" + name] = text
    if runscript is not None:
        files["runscript"] = "#!/bin/sh\n\n" + runscript
    if helpfile is not None:
        files["runscript.help"] = helpfile
    for name, text in files.items():
        p = os.path.join(sd, name)
        with open(p, "w") as f:
            f.write(text)
        os.chmod(p, 0o755 if name == "runscript" or name.startswith("env/") else 0o644)
    return files


def apptainer_sif(path, root, deffile, attributes, squashfs=None):
    """A SIF as Apptainer builds one: Def.FILE, inspect-metadata.json, the root as SquashFS."""
    sq = squashfs or path + ".sqfs"
    if squashfs is None:
        subprocess.run(["mksquashfs", root, sq, "-noappend", "-quiet", "-all-root", "-no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
    with open(sq, "rb") as f:
        fs = f.read()
    if squashfs is None:
        os.unlink(sq)
    meta = {"data": {"attributes": attributes}, "type": "container"}
    objects = [obj(DEFFILE, deffile.encode()),
               obj(GENERIC_JSON, json.dumps(meta).encode(), name="inspect-metadata.json"),
               partition(fs)]
    return write(path, objects)


def pgp_body(objects, group=1, launch=LAUNCH, ident=b"\0" * 16, when=GO_ZERO_TIME, digest="sha256", ids=None):
    """The text Apptainer signs for object group `group` of write(objects)
    (ids: only these object IDs, as `apptainer sign --sif-id` does)."""
    def h(data):
        return "%s:%s" % (digest, hashlib.new(digest, data).hexdigest())
    members = [(i, o) for i, o in enumerate(objects, 1) if o["group"] == group]
    first = min(i for i, _ in members)
    entries = []
    for i, o in members:
        if o["type"] == SIGNATURE or (ids is not None and i not in ids):
            continue
        fields = struct.pack("<iBIIqqqq", o["type"], 1, i - first, o["link"], len(o["data"]), when, 0, 0)
        fields += o["name"].encode().ljust(128, b"\0") + o["extra"].ljust(384, b"\0")
        entries.append({"relativeId": i - first, "descriptorDigest": h(fields), "objectDigest": h(o["data"])})
    header = launch.ljust(32, b"\0") + b"SIF_MAGIC\0" + b"01\0" + ident
    return json.dumps({"version": 1, "header": {"digest": h(header)}, "objects": entries}, separators=(",", ":"))


def clearsign(text, gnupghome, fingerprint, when=None):
    return subprocess.run(["gpg", "--batch", "--quiet", "--homedir", gnupghome, "--local-user", fingerprint,
                           "--digest-algo", "SHA256"] + (["--faked-system-time", when] if when else [])
                          + ["--clearsign"], input=text.encode(), check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE).stdout


def pgp_signature(signed, fingerprint, group=1, link=None):
    """The signature object for a clear-signed body: ungrouped, linked to the
    group (or to object `link`), extra = hash type (1: SHA-256) + the key's
    fingerprint."""
    return obj(SIGNATURE, signed, group=GROUP, link=link if link is not None else GROUP | group,
               extra=struct.pack("<i", 1) + bytes.fromhex(fingerprint))


def gpg_key(gnupghome, name, expire="never", when=None):
    """A fresh ed25519 signing key (no passphrase) in gnupghome: its
    fingerprint.  when: gpg's --faked-system-time (20200101T000000), for a
    key that has expired by now."""
    os.makedirs(gnupghome, mode=0o700, exist_ok=True)
    subprocess.run(["gpg", "--batch", "--quiet", "--homedir", gnupghome, "--passphrase", ""]
                   + (["--faked-system-time", when] if when else [])
                   + ["--quick-gen-key", "%s <%s@site>" % (name, name), "ed25519", "sign", expire],
                   check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = subprocess.run(["gpg", "--batch", "--homedir", gnupghome, "--with-colons", "--list-keys", name],
                         check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE).stdout.decode()
    return [ln.split(":")[9] for ln in out.splitlines() if ln.startswith("fpr:")][0]


def revoke_key(gnupghome, fingerprint):
    """Import the revocation certificate gpg made with the key (its armor
    line starts with ':' so that it is not imported by mistake)."""
    with open(os.path.join(gnupghome, "openpgp-revocs.d", fingerprint + ".rev"), "rb") as f:
        cert = f.read().replace(b"\n:-----BEGIN", b"\n-----BEGIN")
    subprocess.run(["gpg", "--batch", "--quiet", "--homedir", gnupghome, "--import"], input=cert, check=True,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def export_key(gnupghome, fingerprint, path, armor=False):
    with open(path, "wb") as f:
        f.write(subprocess.run(["gpg", "--batch", "--homedir", gnupghome, "--export"] + (["--armor"] if armor else [])
                               + [fingerprint], check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE).stdout)
    return path
