"""The hpcrun image file: one page of header, then a SquashFS payload.

Layout (docs/design.md, "Image format", is the user-facing description)::

    #!/usr/bin/env -S hpcrun run\\n                  <- ./image.img args runs the runscript
    HPCRUN-IMAGE <version> <offset> <size> <sha256>\\n  <- fixed fields, parsed without json
    {"created": ..., "runscript": ..., ...}\\n        <- metadata (JSON, one line)
    NUL padding up to <offset> (a multiple of 4096)
    SquashFS payload (<size> bytes)

The fixed line is what the launch path reads: it is split on spaces, so a
launch never imports json.  The metadata line is a copy of the payload's
/.hpcrun/image.json for `inspect` and `--dry-run`, which must not mount.
"""
import os

from hpcrun import errors

SHEBANG = b"#!/usr/bin/env -S hpcrun run\n"
MAGIC = b"HPCRUN-IMAGE"
VERSION = 1
PAGE = 4096
HEADER_MAX = 1 << 20      # refuse absurd headers before reading them
SQUASHFS_MAGIC = b"hsqs"


class Header:
    __slots__ = ("version", "offset", "size", "sha256", "meta_raw")

    def meta(self):
        import json
        try:
            return json.loads(self.meta_raw or b"{}")
        except ValueError:
            return {}


def is_hpcrun_image(first_bytes):
    return first_bytes.startswith(SHEBANG[:2]) and MAGIC in first_bytes[:256]


def read_header(path, fd=None, file_size=None):
    """Parse and bounds-check the header; raise errors.Error on any defect."""
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if file_size is None:
            file_size = os.fstat(fd).st_size
        head = os.pread(fd, PAGE, 0)
        nl1 = head.find(b"\n")
        nl2 = head.find(b"\n", nl1 + 1)
        if nl1 < 0 or nl2 < 0 or not head[nl1 + 1:].startswith(MAGIC):
            raise errors.Error(errors.DATA, "not an hpcrun image: bad header", path)
        fields = head[nl1 + 1:nl2].split()
        if len(fields) != 5:
            raise errors.Error(errors.DATA, "corrupt image header", path)
        h = Header()
        try:
            h.version = int(fields[1])
            h.offset = int(fields[2])
            h.size = int(fields[3])
        except ValueError:
            raise errors.Error(errors.DATA, "corrupt image header", path)
        h.sha256 = fields[4].decode("ascii", "replace")
        if h.version != VERSION:
            raise errors.Error(errors.DATA, "unsupported image format version %d "
                               "(this hpcrun reads version %d)" % (h.version, VERSION), path)
        if (h.offset < PAGE or h.offset % PAGE or h.offset > HEADER_MAX or h.size <= 0
                or len(h.sha256) != 64):
            raise errors.Error(errors.DATA, "corrupt image header", path)
        if h.offset + h.size > file_size:
            raise errors.Error(errors.DATA, "truncated image: payload ends at byte %d, file has %d"
                               % (h.offset + h.size, file_size), path)
        if os.pread(fd, 4, h.offset) != SQUASHFS_MAGIC:
            raise errors.Error(errors.DATA, "corrupt image: no SquashFS payload at offset %d"
                               % h.offset, path)
        end = head.find(b"\n", nl2 + 1)
        if end < 0 and h.offset > PAGE:
            end_block = os.pread(fd, h.offset, 0)
            end = end_block.find(b"\n", nl2 + 1)
            head = end_block
        h.meta_raw = head[nl2 + 1:end] if end > 0 else b""
        return h
    finally:
        if own:
            os.close(fd)


def write_image(out_path, squashfs_path, meta, mode=0o755):
    """Write an image to out_path atomically: temp file in the same directory,
    fsync, rename.  A failed or interrupted write leaves no out_path behind."""
    import hashlib
    import json
    import tempfile

    size = os.stat(squashfs_path).st_size
    digest = hashlib.sha256()
    with open(squashfs_path, "rb") as f:
        if f.read(4) != SQUASHFS_MAGIC:
            raise errors.Error(errors.DATA, "not a SquashFS file", squashfs_path)
        f.seek(0)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    meta_line = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    fixed = b"%s %d %%d %d %s\n" % (MAGIC, VERSION, size, digest.hexdigest().encode())
    used = len(SHEBANG) + len(fixed) + 16 + len(meta_line)
    offset = (used + PAGE - 1) // PAGE * PAGE
    header = SHEBANG + fixed % offset + meta_line
    header += b"\0" * (offset - len(header))

    out_dir = os.path.dirname(os.path.abspath(out_path))
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(out_path), dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as out, open(squashfs_path, "rb") as src:
            out.write(header)
            for block in iter(lambda: src.read(1 << 20), b""):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode & ~_umask())
        os.rename(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return digest.hexdigest()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m
