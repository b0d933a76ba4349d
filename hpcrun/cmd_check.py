"""`hpcrun check [IMAGE]`: a pre-flight report of what a launch here would meet.

One line per fact: `name: value  [ok|warn|FAIL]`.  The exit status is 0 when a
launch would work, else the exit code that launch would fail with (e.g. 68 for
an MPI ABI mismatch, 69 when user namespaces are off).  Run it the way the job
runs (`mpirun -np 1 hpcrun check img`, `srun -n1 hpcrun check img`) to check
against the real launcher.  docs/check.md.
"""
import os
import shutil
import subprocess
import sys

from hpcrun import config as config_mod
from hpcrun import errors

USAGE_TEXT = "usage: hpcrun check [--json] [IMAGE]"


class Report:
    def __init__(self):
        self.rows, self.code = [], 0

    def add(self, name, value, status="ok", code=None):
        self.rows.append({"name": name, "value": value, "status": status})
        if status == "FAIL" and not self.code:
            self.code = code or 1


def main(argv):
    as_json, image = False, None
    for a in argv:
        if a == "--json":
            as_json = True
        elif a in ("-h", "--help"):
            print(USAGE_TEXT)
            return 0
        elif a.startswith("-"):
            raise errors.Error(errors.USAGE, "unknown option for check", a)
        elif image is None:
            image = a
        else:
            raise errors.Error(errors.USAGE, "check takes at most one image", a)
    cfg = config_mod.load(os.environ)
    rep = Report()
    _config(rep, cfg)
    _entry(rep)
    _namespaces(rep)
    _fuse(rep)
    _launcher(rep)
    host = _host_mpi(rep, cfg)
    if image is not None:         # "" too: an empty IMAGE (unset variable) is an error, not "no image"
        _image(rep, image, cfg, host)
    _fabric(rep, cfg)
    _gpu(rep, cfg)
    _shm(rep)
    if as_json:
        import json
        print(json.dumps({"checks": rep.rows, "exit": rep.code}, indent=1))
    else:
        width = max(len(r["name"]) for r in rep.rows) + 1
        for r in rep.rows:
            print("%-*s %s  [%s]" % (width, r["name"] + ":", r["value"], r["status"]))
    return rep.code


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _config(rep, cfg):
    unknown = sorted(k for k in cfg.values if k not in config_mod.KNOWN_KEYS)
    if unknown:
        rep.add("config", "unknown keys, ignored by every launch: " + ", ".join(
            "%s (%s)" % (k, cfg.origin.get(k, "?")) for k in unknown), "warn")
    elif cfg.sources:
        rep.add("config", ", ".join(cfg.sources))


def _entry(rep):
    """How this hpcrun was started: the entry `hpcrun install-entry` writes (docs/install.md), or pip's script."""
    import sys
    if not (sys.flags.isolated and sys.flags.no_site):
        rep.add("entry", "Python without -I -S (pip's console script?): PYTHON* variables act, every rank reads "
                "site-packages; run hpcrun install-entry (docs/install.md)", "warn")
    elif any(type(f).__name__ == "Bundle" and type(f).__module__ == "hpcrun.entry" for f in sys.meta_path):
        rep.add("entry", _front() + "Python -I -S, the rank's modules from the bundle")
    else:
        rep.add("entry", "Python -I -S, modules from their files: the bundle is missing, stale or of another "
                "Python; rerun hpcrun install-entry (docs/install.md)", "warn")


def _front():
    """'compiled join-only front ...; ' when this Python entry is bin/hpcrun-py behind the
    front install-entry compiled (bin/hpcrun an ELF file), else ''."""
    import os
    import sys
    here = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(here) != "hpcrun-py":
        return ""
    front = os.path.join(os.path.dirname(here), "hpcrun")
    try:
        with open(front, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return ""
    except OSError:
        return ""
    return "compiled join-only front %s, else " % front


def _namespaces(rep):
    maxns, clone = _read("/proc/sys/user/max_user_namespaces"), _read("/proc/sys/kernel/unprivileged_userns_clone")
    apparmor = _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    off = maxns == "0" or clone == "0" or apparmor == "1"
    if os.getuid() == 0:
        rep.add("user namespaces", "not needed as root (mount namespace only)")
    elif off:
        rep.add("user namespaces", "disabled (max_user_namespaces=%s, unprivileged_userns_clone=%s)"
                % (maxns, clone), "FAIL", errors.UNAVAILABLE)
    else:
        rep.add("user namespaces", "available (max_user_namespaces=%s)" % maxns)


def _fuse(rep):
    from hpcrun import stage
    fuse_ok = os.access("/dev/fuse", os.R_OK | os.W_OK)
    prog = stage.fuse_program()
    own = prog == stage.own_fuse_program()
    offset = False
    if prog and not own:
        try:
            out = subprocess.run([prog, "-h"], capture_output=True, text=True, timeout=10)
            offset = "offset" in (out.stdout + out.stderr)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if os.getuid() == 0:
        rep.add("image mount", "kernel squashfs (root)")
    elif not fuse_ok or not prog:
        rep.add("image mount", "%s; %s: images are extracted to node-local storage (slower start)" % (
            "/dev/fuse usable" if fuse_ok else "/dev/fuse not usable", prog or "no squashfuse"), "warn")
    elif own:
        rep.add("image mount", "%s (hpcrun's FUSE daemon: no request per open); hpcrun images and SIF are "
                "staged first (one copy per node)" % prog)
    else:
        rep.add("image mount", "%s%s%s" % (prog, " with offset support" if offset else
                                            " without offset support: hpcrun images are staged first",
                                            "; every open is a request to it (hpcrun install-entry builds "
                                            "hpcrun's own daemon with libsquashfuse-dev and libfuse3-dev)"),
                "ok" if offset else "warn")


def _launcher(rep):
    from hpcrun import mpi
    how = mpi.launcher(os.environ)
    facts = mpi.rank_facts(os.environ)
    names = {"openmpi": "Open MPI mpirun (PMIx)", "pmix": "PMIx (srun --mpi=pmix or prterun)",
             "pmi": "PMI-1/2 (hydra or srun --mpi=pmi2)%s" % (", PMI_FD=%s" % os.environ["PMI_FD"]
                                                             if "PMI_FD" in os.environ else ""),
             "slurm": "srun without an MPI plugin", "pbs": "PBS task", None: "none (not under an MPI launcher)"}
    extra = "" if facts["rank"] is None else ": rank %s of %s, local rank %s of %s" % (
        facts["rank"], facts["size"], facts["local_rank"], facts["local_size"])
    rep.add("launcher", names.get(how, how) + extra)


def _host_mpi(rep, cfg):
    from hpcrun.mpi import select
    try:
        host = select.host_mpi(cfg)
    except errors.Error as e:
        rep.add("host MPI", e.line(), "FAIL", e.code)
        return None
    rep.add("host MPI", "%s at %s" % (select.describe(host), host["path"]) if host else "none found",
            "ok" if host else "warn")
    return host


def _image(rep, path, cfg, host):
    from hpcrun import image as image_mod
    from hpcrun.mpi import inject, launcher, select
    try:
        img = image_mod.open_image(path)
    except errors.Error as e:
        rep.add("image", e.line(), "FAIL", e.code)
        return
    rep.add("image", "%s (%s)" % (img.path, img.kind))
    _signature(rep, img, cfg)
    meta_mpi = (img.meta() or {}).get("mpi")
    mine = None
    if img.kind == "dir":
        mine = select.image_mpi({"image_meta": img.meta()}, img.path)
        glibc = inject.image_glibc(img.path)
        rep.add("image glibc", glibc or "none found", "ok" if glibc else "warn")
    elif meta_mpi:
        mine = {"flavor": meta_mpi.get("flavor", "unknown"), "soname": meta_mpi.get("soname"),
                "version": meta_mpi.get("version"), "impl": None, "inside": "(image metadata)"}
    rep.add("image MPI", select.describe(mine) if mine else
            ("none" if img.kind in ("dir", "hpcrun") else "unknown (no metadata; checked at launch)"))
    mode = cfg.get("mpi", "auto")
    if not mine or mode == "none":
        rep.add("MPI ABI", "nothing to check (mode %s)" % mode)
        return
    how = launcher(os.environ)
    hyb, note = select.hybrid_problem(mine, host, how)
    hostp = select.host_problem(mine, host)
    order = ["host", "hybrid"] if cfg.get("mpi_auto_prefer", "hybrid") == "host" else ["hybrid", "host"]
    if mode != "auto":
        order = [mode]
    problems = {"hybrid": hyb, "host": hostp}
    ok = [m for m in order if not problems[m]]
    if ok:
        rep.add("MPI ABI", "%s works%s" % (ok[0], ": " + note if ok[0] == "hybrid" and note else ""))
    else:
        rep.add("MPI ABI", "; ".join("%s: %s" % (m, problems[m]) for m in order), "FAIL", errors.MPI_ABI)


def _signature(rep, img, cfg):
    """The site's require_signature, as the node's keeper would apply it: an
    image it refuses must not pass the pre-flight."""
    from hpcrun import signature
    try:
        if not cfg.getbool("require_signature"):
            return
    except errors.Error as e:
        rep.add("signature", e.what, "FAIL", e.code)
        return
    try:
        results = signature.enforce(img.describe(), cfg)
    except errors.Error as e:
        rep.add("signature", "required by the site: " + e.what, "FAIL", e.code)
        return
    rep.add("signature", "required by the site: accepted, signed by " + ", ".join(
        sorted({r.principal for r in results if r.principal})))


def _fabric(rep, cfg):
    from hpcrun import ldcache
    from hpcrun.mpi import inject
    cache = ldcache.read(cfg.get("mpi_ldcache", ldcache.DEFAULT))
    libs = []
    for e in inject.read_list("hostmpi.conf", {"fabric"}, cfg.getlist("fabric_extra")):
        if inject.is_library(e):
            libs += inject.match_libraries(e, cache)
    devs = sorted(os.listdir("/dev/infiniband")) if os.path.isdir("/dev/infiniband") else []
    rep.add("fabric libraries", ", ".join(libs) or "none", "ok" if libs else "warn")
    rep.add("fabric devices", "/dev/infiniband: " + (", ".join(devs) if devs else "none"))


def _gpu(rep, cfg):
    from hpcrun import gpu
    try:
        version = gpu.driver_version(cfg)
        found = gpu.discover(cfg)
    except errors.Error as e:
        rep.add("GPU driver", e.line(), "warn")
        return
    if version:
        rep.add("GPU driver", "NVIDIA %s: %d libraries, %d devices (%s)" % (
            version, len(found["libs"]), len(found["devices"]), found["source"]))
    else:
        rep.add("GPU driver", "none (--nv would warn and go on)")


def _shm(rep):
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        rep.add("/dev/shm", "missing: MPI shared memory transports fail", "FAIL", errors.UNAVAILABLE)
        return
    size = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    rep.add("/dev/shm", "%.1f GiB, %.1f GiB free" % (size / 2.0**30, free / 2.0**30),
            "ok" if size >= (1 << 30) else "warn")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
