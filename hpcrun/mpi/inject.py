"""Host libraries into the image: list files, library closure, binds, the glibc check.

Shared by --mpi=host and --nv/--rocm (hpcrun/gpu.py).  Host libraries go to one
directory of hpcrun's inside the image (e.g. /.hpcrun/host/lib, one bind per
file, named by soname) that the launch puts first on LD_LIBRARY_PATH; the
image's glibc (and libstdc++/libgcc_s) stay in charge, so every host library
we bring must be satisfied by the image's glibc: that is checked here rather
than left to a loader error in every rank.
"""
import glob
import os

from hpcrun import elf, errors, ldcache

HOST_DIR = "/.hpcrun/host"
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")

# Provided by the image, never bound from the host: the C library (it must match the image's
# loader) and the compiler runtimes the image's own programs were built with.
IMAGE_OWNED = {
    "libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libresolv.so.2",
    "libutil.so.1", "libanl.so.1", "libnsl.so.1", "libmvec.so.1", "libBrokenLocale.so.1",
    "libnss_files.so.2", "libnss_dns.so.2", "libthread_db.so.1", "libc_malloc_debug.so.0",
    "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1", "ld64.so.2", "ld64.so.1", "ld-linux.so.2",
    "libstdc++.so.6", "libgcc_s.so.1",
}


def read_list(name, sections=None, extra=()):
    """Entries of hpcrun/data/<name> (only the given [sections], all when None) plus extra."""
    out, current = [], None
    with open(os.path.join(DATA_DIR, name)) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("[") and line.endswith("]"):
                current = line[1:-1]
                continue
            if sections is None or current in sections:
                out.append(line)
    return out + [e for e in extra if e.strip()]


def is_library(entry):
    return not entry.startswith("/") and ".so" in entry


def match_libraries(entry, cache):
    """Sonames in the cache for an entry "libfoo.so" (any libfoo.so.N) or an exact soname."""
    prefix = entry if entry.endswith(".") else entry + "."
    versioned = sorted(s for s in cache if s.startswith(prefix))
    return versioned or ([entry] if entry in cache else [])


def expand_paths(entry, subst=None):
    """"/host/glob [DST]" -> [(src, dst)] for what exists; dst None = same path."""
    parts = entry.split()
    pattern = parts[0]
    for k, v in (subst or {}).items():
        pattern = pattern.replace("{%s}" % k, v)
    if "{" in pattern:
        return []
    dst = parts[1] if len(parts) > 1 else None
    if dst and not dst.startswith("/"):
        dst = HOST_DIR + "/" + dst
    return [(p, dst) for p in sorted(glob.glob(pattern)) if os.path.lexists(p)]


def find_program(name, path=None):
    # (not shutil.which: shutil's import costs the keeper ~1.5 ms)
    if "/" in name:
        return name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    for d in (path or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        cand = os.path.join(d or ".", name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def closure(seeds, cache, scan_only=()):
    """Libraries the seed files need, recursively, resolved like the loader (RPATH, cache).

    seeds: {soname: host path} bound into the image; scan_only: host files (plugins in a
    bound directory) whose needs count but that are not bound themselves.
    Returns ({soname: real host path}, [sonames nobody could find])."""
    found = {s: os.path.realpath(p) for s, p in seeds.items()}      # the seeds win over the cache
    missing = []
    todo = [(s, p) for s, p in seeds.items()] + [(None, p) for p in scan_only]
    seen = set()
    while todo:
        soname, path = todo.pop()
        real = os.path.realpath(path)
        if soname:
            found.setdefault(soname, real)
        if real in seen:
            continue
        seen.add(real)
        info = elf.read(real)
        if info is None:
            continue
        dirs = [d.replace("$ORIGIN", os.path.dirname(path)) for d in info.rpath + info.runpath]
        for need in info.needed:
            if need in IMAGE_OWNED or need in found:
                continue
            hit = next((os.path.join(d, need) for d in dirs if os.path.exists(os.path.join(d, need))), None)
            hit = hit or (cache.get(need) or [None])[0]
            if hit:
                todo.append((need, hit))
            elif need not in missing:
                missing.append(need)
    return found, missing


def shared_objects(directory, limit=2000):
    """Plugin files under a bound directory (their needs join the closure)."""
    out = []
    for dirpath, _, files in os.walk(directory):
        for f in files:
            if ".so" in f and not os.path.islink(os.path.join(dirpath, f)):
                out.append(os.path.join(dirpath, f))
                if len(out) >= limit:
                    return out
    return out


def glibc_needs(paths):
    """(newest "x.y" any of these files needs, the file that needs it)."""
    best, who = None, None
    for p in paths:
        try:
            v = elf.max_glibc(p)
        except errors.Error:
            continue
        if v and (best is None or elf.glibc_key(v) > elf.glibc_key(best)):
            best, who = v, p
    return best, who


def resolve_in(root, path):
    """path inside the image root -> host path, following symlinks without leaving root."""
    parts = [p for p in path.split("/") if p]
    cur, hops = "", 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            cur = cur.rsplit("/", 1)[0]      # "" is the root; never above it
            continue
        if part == ".":
            continue
        nxt = cur + "/" + part
        full = root + nxt
        if os.path.islink(full) and hops < 40:
            hops += 1
            target = os.readlink(full)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                cur = ""
            continue
        cur = nxt
    return root + (cur or "/")


IMAGE_LIBDIRS = ("lib", "lib64", "usr/lib", "usr/lib64", "lib/*-linux-gnu", "usr/lib/*-linux-gnu",
                 "usr/local/lib", "usr/local/lib64", "usr/lib64/*/lib", "usr/lib/*-linux-gnu/*/lib",
                 "opt/*/lib", "opt/*/lib64", "opt/*/*/lib", "opt/*/*/lib64")


def image_library(root, soname=None, prefix=None):
    """Find a library in the image: its ld.so.cache first, then the usual directories.
    Returns (path inside the image, host path to read it) or (None, None)."""
    try:
        cache = ldcache.read(resolve_in(root, "/etc/ld.so.cache"))
    except errors.Error:
        cache = {}      # an old-format or foreign cache: the directory scan below finds it
    for name, paths in cache.items():
        if (soname and name == soname) or (prefix and name.startswith(prefix)):
            host = resolve_in(root, paths[0])
            if os.path.exists(host):
                return paths[0], host
    for d in IMAGE_LIBDIRS:
        for hostdir in sorted(glob.glob(os.path.join(root, d))):
            pattern = soname if soname else prefix + "*"
            for host in sorted(glob.glob(os.path.join(hostdir, glob.escape(pattern) if soname else pattern))):
                if os.path.exists(host):
                    return "/" + os.path.relpath(host, root), resolve_in(root, "/" + os.path.relpath(host, root))
    return None, None


def image_glibc(root):
    """The image's glibc version "x.y" (newest GLIBC_ version its libc defines), or None."""
    _, host = image_library(root, soname="libc.so.6")
    if not host:
        return None
    versions = [v[6:] for v in elf.verdef(host) if v.startswith("GLIBC_") and elf.glibc_key(v)]
    return max(versions, key=elf.glibc_key) if versions else None


def check_glibc(files, image_root, what, code=errors.MPI_ABI):
    """Refuse host libraries that need a newer glibc than the image has."""
    need, who = glibc_needs(files)
    if need is None:
        return None
    have = image_glibc(image_root)
    if have is None:
        raise errors.Error(code, "%s needs glibc %s but the image has no glibc (libc.so.6): "
                           "use an image based on a glibc distribution" % (what, need), os.path.basename(who))
    if elf.glibc_key(need) > elf.glibc_key(have):
        raise errors.Error(code, "%s needs GLIBC_%s but the image's glibc is %s: use an image with "
                           "glibc >= %s (or leave the host libraries out)" % (what, need, have, need),
                           who)
    return have


def covered(plan, path):
    """True when a same-path bind already shows this host path (e.g. /dev/nvidia0 under /dev)."""
    for b in plan.get("binds", []):
        if b.get("src") == b.get("dst") and (path == b["src"] or path.startswith(b["src"].rstrip("/") + "/")):
            return True
    return False


def add_bind(plan, src, dst, why, ro=True):
    binds = plan.setdefault("binds", [])
    if any(b.get("dst") == dst for b in binds) or (src == dst and covered(plan, src)):
        return
    binds.append({"src": src, "dst": dst, "ro": ro, "why": why})


def add_library_dir(plan, directory):
    lp = plan.setdefault("ld_library_path_prepend", [])
    if directory not in lp:
        lp.append(directory)
