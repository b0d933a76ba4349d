"""MPI solver: tell which programs in the image are MPI programs and which
MPI ABI they were linked against, for the launch-time check against the host.

Open MPI keeps one soname per ABI (libmpi.so.40 for 3.x-5.x); the MPICH ABI
(MPICH, Intel MPI, MVAPICH, Cray MPICH) is libmpi.so.12.  The version is read
from the library's own strings, as `ompi_info`/`mpichversion` would print it.
"""
import os
import re

OPENMPI_VERSION = re.compile(rb"\0v?(\d+\.\d+\.\d+[a-z0-9]*)\0")
MPICH_VERSION = re.compile(rb"MPICH Version:\s*([0-9][0-9.a-z]*)")


def detect(elf_solver):
    """The image metadata "mpi" value, or None when no object links libmpi."""
    programs, soname = [], None
    for image_path, info in elf_solver.elves:
        names = [n for n in info.needed if n.startswith("libmpi.so")]
        if names and not (info.soname or "").startswith("libmpi"):
            programs.append(image_path)
            soname = soname or names[0]
    if not programs:
        return None
    lib = elf_solver.by_soname.get(soname)
    flavor, version = _flavor(lib, soname)
    mpi = {"flavor": flavor, "soname": soname, "programs": sorted(set(programs))}
    if version:
        mpi["version"] = version
    return mpi


def _flavor(lib, soname):
    try:
        with open(os.path.realpath(lib), "rb") as f:
            data = f.read()
    except (OSError, TypeError):
        data = b""
    if b"Open MPI" in data or soname == "libmpi.so.40":
        m = OPENMPI_VERSION.search(data[data.find(b"Open MPI"):] if b"Open MPI" in data else data)
        m = m or OPENMPI_VERSION.search(data)
        return "openmpi", m.group(1).decode() if m else None
    m = MPICH_VERSION.search(data)
    return "mpich", m.group(1).decode() if m else None


def add_runtime(tree, elf_solver, mpi, log):
    """Open MPI needs more than its libraries to start: its components (dlopen'ed
    plugins), help texts, default parameters and orted (singleton start).  They
    are found from the library's prefix (Debian and plain `make install` layouts)."""
    if mpi["flavor"] != "openmpi":
        return
    lib = elf_solver.by_soname.get(mpi["soname"])
    if not lib:
        return
    libdir = os.path.dirname(os.path.realpath(lib))
    prefix = libdir[:libdir.rindex("/lib")] if "/lib" in libdir else os.path.dirname(libdir)
    why = "Open MPI runtime for %s" % ", ".join(mpi["programs"])
    plugin_dirs = [os.path.join(libdir, "openmpi/lib/openmpi3"), os.path.join(libdir, "openmpi"),
                   os.path.join(libdir, "pmix2/lib/pmix"), os.path.join(libdir, "pmix")]
    for d in plugin_dirs:
        if not os.path.isdir(d) or (d.endswith("/openmpi") and os.path.isdir(d + "/lib")):
            continue
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if not name.endswith(".so") or not os.path.isfile(path):
                continue
            lacking = elf_solver.missing(path)
            if lacking:
                log("note: left out %s (needs %s, not on this host)" % (path, lacking))
                continue
            elf_solver.add(path, why)
    for d in (os.path.join(prefix, "share/openmpi"), os.path.join(prefix, "share/pmix"),
              "/etc/openmpi" if prefix == "/usr" else os.path.join(prefix, "etc")):
        if os.path.isdir(d):
            tree.add_tree(d, why)
    for prog in ("orted", "opal_wrapper"):
        path = os.path.join(prefix, "bin", prog)
        if os.path.exists(path) and prog == "orted":
            elf_solver.add(path, why + " (singleton start)")
