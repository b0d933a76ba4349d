"""Read what the dynamic loader reads from an ELF file, with the stdlib only.

    info = elf.read(path)      # ElfInfo, or None when path is not ELF at all
    info.interp                # PT_INTERP, e.g. "/lib64/ld-linux-x86-64.so.2" (None if static)
    info.needed                # DT_NEEDED sonames, in order
    info.soname                # DT_SONAME or None
    info.rpath, info.runpath   # lists of directories, "$ORIGIN" left as written
    info.machine               # "x86_64", "aarch64", ... (or "em<N>")
    elf.verneed(path)          # {"libc.so.6": {"GLIBC_2.34", ...}, ...}  (.gnu.version_r)
    elf.verdef(path)           # {"GLIBC_2.2.5", ...}                     (.gnu.version_d)
    elf.max_glibc(path)        # "2.34": the newest GLIBC_x.y the file needs, or None

Everything is found through the program headers (PT_DYNAMIC and the PT_LOAD
map), as the loader does, so stripped files without section headers work.
A file that starts with the ELF magic but is cut short or inconsistent raises
errors.Error(DATA); an unreadable one errors.Error(NOINPUT).
"""
import mmap
import struct

from hpcrun import errors, fdio

MAGIC = b"\x7fELF"
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ = 0, 1, 5, 10
DT_SONAME, DT_RPATH, DT_RUNPATH = 14, 15, 29
DT_VERDEF, DT_VERDEFNUM = 0x6ffffffc, 0x6ffffffd
DT_VERNEED, DT_VERNEEDNUM = 0x6ffffffe, 0x6fffffff
VER_FLG_BASE = 1
MACHINES = {3: "i386", 8: "mips", 20: "ppc", 21: "ppc64", 22: "s390", 40: "arm", 62: "x86_64",
            183: "aarch64", 243: "riscv"}


class ElfInfo:
    __slots__ = ("path", "is_elf", "bits", "endian", "type", "machine", "interp", "needed", "soname",
                 "rpath", "runpath", "_dyn", "_loads", "_data")

    def __repr__(self):
        return "ElfInfo(%r, machine=%s, interp=%r, needed=%r, soname=%r, rpath=%r, runpath=%r)" % (
            self.path, self.machine, self.interp, self.needed, self.soname, self.rpath, self.runpath)


def is_elf(path):
    try:
        with fdio.open_regular(path) as f:       # files in an image: never a FIFO
            return f.read(4) == MAGIC
    except OSError:
        return False


def read(path):
    """Parse path; None when it is not an ELF file (a script, data)."""
    data = _load(path)
    if data is None:
        return None
    return _parse(path, data)


def verneed(path):
    """Versions required from each library: {soname: set(version names)}."""
    info = _info_or_none(path)
    if info is None:
        return {}
    need = {}
    off, num = info._dyn.get(DT_VERNEED), info._dyn.get(DT_VERNEEDNUM, 0)
    if off is None:
        return need
    off = _file_offset(info, off)
    e = info.endian
    for _ in range(num):
        # Elf_Verneed: vn_version, vn_cnt, vn_file, vn_aux, vn_next (same in 32 and 64 bit)
        _, cnt, vfile, aux, nxt = _unpack(info, e + "HHIII", off)
        lib = _dynstr(info, vfile)
        names = need.setdefault(lib, set())
        a = off + aux
        for _ in range(cnt):
            # Elf_Vernaux: vna_hash, vna_flags, vna_other, vna_name, vna_next
            _, _, _, name, anext = _unpack(info, e + "IHHII", a)
            names.add(_dynstr(info, name))
            if not anext:
                break
            a += anext
        if not nxt:
            break
        off += nxt
    return need


def verdef(path):
    """Version names this file defines (the base entry, its own soname, left out)."""
    info = _info_or_none(path)
    if info is None:
        return set()
    defs = set()
    off, num = info._dyn.get(DT_VERDEF), info._dyn.get(DT_VERDEFNUM, 0)
    if off is None:
        return defs
    off = _file_offset(info, off)
    e = info.endian
    for _ in range(num):
        # Elf_Verdef: vd_version, vd_flags, vd_ndx, vd_cnt, vd_hash, vd_aux, vd_next
        _, flags, _, cnt, _, aux, nxt = _unpack(info, e + "HHHHIII", off)
        if cnt and not flags & VER_FLG_BASE:
            name, _ = _unpack(info, e + "II", off + aux)      # Elf_Verdaux: vda_name, vda_next
            defs.add(_dynstr(info, name))
        if not nxt:
            break
        off += nxt
    return defs


def glibc_key(version):
    """"2.34" or "GLIBC_2.34" -> (2, 34), for comparisons."""
    v = version[6:] if version.startswith("GLIBC_") else version
    try:
        return tuple(int(x) for x in v.split("."))
    except ValueError:
        return ()


def max_glibc(path):
    """The newest GLIBC_x.y version any library is asked for, as "x.y"; None if none."""
    best = None
    for names in verneed(path).values():
        for n in names:
            if n.startswith("GLIBC_") and glibc_key(n) and (best is None or glibc_key(n) > glibc_key(best)):
                best = n[6:]
    return best


def _info_or_none(path):
    return path if isinstance(path, ElfInfo) else read(path)


def _load(path):
    try:
        with fdio.open_regular(path) as f:
            if f.read(4) != MAGIC:
                return None
            # mmap: large libraries are parsed without reading them whole
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except IsADirectoryError:
        return None
    except PermissionError:
        raise errors.Error(errors.NOINPUT, "file not readable", path)
    except FileNotFoundError:
        raise errors.Error(errors.NOINPUT, "file not found", path)
    except OSError as e:
        raise errors.Error(errors.NOINPUT, "cannot read file: %s" % e.strerror, path)


def _corrupt(path, why):
    return errors.Error(errors.DATA, "corrupt ELF file: %s" % why, path)


def _unpack(info, fmt, off):
    try:
        return struct.unpack_from(fmt, info._data, off)
    except struct.error:
        raise _corrupt(info.path, "truncated at offset %d" % off)


def _parse(path, data):
    if len(data) < 52:
        raise _corrupt(path, "header truncated")
    cls, enc = data[4], data[5]
    if cls not in (1, 2) or enc not in (1, 2):
        raise _corrupt(path, "bad class or byte order")
    info = ElfInfo()
    info.path, info.is_elf, info._data = path, True, data
    info.bits = 64 if cls == 2 else 32
    info.endian = "<" if enc == 1 else ">"
    e = info.endian
    if info.bits == 64:
        hdr = _unpack(info, e + "HHIQQQIHHHHHH", 16)
        etype, machine, _, _, phoff, _, _, _, phentsize, phnum = hdr[:10]
        phfmt = e + "IIQQQQQQ"      # p_type p_flags p_offset p_vaddr p_paddr p_filesz p_memsz p_align
    else:
        hdr = _unpack(info, e + "HHIIIIIHHHHHH", 16)
        etype, machine, _, _, phoff, _, _, _, phentsize, phnum = hdr[:10]
        phfmt = e + "IIIIIIII"      # p_type p_offset p_vaddr p_paddr p_filesz p_memsz p_flags p_align
    info.type = etype
    info.machine = MACHINES.get(machine, "em%d" % machine)
    info.interp, info.needed, info.soname, info.rpath, info.runpath = None, [], None, [], []
    info._dyn, info._loads = {}, []
    dyn_range = None
    for i in range(phnum):
        p = _unpack(info, phfmt, phoff + i * phentsize)
        if info.bits == 64:
            ptype, _, offset, vaddr, _, filesz = p[:6]
        else:
            ptype, offset, vaddr, _, filesz = p[:5]
        if offset + filesz > len(data):
            raise _corrupt(path, "segment beyond end of file")
        if ptype == PT_INTERP:
            info.interp = data[offset:offset + filesz].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif ptype == PT_LOAD:
            info._loads.append((vaddr, filesz, offset))
        elif ptype == PT_DYNAMIC:
            dyn_range = (offset, filesz)
    if dyn_range is None:
        return info
    dfmt = e + ("qQ" if info.bits == 64 else "iI")
    dsize = struct.calcsize(dfmt)
    entries = []
    for off in range(dyn_range[0], dyn_range[0] + dyn_range[1] - dsize + 1, dsize):
        tag, val = _unpack(info, dfmt, off)
        if tag == DT_NULL:
            break
        entries.append((tag, val))
        if tag != DT_NEEDED:
            info._dyn[tag] = val
    if DT_STRTAB not in info._dyn:
        return info
    info._dyn[DT_STRTAB] = _file_offset(info, info._dyn[DT_STRTAB])
    for tag, val in entries:
        if tag == DT_NEEDED:
            info.needed.append(_dynstr(info, val))
        elif tag == DT_SONAME:
            info.soname = _dynstr(info, val)
        elif tag == DT_RPATH:
            info.rpath = [d for d in _dynstr(info, val).split(":") if d]
        elif tag == DT_RUNPATH:
            info.runpath = [d for d in _dynstr(info, val).split(":") if d]
    return info


def _file_offset(info, vaddr):
    """Map a virtual address (what the dynamic section holds) to a file offset."""
    for start, size, offset in info._loads:
        if start <= vaddr < start + size:
            return vaddr - start + offset
    raise _corrupt(info.path, "address 0x%x outside every loaded segment" % vaddr)


def _dynstr(info, index):
    start = info._dyn[DT_STRTAB] + index
    end = info._data.find(b"\0", start)
    if start >= len(info._data) or end < 0:
        raise _corrupt(info.path, "string table index out of range")
    return info._data[start:end].decode("utf-8", "surrogateescape")
