"""Open IMAGE and validate it before anything is mounted.

Four kinds are accepted, told apart by content, not by name:
  hpcrun   our single file (imagefile.py): SquashFS payload at a page offset
  squashfs a plain SquashFS file (offset 0)
  sif      an Apptainer/Singularity SIF: its primary SquashFS partition, in place
  dir      a directory holding a root filesystem (a "sandbox")
Every check here runs as the calling user: an image the user cannot read is
an error even when the node could mount it.

What the file claims is not what it is: an hpcrun image's header names the
sha256 of its payload, but nothing here reads the payload to check it (a rank
must not read hundreds of MB).  So an image is identified (`ident`, part of
the container key and of a staged copy's name) by what the file is: device,
inode, size, mtime and ctime; the claimed digest is checked where the payload
is read anyway, while it is staged (stage.py), and by `inspect --verify`.
"""
from hpcrun import rankos as os     # os without its import cost (rankos.py)
import _stat as stat     # stat.py's C half, all of it a rank uses (stat.py: ~0.2 M instructions more)

from hpcrun import errors, imagefile

SIF_MAGIC_AT = (32, b"SIF_MAGIC\0")          # sif.py is imported only for SIF files

# What identifies an image for pinning (docs/run.md), from bytes a launch reads
# anyway: an hpcrun image's header digest; a SIF's global header from its ID
# (a UUID new with every build) to the data section's extent (ctime, mtime,
# descriptor counts, sizes); a plain SquashFS's 96-byte superblock (mkfs time,
# inode count, bytes used, table positions).  No payload is hashed per rank.
SIF_PIN = (48, 128)
SQUASHFS_PIN = 96
PIN_FORMS = {"sha256": 64, "sif": 2 * (SIF_PIN[1] - SIF_PIN[0]), "squashfs": 2 * SQUASHFS_PIN}


class Image:
    __slots__ = ("path", "kind", "offset", "size", "ident", "digest", "meta_raw", "st", "pin")

    def describe(self):
        d = {"path": self.path, "kind": self.kind, "ident": self.ident}
        if self.kind != "dir":
            d.update(offset=self.offset, size=self.size)
        if self.digest:
            d["sha256_claimed"] = self.digest
        if self.pin:
            d["pin"] = self.pin
        return d

    def meta(self):
        """Build metadata without mounting: the header copy (hpcrun images) or
        the sandbox's /.hpcrun/image.json; {} where it needs a mount."""
        import json
        if self.kind == "hpcrun":
            return imagefile.check_meta(self.path, self)
        if self.kind == "dir":
            try:
                with open(os.path.join(self.path, ".hpcrun/image.json")) as f:
                    return json.load(f)
            except (OSError, ValueError):
                return {}
        return {}


def open_image(path):
    if not path:
        # what a job gets from `hpcrun "$HPCRUN_IMAGE" ...` with the variable unset
        raise errors.Error(errors.USAGE, "image argument is empty")
    img = Image()
    img.path = os.path.abspath(path)
    img.digest = img.pin = None
    img.meta_raw = None
    try:
        st = os.stat(img.path)
    except FileNotFoundError:
        raise errors.Error(errors.NOINPUT, "image not found", path)
    except PermissionError:
        raise errors.Error(errors.NOINPUT, "image not readable", path)
    except OSError as e:
        raise errors.Error(errors.NOINPUT, "image not accessible: %s" % e.strerror, path)
    img.st = st
    if stat.S_ISDIR(st.st_mode):
        if not os.access(img.path, os.R_OK | os.X_OK):
            raise errors.Error(errors.NOINPUT, "image directory not readable", path)
        if not os.path.isdir(os.path.join(img.path, "bin")) and not os.path.isdir(os.path.join(img.path, "usr")):
            raise errors.Error(errors.DATA, "directory does not look like a root filesystem (no bin/ or usr/)", path)
        img.kind, img.offset, img.size = "dir", 0, 0
        img.ident = "dir:%d:%d" % (st.st_dev, st.st_ino)
        return img
    if not stat.S_ISREG(st.st_mode):
        raise errors.Error(errors.DATA, "not an image: not a regular file or directory", path)
    try:
        fd = os.open(img.path, os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError:
        raise errors.Error(errors.NOINPUT, "image not readable", path)
    except OSError as e:
        raise errors.Error(errors.NOINPUT, "image not readable: %s" % e.strerror, path)
    try:
        first = os.pread(fd, 256, 0)
        if imagefile.is_hpcrun_image(first):
            h = imagefile.read_header(path, fd, st.st_size)
            img.kind, img.offset, img.size = "hpcrun", h.offset, h.size
            img.digest, img.meta_raw = h.sha256, h.meta_raw
            img.pin = "sha256:" + h.sha256
        elif first[SIF_MAGIC_AT[0]:SIF_MAGIC_AT[0] + len(SIF_MAGIC_AT[1])] == SIF_MAGIC_AT[1]:
            from hpcrun import sif
            img.kind = "sif"
            img.offset, img.size = sif.primary_partition(path, fd, st.st_size)
            img.pin = "sif:" + first[SIF_PIN[0]:SIF_PIN[1]].hex()
        elif first[:4] == imagefile.SQUASHFS_MAGIC:
            img.kind, img.offset, img.size = "squashfs", 0, st.st_size
            img.pin = "squashfs:" + first[:SQUASHFS_PIN].hex()
        elif len(first) == 0:
            raise errors.Error(errors.DATA, "not an image: empty file", path)
        else:
            raise errors.Error(errors.DATA, "not an image: unknown format", path)
        _check_superblock(path, os.pread(fd, 48, img.offset), img.size)
    finally:
        os.close(fd)
    img.ident = imagefile.identity(img.kind, st)
    return img


def _check_superblock(path, raw, size):
    """A truncated SquashFS must be refused here: the kernel would log I/O
    errors and squashfuse would fail late with EIO."""
    if len(raw) < 48:
        raise errors.Error(errors.DATA, "truncated image: SquashFS superblock incomplete", path)
    # superblock fields used: block_size u32 @12, s_major u16 @28, bytes_used u64 @40
    block_size = int.from_bytes(raw[12:16], "little")
    major = int.from_bytes(raw[28:30], "little")
    bytes_used = int.from_bytes(raw[40:48], "little")
    if major != 4 or block_size < 4096 or block_size > (1 << 20):
        raise errors.Error(errors.DATA, "corrupt image: bad SquashFS superblock", path)
    if bytes_used > size:
        raise errors.Error(errors.DATA, "truncated image: SquashFS needs %d bytes, %d present"
                           % (bytes_used, size), path)


def parse_pin(value, source):
    """A pinned identity (--image-digest, HPCRUN_IMAGE_DIGEST): KIND:HEX, as
    `hpcrun inspect` shows it under "pin"."""
    kind, sep, hexpart = value.partition(":")
    n = PIN_FORMS.get(kind)
    if (not sep or n is None or len(hexpart) != n
            or hexpart.strip("0123456789abcdef") or not hexpart.isascii()):
        raise errors.Error(errors.USAGE, "%s must be sha256:<64 hex digits> (or the sif:/squashfs: "
                           "form that `hpcrun inspect` shows as pin)" % source,
                           value if value.isprintable() else ascii(value))
    return value


def check_pin(img, wanted, environ):
    """Refuse an image that is not the one pinned, before anything is mounted.
    HPCRUN_IMAGE_DIGEST (set by the Slurm and PBS plugins at submission) pins
    the image HPCRUN_IMAGE_DIGEST_PATH names, or every image without it."""
    if wanted is None:
        wanted = environ.get("HPCRUN_IMAGE_DIGEST")
        if not wanted:
            return
        scope = environ.get("HPCRUN_IMAGE_DIGEST_PATH")
        if scope and os.path.abspath(scope) != img.path:
            return
        wanted = parse_pin(wanted, "HPCRUN_IMAGE_DIGEST")
    if img.pin != wanted:
        raise errors.Error(errors.DATA, "image is not the one pinned at submission: pinned %s, image now %s"
                           % (wanted, img.pin or "none (a directory image has no digest to pin)"), img.path)
