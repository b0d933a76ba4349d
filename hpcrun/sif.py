"""Read the descriptor table of a Singularity/Apptainer SIF file.

We use the primary system partition (a SquashFS) in place, at its offset;
nothing else in the file (signatures, deffile, OCI blobs) is needed to run.
`inspect` lists the signature objects (signatures(): PGP or DSSE, the key that
claims to have signed, what they sign) without checking them, and shows the
metadata `apptainer inspect` shows (metadata()): Apptainer's build stores it
as a generic JSON object named inspect-metadata.json ({"data": {"attributes":
{"labels", "environment", "runscript", "helpfile", "deffile", ...}}, "type":
"container"}), and the definition file as a Def.FILE object.
Layout from apptainer/sif v2 (pkg/sif): a fixed little-endian header, then
DescriptorsTotal descriptors of 585 bytes each.
"""
from hpcrun import rankos as os     # os without its import cost (rankos.py)
import struct

from hpcrun import errors

MAGIC = b"SIF_MAGIC\0"
_HEADER = struct.Struct("<32s10s3s3s16s8q")
_DESCR = struct.Struct("<iBIIIqqqqqqq128s384s")
_PARTITION = struct.Struct("<ii3s")

DATA_DEFFILE = 0x4001
DATA_LABELS = 0x4003
DATA_PARTITION = 0x4004
DATA_SIGNATURE = 0x4005
DATA_GENERIC_JSON = 0x4006
INSPECT_METADATA = "inspect-metadata.json"
METADATA_LIMIT = 16 << 20          # a metadata object larger than this is not read
GROUP_MASK = 0xf0000000
HASH_NAMES = {1: "sha256", 2: "sha384", 3: "sha512", 4: "blake2s-256", 5: "blake2b-256"}
SIGNATURE_MAX = 1 << 20
SIGNATURES_READ_MAX = 16 << 20     # bytes of signature objects inspect reads in all (100000 descriptors may share one)
FS_SQUASH = 1
PART_PRIMSYS = 2
FS_NAMES = {1: "squashfs", 2: "ext3", 3: "immutable object", 4: "raw", 5: "encrypted squashfs"}


def is_sif(first_bytes):
    return first_bytes[32:42] == MAGIC


def _descriptors(path, fd, file_size):
    """The used descriptors, as _DESCR tuples."""
    head = os.pread(fd, _HEADER.size, 0)
    if len(head) < _HEADER.size:
        raise errors.Error(errors.DATA, "truncated SIF header", path)
    fields = _HEADER.unpack(head)
    version = fields[2].rstrip(b"\0")
    if version not in (b"01",):
        raise errors.Error(errors.DATA, "unsupported SIF version %s" % version.decode("ascii", "replace"), path)
    total, descr_off, descr_size = fields[8], fields[9], fields[10]
    if total < 0 or total > 100000 or descr_off < 0 or descr_off + total * _DESCR.size > file_size:
        raise errors.Error(errors.DATA, "corrupt SIF descriptor table", path)
    table = os.pread(fd, total * _DESCR.size, descr_off)
    descriptors = (_DESCR.unpack_from(table, i * _DESCR.size) for i in range(total))
    return [d for d in descriptors if d[1]]


def primary_partition(path, fd, file_size):
    """Return (offset, size) of the primary SquashFS system partition."""
    found = []
    for d in _descriptors(path, fd, file_size):
        dtype, offset, size, extra = d[0], d[5], d[6], d[13]
        if dtype != DATA_PARTITION:
            continue
        fstype, parttype, _arch = _PARTITION.unpack_from(extra)
        if parttype == PART_PRIMSYS:
            found.append((fstype, offset, size))
    if not found:
        raise errors.Error(errors.DATA, "SIF file has no primary system partition (nothing to run)", path)
    fstype, offset, size = found[0]
    if fstype != FS_SQUASH:
        raise errors.Error(errors.DATA, "SIF primary partition is %s, only squashfs is supported"
                           % FS_NAMES.get(fstype, "type %d" % fstype), path)
    if offset <= 0 or size <= 0 or offset + size > file_size:
        raise errors.Error(errors.DATA, "truncated SIF: partition ends at byte %d, file has %d"
                           % (offset + size, file_size), path)
    if os.pread(fd, 4, offset) != b"hsqs":
        raise errors.Error(errors.DATA, "corrupt SIF: no SquashFS at partition offset %d" % offset, path)
    return offset, size


def signatures(path, fd, file_size):
    """The SIF's signature objects, as claimed: [{kind: pgp|dsse|unknown,
    hash, signs, keys}].  keys: the PGP key fingerprint the descriptor names,
    or the DSSE envelope's keyids.  Nothing is verified here."""
    import json
    out = []
    budget = SIGNATURES_READ_MAX
    for d in _descriptors(path, fd, file_size):
        if d[0] != DATA_SIGNATURE:
            continue
        linked, offset, size, extra = d[4], d[5], d[6], d[13]
        hash_type = int.from_bytes(extra[:4], "little")
        entity = extra[4:24]
        sig = {"kind": "unknown", "hash": HASH_NAMES.get(hash_type, "type %d" % hash_type),
               "signs": ("object group %d" % (linked & ~GROUP_MASK)) if linked & GROUP_MASK
               else "object %d" % linked, "keys": []}
        readable = 0 < size <= min(SIGNATURE_MAX, budget) and 0 <= offset <= file_size - size
        data = os.pread(fd, size, offset) if readable else b""
        budget -= len(data)
        if data.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----"):
            sig["kind"] = "pgp"
            if any(entity):
                sig["keys"] = [entity.hex().upper()]
        elif data.startswith(b"{"):
            try:
                envelope = json.loads(data)
                sigs = envelope.get("signatures", [])
                sig["kind"] = "dsse"
                payload_type = envelope.get("payloadType")
                sig["payload_type"] = None if payload_type is None else _shown(str(payload_type))
                sig["keys"] = [_shown(str(s.get("keyid"))) for s in (sigs if isinstance(sigs, list) else [])
                               if isinstance(s, dict)]
            except (ValueError, AttributeError):
                pass
        out.append(sig)
    return out


def _shown(text):
    """A claimed name as inspect may print it: no line breaks or terminal escapes."""
    return text if text.isprintable() else ascii(text)


def metadata(path):
    """What `apptainer inspect --all` shows, from the SIF's objects, without
    mounting: {"labels": {}, "environment": {script path: text}, "runscript",
    "helpfile", "deffile", "test", "startscript"} (absent keys: not recorded).
    A metadata object that is not valid JSON is error 65."""
    import json
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        objects = [(d[0], d[5], d[6], d[12].split(b"\0", 1)[0].decode("utf-8", "replace"))
                   for d in _descriptors(path, fd, size)]

        budget = [METADATA_LIMIT]         # in all: many descriptors may name one large object

        def read(offset, length, what):
            if offset < 0 or length < 0 or offset + length > size:
                raise errors.Error(errors.DATA, "truncated SIF: %s object beyond the end of the file" % what, path)
            if length > budget[0]:
                raise errors.Error(errors.DATA, "SIF %s object too large (%d bytes; metadata objects take at "
                                   "most %d in all)" % (what, length, METADATA_LIMIT), path)
            budget[0] -= length
            return os.pread(fd, length, offset)

        attrs = {}
        for dtype, offset, length, name in objects:
            if dtype == DATA_GENERIC_JSON and name == INSPECT_METADATA:
                try:
                    doc = json.loads(read(offset, length, name).decode("utf-8"))
                    a = doc.get("data", {}).get("attributes", {})
                except (ValueError, AttributeError) as e:
                    raise errors.Error(errors.DATA, "corrupt SIF: %s is not valid metadata JSON (%s)"
                                       % (name, e), path)
                if isinstance(a, dict):
                    attrs.update(a)
        for dtype, offset, length, name in objects:
            if dtype == DATA_DEFFILE and not attrs.get("deffile"):
                attrs["deffile"] = read(offset, length, "definition file").decode("utf-8", "replace")
            elif dtype == DATA_LABELS and not attrs.get("labels"):
                try:
                    attrs["labels"] = json.loads(read(offset, length, "labels").decode("utf-8"))
                except ValueError as e:
                    raise errors.Error(errors.DATA, "corrupt SIF: labels object is not JSON (%s)" % e, path)
    finally:
        os.close(fd)
    out = {}
    for k in ("labels", "environment", "runscript", "helpfile", "deffile", "test", "startscript"):
        v = attrs.get(k)
        if k in ("labels", "environment"):
            if isinstance(v, dict) and v:
                out[k] = {str(a): str(b) for a, b in v.items()}
        elif isinstance(v, str) and v:
            out[k] = v
    return out
