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
from hpcrun import rankos as os     # os without its import cost (rankos.py)

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


_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdef")


def _number(field):
    """A header number: ASCII digits only (int() would take '+1', '1_0', ' 1')."""
    if not field or len(field) > 19 or not _DIGITS.issuperset(field):
        raise ValueError(field)
    return int(field)


def read_header(path, fd=None, file_size=None):
    """Parse and bounds-check the header; raise errors.Error(DATA) on any defect.

    Checked here, without json (the launch path reads this): the fixed line is
    exactly five fields of the right form (the digest 64 lowercase hex digits,
    as it names files in the run directory), the payload offset is page
    aligned and leaves room for the header, the payload lies inside the file
    and starts with a SquashFS magic, and the metadata line is one line of
    printable UTF-8 between braces, followed only by NUL padding.  Whether the
    metadata is valid JSON is checked by Header.meta() (inspect, --dry-run)
    and by the node's keeper (stage.py), once per node."""
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if file_size is None:
            file_size = os.fstat(fd).st_size
        head = os.pread(fd, PAGE, 0)
        nl1 = head.find(b"\n")
        nl2 = head.find(b"\n", nl1 + 1)
        if nl1 < 0 or nl2 < 0 or not head[nl1 + 1:].startswith(MAGIC + b" "):
            raise errors.Error(errors.DATA, "not an hpcrun image: bad header", path)
        fields = head[nl1 + 1:nl2].split(b" ")
        if len(fields) != 5:
            raise errors.Error(errors.DATA, "corrupt image header: expected 5 fields", path)
        h = Header()
        try:
            h.version = _number(fields[1])
            h.offset = _number(fields[2])
            h.size = _number(fields[3])
        except ValueError:
            raise errors.Error(errors.DATA, "corrupt image header: version, offset and size must be numbers", path)
        if len(fields[4]) != 64 or not _HEX.issuperset(fields[4]):
            raise errors.Error(errors.DATA, "corrupt image header: the sha256 is not 64 hex digits", path)
        h.sha256 = fields[4].decode("ascii")
        if h.version != VERSION:
            raise errors.Error(errors.DATA, "unsupported image format version %d "
                               "(this hpcrun reads version %d)" % (h.version, VERSION), path)
        if h.offset < PAGE or h.offset % PAGE or h.offset > HEADER_MAX:
            raise errors.Error(errors.DATA, "corrupt image header: payload offset %d is not a multiple of %d "
                               "between %d and %d" % (h.offset, PAGE, PAGE, HEADER_MAX), path)
        if h.size <= 0:
            raise errors.Error(errors.DATA, "corrupt image header: payload size is 0", path)
        if h.offset + h.size > file_size:
            raise errors.Error(errors.DATA, "truncated image: payload ends at byte %d, file has %d"
                               % (h.offset + h.size, file_size), path)
        if h.offset > PAGE:
            head = os.pread(fd, h.offset, 0)
        end = head.find(b"\n", nl2 + 1)
        meta = head[nl2 + 1:end] if end > 0 else b""
        if (end < 0 or not meta.startswith(b"{") or not meta.endswith(b"}")
                or head[end + 1:h.offset] != bytes(h.offset - end - 1) or not _printable(meta)):
            raise errors.Error(errors.DATA, "corrupt image header: bad metadata line", path)
        if os.pread(fd, 4, h.offset) != SQUASHFS_MAGIC:
            raise errors.Error(errors.DATA, "corrupt image: no SquashFS payload at offset %d"
                               % h.offset, path)
        h.meta_raw = meta
        return h
    finally:
        if own:
            os.close(fd)


_CONTROL = bytes(range(32)) + b"\x7f"


def _printable(raw):
    """UTF-8 without control characters (json.dumps writes none: it escapes them)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return len(raw.translate(None, _CONTROL)) == len(raw)


def check_meta(path, h):
    """The metadata line parsed; a line that is not a JSON object is error 65."""
    import json
    try:
        meta = json.loads(h.meta_raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise errors.Error(errors.DATA, "corrupt image header: the metadata line is not a JSON object", path)
    return meta


def identity(kind, st):
    """What an image file is, not what it says (st: its stat): a changed file
    (ctime moves on every write, chmod or rename over it) is another image."""
    return "%s:%d:%d:%d:%d:%d" % (kind, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_digest(path, claimed, actual):
    if actual != claimed:
        raise errors.Error(errors.DATA, "image payload does not match its header: sha256 %s..., header claims %s..."
                           % (actual[:16], claimed[:16]), path)


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
