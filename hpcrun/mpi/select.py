"""Which MPI a rank runs: the image's (hybrid) or the host's (host), and whether it can work.

Rules (docs/mpi.md has the table):
  hybrid  the image's MPI talks to the host launcher.  Open MPI's mpirun speaks only Open MPI
          (same major version); srun --mpi=pmix suits Open MPI (PMIx) and PMIx-built MPICH;
          PMI-1/2 (hydra, srun --mpi=pmi2) suits the MPICH family.
  host    the host's MPI replaces the image's: same family (Open MPI libmpi.so.40 <-> 40, MPICH
          ABI libmpi.so.12 <-> 12: MPICH, Intel MPI, Cray MPICH, MVAPICH), Open MPI host version
          >= the image's (major equal), and the image's glibc new enough for every host library.
  auto    hybrid when it works (or host first with mpi_auto_prefer = host), else the other,
          else an error that says both reasons.
"""
import os
import re

from hpcrun import elf, environment, errors, fdio, ldcache
from hpcrun.mpi import inject, launcher

LIBDIR = inject.HOST_DIR + "/lib"
_OMPI_VERSION = re.compile(rb"\x00v(\d+\.\d+\.\d+)\x00")
_MPICH_VERSION = re.compile(rb"MPICH Version:\s*(\d+\.\d+(?:\.\d+)?)")
_INTEL_VERSION = re.compile(rb"Intel\(R\) MPI Library (\d{4}(?:\.\d+)*)")


def describe(m):
    if not m:
        return "none"
    name = {"openmpi": "Open MPI", "mpich": "MPICH-ABI MPI"}.get(m["flavor"], m["flavor"])
    if m.get("impl") and m["impl"] != m["flavor"]:
        name = m["impl"]
    return "%s %s (%s)" % (name, m.get("version") or "version unknown", m.get("soname"))


def library_facts(path, soname=None):
    """flavor, soname, version of an MPI library file (host path)."""
    info = elf.read(path)
    soname = (info.soname if info else None) or soname or os.path.basename(path)
    needed = info.needed if info else []
    facts = {"soname": soname, "path": path, "version": None, "impl": None}
    if any(n.startswith("libopen-pal.so") for n in needed) or soname in ("libmpi.so.40", "libmpi.so.20"):
        facts["flavor"] = "openmpi"
    elif soname == "libmpi.so.12" or soname.startswith("libmpi.so.12"):
        facts["flavor"] = "mpich"
    else:
        facts["flavor"] = "unknown"
    try:
        with fdio.open_regular(path) as f:       # the image's libmpi: never a FIFO
            data = f.read(64 << 20)
    except OSError:
        data = b""
    if facts["flavor"] == "openmpi":
        m = _OMPI_VERSION.search(data)
        facts["version"] = m.group(1).decode() if m else None
    else:
        m = _INTEL_VERSION.search(data)
        if m:
            facts["impl"], facts["version"] = "Intel MPI", m.group(1).decode()
        else:
            m = _MPICH_VERSION.search(data)
            if m:
                facts["impl"], facts["version"] = "MPICH", m.group(1).decode()
    return facts


def program_mpi_soname(plan, image_root):
    """The libmpi soname the command itself links against, when it is an ELF file we can find."""
    argv = plan.get("argv") or []
    if not argv:
        return None
    prog, cands = argv[0], []
    if "/" in prog:
        full = prog if prog.startswith("/") else os.path.join(plan.get("cwd") or os.getcwd(), prog)
        cands = [inject.resolve_in(image_root, full), full]
    else:
        path = ((plan.get("env") or {}).get("set") or {}).get("PATH") or "/usr/local/bin:/usr/bin:/bin"
        cands = [inject.resolve_in(image_root, os.path.join(d, prog)) for d in path.split(":") if d]
    for c in cands:
        if os.path.isfile(c):
            try:
                info = elf.read(c)
            except errors.Error:
                return None
            if info:
                return next((n for n in info.needed if n.startswith("libmpi.so.")), None)
            return None
    return None


def image_mpi(plan, image_root):
    meta = (plan.get("image_meta") or {}).get("mpi") or {}
    want = program_mpi_soname(plan, image_root)
    if meta.get("soname") and (want is None or want == meta["soname"]):
        inside, host = inject.image_library(image_root, soname=meta["soname"])
        facts = library_facts(host, meta["soname"]) if host else {"soname": meta["soname"], "impl": None}
        facts.update({k: meta[k] for k in ("flavor", "version") if meta.get(k)})
        facts["inside"] = inside
        return facts
    inside, host = inject.image_library(image_root, soname=want) if want else \
        inject.image_library(image_root, prefix="libmpi.so.")
    if not host:
        return {"soname": want, "flavor": "mpich" if want == "libmpi.so.12" else
                "openmpi" if want in ("libmpi.so.40", "libmpi.so.20") else "unknown",
                "version": None, "impl": None, "inside": None} if want else None
    facts = library_facts(host)
    facts["inside"] = inside
    return facts


def host_mpi(config, image=None):
    """The host MPI: config mpi_lib (first entry is libmpi), else the ld.so cache; when the
    host has several, the one with the image's soname."""
    libs = config.getlist("mpi_lib")
    if libs:
        path = libs[0]
        if not os.path.exists(path):
            raise errors.Error(errors.CONFIG, "mpi_lib in the hpcrun config names a missing file", path)
        facts = library_facts(path)
        facts["extra"] = libs[1:]
    else:
        cache = ldcache.read(config.get("mpi_ldcache", ldcache.DEFAULT))
        names = sorted(s for s in cache if re.match(r"libmpi\.so\.\d+$", s))
        if not names:
            return None
        if image and image.get("soname") in names:
            names.remove(image["soname"])
            names.insert(0, image["soname"])
        facts = library_facts(cache[names[0]][0], names[0])
        facts["extra"] = []
    for k in ("flavor", "version"):
        if config.get("mpi_" + k):
            facts[k] = config.get("mpi_" + k)
    return facts


def _major_minor(v):
    try:
        parts = [int(x) for x in re.findall(r"\d+", v or "")[:2]]
        return tuple(parts) if len(parts) == 2 else None
    except ValueError:
        return None


def hybrid_problem(img, host, how):
    """Why the image's MPI cannot work with this launcher, or None (plus a note)."""
    if img.get("inside") is None and img.get("soname"):
        return ("the command needs %s but the image has no such library: use --mpi=host (the host's "
                "MPI) or add the MPI to the image" % img["soname"]), None
    if how in (None, "slurm", "pbs"):
        return None, "no MPI launcher in the environment: the image's MPI runs as a singleton"
    if how == "openmpi":
        if img["flavor"] != "openmpi":
            return ("the image's %s cannot be started by Open MPI's mpirun (it speaks only Open MPI's "
                    "protocol; every rank would be rank 0 of 1): start it with the launcher of its "
                    "own family (srun --mpi=pmi2, mpiexec.hydra) or rebuild the image with Open MPI"
                    % describe(img)), None
        iv, hv = _major_minor(img.get("version")), _major_minor((host or {}).get("version"))
        if iv and hv and iv[0] != hv[0]:
            return ("the image's %s cannot be started by the host's Open MPI %s mpirun: use an image "
                    "with Open MPI %d.x or --mpi=host" % (describe(img), host["version"], hv[0])), None
        if iv and hv and iv != hv:
            return None, "image Open MPI %s under host mpirun %s: same major version, should work" % (
                img["version"], host["version"])
        return None, "image's %s started by Open MPI's mpirun" % describe(img)
    if how == "pmix":
        if img["flavor"] == "openmpi":
            return None, "image's %s talks PMIx to the launcher" % describe(img)
        return None, "image's %s under a PMIx launcher works only if it was built with PMIx" % describe(img)
    if how == "pmi":
        if img["flavor"] == "openmpi":
            return None, ("image's Open MPI under a PMI-1/2 launcher works only if it was built with "
                          "Slurm PMI support (srun --mpi=pmix is the safe choice)")
        return None, "image's %s talks PMI to the launcher" % describe(img)
    return None, None


def host_problem(img, host):
    """Why the host MPI cannot replace the image's, or None."""
    if host is None:
        return "no MPI library found on the host: install one or name it with mpi_lib in the hpcrun config"
    if img is None:
        return None
    if img["flavor"] != host["flavor"] or (img["flavor"] == "unknown"):
        return ("the host's %s cannot replace the image's %s: Open MPI and the MPICH ABI family "
                "(MPICH, Intel MPI, Cray MPICH, MVAPICH) are not interchangeable"
                % (describe(host), describe(img)))
    if img.get("soname") and img["soname"] != host["soname"]:
        return ("the host's %s has another ABI than the image's %s (soname differs)"
                % (describe(host), describe(img)))
    if img["flavor"] == "openmpi":
        iv, hv = _major_minor(img.get("version")), _major_minor(host.get("version"))
        if iv and hv and (iv[0] != hv[0] or hv < iv):
            return ("the host's Open MPI %s cannot replace the image's Open MPI %s: the host needs the "
                    "same major version and at least the image's minor version" % (host["version"], img["version"]))
    return None


def prepare(plan, image_root, config, mode, environ):
    notes = plan.setdefault("notes", [])
    img = image_mpi(plan, image_root)
    how = launcher(environ)
    if mode == "auto" and img is None:
        notes.append("mpi: the image has no MPI library; nothing to wire")
        plan["mpi_selected"] = {"mode": "none", "image": None, "launcher": how}
        return
    host = host_mpi(config, img)
    hyb, hyb_note = hybrid_problem(img, host, how) if img else (None, None)
    hostp = host_problem(img, host) if mode in ("auto", "host") else None
    if mode == "hybrid" and hyb:
        raise errors.Error(errors.MPI_ABI, hyb, img.get("inside") or img.get("soname"))
    if mode == "host" and hostp:
        raise errors.Error(errors.MPI_ABI, hostp, (host or {}).get("path") or "host MPI")
    chosen = mode
    if mode == "auto":
        order = ["host", "hybrid"] if config.get("mpi_auto_prefer", "hybrid") == "host" else ["hybrid", "host"]
        problems = {"hybrid": hyb, "host": hostp}
        chosen = next((m for m in order if not problems[m]), None)
        if chosen is None:
            raise errors.Error(errors.MPI_ABI, "%s; and %s" % (hyb, hostp), img.get("inside") or img.get("soname"))
        other = [m for m in order if m != chosen][0]
        notes.append("mpi: auto chose %s (%s)%s" % (
            chosen, "image MPI with the host launcher" if chosen == "hybrid" else "host MPI replaces the image's",
            "; %s not possible: %s" % (other, problems[other]) if problems[other] else ""))
    if chosen == "hybrid" and hyb_note:
        notes.append("mpi: " + hyb_note)
    if chosen == "host":
        inject_host_mpi(plan, image_root, config, host, img)
        notes.append("mpi: host %s replaces the image's %s" % (describe(host), describe(img)))
    elif chosen == "hybrid" and img.get("flavor") == "openmpi":
        carry_site_mca_params(plan, config)
        if how is None:
            # A singleton (no launcher): MPI_Init starts an orted, whose ssh/rsh
            # launcher component fails the init where the image has no ssh.  An
            # empty agent lets it run on this node; a value set by the user wins.
            env_set = plan.setdefault("env", {}).setdefault("set", {})
            env_set["OMPI_MCA_plm_rsh_agent"] = "${OMPI_MCA_plm_rsh_agent:-}"
            notes.append("mpi: no launcher: Open MPI singleton, node-local (OMPI_MCA_plm_rsh_agent empty)")
    plan["mpi_selected"] = {"mode": chosen, "launcher": how, "image": _public(img), "host": _public(host)}


def carry_site_mca_params(plan, config):
    """The host's Open MPI site parameters become the ranks' defaults.

    They are the admin's knowledge of this machine's fabric: Debian's own file
    excludes the ofi MTL and UCX PML, and an image without that file lets
    Open MPI pick ofi's TCP provider for ranks on one node (measured here:
    7 us instead of 0.3 us ping-pong latency).  Written to launch.env as
    ${OMPI_MCA_x:-value}: a variable the user or mpirun sets still wins, and
    both beat the image's own openmpi-mca-params.conf (Open MPI reads the
    environment over its files)."""
    paths = config.getlist("mpi_site_mca_params") or ["/etc/openmpi/openmpi-mca-params.conf"]
    env_set = plan.setdefault("env", {}).setdefault("set", {})
    carried = []
    for path in paths:
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            name, sep, value = line.split("#", 1)[0].partition("=")
            name, value = name.strip(), value.strip()
            var = "OMPI_MCA_" + name
            if sep and name and environment.valid_name(var) and "$" not in value:
                env_set[var] = "${%s:-%s}" % (var, value)
                carried.append(name)
    if carried:
        plan.setdefault("notes", []).append("mpi: host site MCA parameters carried as defaults: " + ", ".join(carried))


def _public(m):
    return {k: m.get(k) for k in ("flavor", "soname", "version", "impl")} if m else None


def inject_host_mpi(plan, image_root, config, host, img):
    """Bind the host MPI, its closure and the fabric stack under /.hpcrun/host."""
    cache = ldcache.read(config.get("mpi_ldcache", ldcache.DEFAULT))
    libdir = os.path.dirname(os.path.realpath(host["path"]))
    prefix = os.path.dirname(libdir)
    if os.path.basename(prefix) == "lib":       # /usr/lib/<triplet>
        prefix = os.path.dirname(prefix)
    subst = {"libdir": libdir, "prefix": prefix}
    section = "openmpi" if host["flavor"] == "openmpi" else "mpich"
    entries = inject.read_list("hostmpi.conf", {section, "fabric"},
                               config.getlist("mpi_host_extra") + config.getlist("fabric_extra"))
    seeds = {host["soname"]: host["path"]}
    for extra in host.get("extra") or []:
        info = elf.read(extra)
        seeds[(info.soname if info else None) or os.path.basename(extra)] = extra
    plugins = []
    for e in entries:
        if inject.is_library(e):
            for soname in inject.match_libraries(e, cache):
                seeds.setdefault(soname, cache[soname][0])
            continue
        for src, dst in inject.expand_paths(e, subst):
            inject.add_bind(plan, src, dst or src, "host MPI/fabric (--mpi=host)",
                            ro=not src.startswith("/dev/"))
            if os.path.isdir(src) and not src.startswith("/dev/"):
                plugins += inject.shared_objects(src)
    libs, missing = inject.closure(seeds, cache, plugins)
    inject.check_glibc(list(libs.values()) + plugins, image_root, "the host MPI (%s)" % describe(host))
    for soname, real in sorted(libs.items()):
        inject.add_bind(plan, real, LIBDIR + "/" + soname, "host MPI library (--mpi=host)")
    inject.add_library_dir(plan, LIBDIR)
    if missing:
        plan.setdefault("notes", []).append("mpi: host libraries not found for the host MPI: " + ", ".join(missing))
