"""--nv (and --rocm): the host's GPU driver, visible inside the image.

The driver's user-space libraries are found through the host's ld.so cache from
a list kept as data (hpcrun/data/nvliblist.conf; sites add `nv_extra` entries),
or from `nvidia-container-cli list` where the site prefers it
(`nv_container_cli = yes`).  Libraries are bound one by one into
/.hpcrun/host/nv/lib, which goes first on the library path (a stale libcuda in
the image must not win over the host's driver); tools at their host path;
device nodes /dev/nvidia* at
the same path (nothing to do where the host's /dev is bound whole).  CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES
pass through untouched (hpcrun.mpi.env_passthrough_prefixes): all device nodes
are bound because the ranks of a node share one container but may each get
another GPU.  No driver on the host: one warning, and the launch goes on, so
one job script serves CPU and GPU nodes.  docs/gpu.md.
"""
import glob
import os
import re
import subprocess
import sys

from hpcrun import elf, ldcache
from hpcrun.mpi import inject

KINDS = {
    # kind: (list file, directory inside the image, default device globs, the library that means "driver")
    "nv": ("nvliblist.conf", inject.HOST_DIR + "/nv/lib",
           ["/dev/nvidia[0-9]*", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
            "/dev/nvidia-modeset", "/dev/nvidia-caps"], "libcuda.so.1"),
    "rocm": ("rocmliblist.conf", inject.HOST_DIR + "/rocm/lib", ["/dev/kfd", "/dev/dri"], "libhsa-runtime64.so.1"),
}


def enabled(flag, environ, config, kind="nv"):
    """--nv on the command line, HPCRUN_NV=1, or the admin's `nv = always`
    (the launch path's own test, plan.gpu_wanted)."""
    from hpcrun.plan import gpu_wanted
    return gpu_wanted(flag, environ, config, kind)


def driver_version(config=None):
    """The NVIDIA driver version, e.g. "535.104.05", or None when there is no driver."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module(?: for [\w-]+)?\s+(\d+\.\d+(?:\.\d+)?)", f.read())
            if m:
                return m.group(1)
    except OSError:
        pass
    cache = _cache(config, "nv")
    path = (cache.get("libcuda.so.1") or [None])[0]
    if path:
        m = re.search(r"\.so\.(\d+\.\d+(?:\.\d+)?)$", os.path.realpath(path))
        if m:
            return m.group(1)
        return "unknown (libcuda.so.1 at %s)" % path
    return None


def _cache(config, kind):
    path = config.get("%s_ldcache" % kind) if config is not None else None
    return ldcache.read(path or ldcache.DEFAULT)


def discover(config, kind="nv"):
    """What the host offers: {"libs": {soname: path}, "paths": [(src, dst)], "devices": [(src, dst)],
    "source": "list" | "nvidia-container-cli", "missing": [...]}."""
    listfile, _, devglobs, _ = KINDS[kind]
    found = {"libs": {}, "paths": [], "devices": [], "source": "list"}
    tool = inject.find_program("nvidia-container-cli", config.get("nv_path")) if kind == "nv" else None
    if tool and config.getbool("nv_container_cli", False):
        lines = _container_cli(tool)
        if lines is not None:
            found["source"] = "nvidia-container-cli"
            for p in lines:
                if p.startswith("/dev/"):
                    found["devices"].append((p, p))
                elif ".so" in os.path.basename(p):
                    info = elf.read(p)
                    found["libs"][(info.soname if info else None) or os.path.basename(p)] = p
                else:
                    found["paths"].append((p, p))
            return found
    cache = _cache(config, kind)
    for entry in inject.read_list(listfile, None, config.getlist("%s_extra" % kind)):
        if inject.is_library(entry):
            for soname in inject.match_libraries(entry, cache):
                found["libs"].setdefault(soname, cache[soname][0])
        elif entry.startswith("/"):
            found["paths"] += [(s, d or s) for s, d in inject.expand_paths(entry)]
        else:
            prog = inject.find_program(entry, config.get("%s_path" % kind))
            if prog:
                found["paths"].append((prog, prog))
    for pattern in config.getlist("%s_devices" % kind) or devglobs:
        for dev in sorted(glob.glob(pattern)):
            found["devices"].append((dev, dev))
    return found


def _container_cli(tool):
    try:
        r = subprocess.run([tool, "list"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    return [line.strip() for line in r.stdout.splitlines() if line.strip().startswith("/")]


def prepare(plan, image_root, config, kind="nv"):
    """Bind the host's driver into the image (inside the keeper, image mounted at image_root)."""
    _, libdir, _, key_lib = KINDS[kind]
    name = "--" + kind
    notes = plan.setdefault("notes", [])
    found = discover(config, kind)
    if key_lib not in found["libs"]:
        msg = "%s: no %s driver found on this host (%s); going on without GPU" % (
            name, "NVIDIA" if kind == "nv" else "ROCm", key_lib)
        notes.append(msg)
        plan.setdefault("warnings", []).append(msg)
        sys.stderr.write("hpcrun: warning: %s\n" % msg)
        return
    # driver libraries come as a set; what they need beyond glibc comes along (ROCm needs a lot)
    libs, missing = inject.closure(found["libs"], _cache(config, kind))
    inject.check_glibc(list(libs.values()), image_root, "the host's GPU driver")
    for soname, real in sorted(libs.items()):
        inject.add_bind(plan, real, libdir + "/" + soname, "GPU driver library (%s)" % name)
    for src, dst in found["paths"]:
        inject.add_bind(plan, src, dst, "GPU driver file (%s)" % name)
    for src, dst in found["devices"]:
        inject.add_bind(plan, src, dst, "GPU device (%s)" % name, ro=False)
    lp = plan.setdefault("ld_library_path_prepend", [])
    if libdir not in lp:
        lp.insert(0, libdir)        # before the host MPI's: the driver is the one thing never duplicated
    version = driver_version(config) if kind == "nv" else None
    notes.append("%s: %d driver libraries from %s%s, %d devices" % (
        name, len(libs), found["source"], ", driver %s" % version if version else "", len(found["devices"])))
    if missing:
        notes.append("%s: not found on the host: %s" % (name, ", ".join(missing)))
