"""Read /etc/ld.so.cache the way glibc's loader does (stdlib only).

    ldcache.read()               # {"libc.so.6": ["/lib/x86_64-linux-gnu/libc.so.6"], ...}
    ldcache.find("libm.so.6")    # first path, or None

Only the "glibc-ld.so.cache1.1" format is parsed (what ldconfig writes since
glibc 2.32, and the part appended to old-format caches before that).  Entries
are kept only for this machine's ABI (on x86-64: flags 0x0303, so a 32-bit
library of the same soname is never picked), in cache order, which is the
loader's preference order.
"""
import os
import struct

from hpcrun import errors, fdio

DEFAULT = "/etc/ld.so.cache"
MAGIC_NEW = b"glibc-ld.so.cache1.1"
_HEADER = struct.Struct("<20sIIB3xI12x")       # magic+version, nlibs, len_strings, flags, ext offset
_ENTRY = struct.Struct("<iIIIQ")               # flags, key, value, osversion, hwcap
FLAG_ELF_LIBC6 = 0x0003
FLAG_TYPE_MASK = 0x00ff
FLAG_REQUIRED_MASK = 0xff00
# the ABI bits ldconfig stores for each 64-bit architecture (glibc elf/ldconfig.h)
_ARCH_FLAGS = {"x86_64": 0x0300, "aarch64": 0x0a00, "ppc64le": 0x0500, "ppc64": 0x0500,
               "s390x": 0x0400, "riscv64": 0x1100, "i686": 0x0000, "i386": 0x0000}

_cache = {}


def read(path=DEFAULT, machine=None):
    """soname -> [paths] for this machine's ABI; {} when the cache is missing."""
    key = (path, machine)
    if key in _cache:
        return _cache[key]
    try:
        with fdio.open_regular(path) as f:      # the image's cache may be a FIFO
            data = f.read()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise errors.Error(errors.NOINPUT, "cannot read loader cache: %s" % e.strerror, path)
    want = _ARCH_FLAGS.get(machine or os.uname().machine)
    result = {}
    start = data.find(MAGIC_NEW)
    if start < 0:
        raise errors.Error(errors.DATA, "unsupported loader cache format (no %s section)"
                           % MAGIC_NEW.decode(), path)
    try:
        _, nlibs, _, _, _ = _HEADER.unpack_from(data, start)
        base = start + _HEADER.size
        for i in range(nlibs):
            flags, k, v, _, _ = _ENTRY.unpack_from(data, base + i * _ENTRY.size)
            if flags & FLAG_TYPE_MASK != FLAG_ELF_LIBC6:
                continue
            if want is not None and flags & FLAG_REQUIRED_MASK != want:
                continue
            # string offsets count from the start of the new-format section
            result.setdefault(_string(data, start + k), []).append(_string(data, start + v))
    except (struct.error, ValueError):
        raise errors.Error(errors.DATA, "corrupt loader cache", path)
    _cache[key] = result
    return result


def find(soname, path=DEFAULT):
    paths = read(path).get(soname)
    return paths[0] if paths else None


def _string(data, off):
    end = data.index(b"\0", off)
    return os.fsdecode(data[off:end])
