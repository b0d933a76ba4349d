"""hpcrun inspect [--json] IMAGE: what an image is, without mounting it.

hpcrun images carry their metadata in the header, directories in
/.hpcrun/image.json, SIF files in their own metadata objects (labels,
runscript, %environment, help, definition file: what `apptainer inspect
--all` shows, under "apptainer"); for plain SquashFS files the metadata is
inside the filesystem, and inspect says so instead of mounting.

Signatures (hpcrun sign; a SIF's PGP and DSSE objects) are listed with the
key that made them and the name the signer gave, as claimed: hpcrun verify
checks them (a SIF's PGP ones with --keyring).

An hpcrun image's header claims the sha256 of its payload; inspect shows it
as claimed unless --verify reads the payload and checks it (a mismatch is
error 65, as when a launch stages it).
"""
import argparse
import json
import sys

from hpcrun import errors, image


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise errors.Error(errors.USAGE, message, self.prog)


def describe(path, verify=False):
    img = image.open_image(path)
    meta = img.meta()
    d = {"path": img.path, "format": img.kind,
         "size": img.st.st_size if img.kind != "dir" else None,
         "payload": None if img.kind == "dir" else {"offset": img.offset, "size": img.size},
         "sha256_claimed": img.digest, "sha256_verified": False, "pin": img.pin,
         "labels": meta.get("labels") or {}, "runscript": meta.get("runscript"),
         "env": meta.get("env") or [], "mpi": meta.get("mpi"), "build": meta.get("build"),
         "workdir": meta.get("workdir"), "image_user": meta.get("image_user")}
    if img.kind in ("hpcrun", "sif"):
        d["signatures"] = _signatures(img)
    if img.kind == "squashfs":
        d["note"] = "metadata of a %s image lives inside its filesystem; not read without mounting" % img.kind
    if img.kind == "sif":
        from hpcrun import sif
        a = sif.metadata(img.path)
        d["apptainer"] = a
        d["labels"] = d["labels"] or a.get("labels") or {}
    if verify and img.digest:
        verify_payload(img)
        d["sha256_verified"] = True
    return d


def _signatures(img):
    """An hpcrun image's trailer signatures (hpcrun verify checks them) or a
    SIF's signature objects, as claimed."""
    import os
    from hpcrun import imagefile, signature, sif
    fd = os.open(img.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if img.kind == "sif":
            return sif.signatures(img.path, fd, size)
        return [sig.describe() for sig in
                signature.read_signatures(img.path, fd, imagefile.read_header(img.path, fd, size), size)]
    finally:
        os.close(fd)


def verify_payload(img):
    """Read the payload and compare its sha256 with the header's claim."""
    import hashlib
    from hpcrun import imagefile
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(img.path, "rb", buffering=0) as f:
        f.seek(img.offset)
        left = img.size
        while left:
            n = f.readinto(view[:min(left, len(buf))])
            if not n:
                raise errors.Error(errors.DATA, "truncated image: payload ends early", img.path)
            h.update(view[:n])
            left -= n
    imagefile.check_digest(img.path, img.digest, h.hexdigest())


def main(argv):
    p = Parser(prog="hpcrun inspect", description="Show an image's format, digest and metadata.")
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    p.add_argument("--verify", action="store_true",
                   help="read the payload and check the sha256 its header claims (error 65 if it differs)")
    p.add_argument("image", metavar="IMAGE")
    args = p.parse_args(argv)
    d = describe(args.image, args.verify)
    if args.json:
        json.dump(d, sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    out = ["image:      %s" % d["path"], "format:     %s" % d["format"]]
    if d["size"] is not None:
        out.append("size:       %s (payload %d bytes at offset %d)" % (_human(d["size"]), d["payload"]["size"],
                                                                        d["payload"]["offset"]))
    if d["sha256_claimed"]:
        out.append("sha256:     %s (%s)" % (d["sha256_claimed"], "verified: the payload matches" if d["sha256_verified"]
                                          else "claimed by the header, not checked; --verify checks it"))
    if d["pin"] and not d["pin"].startswith("sha256:"):
        out.append("pin:        %s (for --image-digest)" % d["pin"])
    if d.get("signatures") and d["format"] == "sif":
        out.append("signed by:  (SIF signature objects, claimed, not checked; hpcrun verify --keyring checks "
                   "PGP ones)")
        out += ["  %s %s (%s), signs %s" % (sg["kind"].upper(), ", ".join(sg["keys"]) or "(no key named)",
                                            sg["hash"], sg["signs"]) for sg in d["signatures"]]
    elif d.get("signatures"):
        out.append("signed by:  (claimed, not checked; hpcrun verify checks them)")
        out += ["  %s (%s %s)" % (sg["signer_claimed"] or "no name given", sg["key_type"], sg["fingerprint"])
                for sg in d["signatures"]]
    elif d["format"] in ("hpcrun", "sif"):
        out.append("signed by:  (not signed)")
    if d.get("note"):
        out.append("note:       %s" % d["note"])
    if d["runscript"] or not (d.get("apptainer") or {}).get("runscript"):
        out.append("runscript:  %s" % (" ".join(d["runscript"]) if d["runscript"] else "(none)"))
    if d.get("workdir"):
        out.append("workdir:    %s (hpcrun run starts there)" % d["workdir"])
    if d.get("image_user"):
        out.append("image USER: %s (not switched to: the user inside is the user outside)" % d["image_user"])
    if d["labels"]:
        out.append("labels:")
        out += ["  %s = %s" % kv for kv in sorted(d["labels"].items())]
    if d["env"]:
        out.append("environment:")
        out += ["  %s=%s" % (k, v) for k, v in d["env"]]
    a = d.get("apptainer")
    if a is not None:
        for key, title in (("runscript", "apptainer runscript"), ("helpfile", "apptainer help"),
                           ("test", "apptainer test"), ("deffile", "definition file")):
            if a.get(key):
                out.append("%s:" % title)
                out += ["  | " + line for line in a[key].rstrip("\n").splitlines()]
        for script, text in sorted(a.get("environment", {}).items()):
            out.append("apptainer environment (%s):" % script)
            out += ["  | " + line for line in text.rstrip("\n").splitlines()]
    m = d["mpi"]
    if m:
        out.append("MPI ABI:    %s %s (%s); programs: %s" % (m.get("flavor"), m.get("version", "?"),
                                                        m.get("soname"), " ".join(m.get("programs", []))))
    else:
        out.append("MPI ABI:    (no MPI program recorded)")
    b = d["build"]
    if b:
        out.append("built:      %s on %s with hpcrun %s%s" % (b.get("date"), b.get("host"), b.get("hpcrun_version"),
                                                            ", from " + b["from"] if b.get("from") else ""))
        if b.get("spec"):
            out.append("spec:")
            out += ["  | " + line for line in b["spec"].rstrip("\n").splitlines()]
    print("\n".join(_shown(line) for line in out))
    return 0


def _shown(line):
    """A line as the terminal may get it: an image's labels, scripts and
    names can hold escape sequences or line breaks that would forge output."""
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() or c == "\t" else ascii(c)[1:-1] for c in line)


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
