"""Turn the command line, the image and the site config into a launch plan.

The plan is plain data (dicts, lists, strings): `hpcrun --dry-run` prints it,
the node's keeper builds the container from it, and every rank computes the
same `key` from it, which is how ranks of one job step on a node find the one
container they share.  Nothing here mounts or changes anything.
"""
from hpcrun import rankos as os     # os without its import cost (rankos.py)
import _stat as stat     # stat.py's C half, all of it a rank uses (stat.py: ~0.2 M instructions more)

from hpcrun import environment, errors

# Never bind the current directory over these: it would hide the image's own system.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/boot",
               "/dev", "/proc", "/sys", "/run", "/var/lib", "/var/run", "/opt")
HOST_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/localtime")
# Every variable hpcrun.mpi's launcher() and host_binds() read starts with one of these.
MPI_ENV_PREFIXES = ("OMPI_", "PMIX_", "PMI_", "SLURM_", "PBS_")


def parse_bind(spec, why):
    """SRC[:DST[:ro|rw]] -> bind dict (host side checks happen in add_bind)."""
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise errors.Error(errors.USAGE, "malformed bind spec, expected SRC[:DST[:ro|rw]]", spec)
    src = parts[0]
    # A relative source is the caller's cwd's (add() resolves it); without a
    # DST it lands at the same absolute path inside.
    same = os.path.abspath(src)
    dst = parts[1] if len(parts) > 1 and parts[1] else same
    mode = parts[2] if len(parts) > 2 else "rw"
    if len(parts) == 2 and parts[1] in ("ro", "rw"):
        dst, mode = same, parts[1]
    if mode not in ("ro", "rw"):
        raise errors.Error(errors.USAGE, "malformed bind spec: mode must be ro or rw", spec)
    if not dst.startswith("/"):
        raise errors.Error(errors.USAGE, "malformed bind spec: destination must be absolute", spec)
    return {"src": src, "dst": dst, "ro": mode == "ro", "why": why}


def normalize_dst(dst, spec):
    """Lexically normalise a destination; '..' above the image root is an escape."""
    parts = []
    for p in dst.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                raise errors.Error(errors.NOPERM, "bind destination escapes the image root", spec)
            parts.pop()
        else:
            parts.append(p)
    return "/" + "/".join(parts)


def split_binds(values):
    out = []
    for v in values:
        out.extend(s.strip() for s in v.split(",") if s.strip())
    return out


class Binds:
    """The ordered bind list; a later bind of the same destination replaces the earlier."""

    def __init__(self, forbidden):
        self.items = []
        self.forbidden = [os.path.realpath(f) for f in forbidden]

    def add(self, b, check=True, required=True):
        spec = "%s:%s" % (b["src"], b["dst"])
        b["dst"] = normalize_dst(b["dst"], spec)
        if b["dst"] == "/":
            raise errors.Error(errors.USAGE, "bind destination cannot be the container's root", spec)
        src = os.path.abspath(b["src"])
        try:
            st = os.stat(src)       # as the calling user: an unreadable source fails here
        except FileNotFoundError:
            if not required:
                return
            raise errors.Error(errors.NOINPUT, "bind source not found", b["src"])
        except OSError as e:
            if not required:
                return
            raise errors.Error(errors.NOINPUT, "bind source not accessible: %s" % e.strerror, b["src"])
        real = os.path.realpath(src)
        if check:
            for f in self.forbidden:
                if real == f or real.startswith(f.rstrip("/") + "/") or f == "/":
                    raise errors.Error(errors.NOPERM, "bind source forbidden by the site configuration", b["src"])
                if f.startswith(real.rstrip("/") + "/"):
                    raise errors.Error(errors.NOPERM, "bind source contains %s, which the site configuration "
                                       "forbids" % f, b["src"])
            # A directory the user may only traverse (mode 0711, like PBS's
            # mom_priv/jobs) is a fine bind source; a file must be readable.
            need = os.X_OK if stat.S_ISDIR(st.st_mode) else os.R_OK
            if not os.access(real, need):
                raise errors.Error(errors.NOINPUT, "bind source not accessible", b["src"])
        b["src"] = real
        b["dir"] = stat.S_ISDIR(st.st_mode)
        self.items = [x for x in self.items if x["dst"] != b["dst"]]
        self.items.append(b)


def build(opts, img, cfg, environ):
    uid, gid = os.getuid(), os.getgid()
    userns = uid != 0
    # The passwd entry is looked up only where needed (no $HOME; the keeper's
    # generated /etc/passwd; --dry-run): NSS loads libraries, ~0.3 ms a rank.
    user = None if environ.get("HOME") else user_entry(uid, environ)
    home = environ.get("HOME") or user["home"]
    binds = Binds(cfg.getlist("forbid_bind"))

    if cfg.getbool("default_binds", True):
        for path in ("/dev", "/proc", "/sys"):
            binds.add({"src": path, "dst": path, "ro": False, "why": "default", "rec": True}, check=False)
        for path in ("/tmp", "/var/tmp"):
            binds.add({"src": path, "dst": path, "ro": False, "why": "default"}, check=False, required=False)
        for path in HOST_FILES:
            binds.add({"src": path, "dst": path, "ro": True, "why": "default"}, check=False, required=False)
        if not opts.no_home and home and home != "/" and os.path.isdir(home):
            binds.add({"src": home, "dst": home, "ro": False, "why": "home"}, check=False)
    for spec in cfg.getlist("bind"):
        binds.add(parse_bind(spec, "site"), check=False, required=False)

    mpi_mode = opts.mpi or cfg.get("mpi", "auto")
    launcher = None
    # hpcrun.mpi answers from launcher variables and the site's mpi_host_bind only: without
    # either, launcher() is None and host_binds() is empty, so a plain launch skips the import.
    if mpi_mode != "none" and (cfg.getlist("mpi_host_bind")
                               or any(k.startswith(MPI_ENV_PREFIXES) for k in environ)):
        from hpcrun import mpi
        launcher = mpi.launcher(environ)     # the keeper wires the container for it
        for b in mpi.host_binds(environ, cfg):
            # The launcher's session directories usually lie under /tmp, which is
            # bound already (and shows what appears in it later).  Binding them
            # again would only put a per-job path into the key: every mpirun
            # job would then build its own container instead of reusing one.
            if not _covered(b["src"], binds.items):
                binds.add(b, check=False, required=False)

    user_specs = split_binds([environ[n] for n in (apptainer_bind_var(environ), "HPCRUN_BIND")
                              if n and environ.get(n)]) + opts.binds
    if user_specs and not cfg.getbool("allow_user_binds", True):
        raise errors.Error(errors.NOPERM, "user binds are disabled by the site configuration", user_specs[0])
    for spec in user_specs:
        binds.add(parse_bind(spec, "user"))
    # A user's or the site's bind over a parent of a default bind (-B scratch:/home
    # with HOME=/home/me) decides what is there: the default would need a mount
    # point created in the user's host directory, so it yields.
    chosen = [b["dst"].rstrip("/") + "/" for b in binds.items if b["why"] in ("user", "site") and b.get("dir")]
    binds.items = [b for b in binds.items
                   if not (b["why"] in ("default", "home") and any(b["dst"].startswith(d) for d in chosen))]

    cwd = _cwd(environ)
    if cwd and not _under_any(cwd, binds.items) and not _system_dir(cwd):
        binds.add({"src": cwd, "dst": cwd, "ro": False, "why": "cwd"}, check=False, required=False)
    pwd_inside = opts.pwd or cwd or "/"

    base, dropped, user_env = environment.host_part(environ, opts.cleanenv, opts.env, opts.env_files)
    base["HPCRUN_CONTAINER"] = img.path
    if img.kind == "sif":
        # what Apptainer sets inside; scripts test them to know they run in a container
        name = os.path.basename(img.path)
        base.update(APPTAINER_CONTAINER=img.path, SINGULARITY_CONTAINER=img.path,
                    APPTAINER_NAME=name, SINGULARITY_NAME=name)
    base.setdefault("HOME", home)

    nv = gpu_wanted(opts.nv, environ, cfg, "nv")
    rocm = gpu_wanted(opts.rocm, environ, cfg, "rocm")
    plan = {
        "image": img.describe(),
        "image_meta": None,
        "uid": uid, "gid": gid, "userns": userns,
        "user": user,
        "mount_strategy": cfg.get("mount_strategy", "auto"),
        "writable_layer": cfg.get("writable_layer", "overlay"),
        "mpi": mpi_mode,
        "launcher": launcher,
        "nv": nv,
        "rocm": rocm,
        "binds": sorted(binds.items, key=lambda b: b["dst"].count("/")),
        "ld_library_path_prepend": [],
        "argv": list(opts.command),
        "runscript": opts.runscript,
        "cwd": pwd_inside,
        "env": {"base": base, "dropped": dropped, "user": user_env},
    }
    plan["key"] = key(plan, cfg)
    return plan


def apptainer_bind_var(environ):
    """The one Apptainer bind variable that counts, as Apptainer picks it:
    APPTAINER_BIND, else SINGULARITY_BIND (and their older *_BINDPATH forms)."""
    for n in ("APPTAINER_BIND", "APPTAINER_BINDPATH", "SINGULARITY_BIND", "SINGULARITY_BINDPATH"):
        if environ.get(n):
            return n
    return None


def key(plan, cfg=None):
    """Ranks with equal keys on a node share one container; anything that
    changes what the container holds must be part of it, the site config too
    (the keeper reads it: MPI and GPU wiring)."""
    site = sorted(cfg.values.items()) if cfg is not None else None
    parts = repr((plan["uid"], plan["gid"], plan["image"]["ident"], plan["image"]["path"],
                  plan["mount_strategy"], plan["writable_layer"], plan["mpi"], plan["launcher"],
                  plan["nv"], plan["rocm"],
                  [(b["src"], b["dst"], b["ro"]) for b in plan["binds"]], site)).encode()
    try:
        from _sha256 import sha256
    except ImportError:
        from hashlib import sha256
    return sha256(parts).hexdigest()[:24]


def gpu_wanted(flag, environ, cfg, kind):
    """--nv/--rocm on the command line, the admin's `nv = always` (a bad value
    is error 78 either way), or HPCRUN_NV=1 / HPCRUN_ROCM=1."""
    return (flag or cfg.getbool(kind, False)
            or environ.get("HPCRUN_%s" % kind.upper(), "").lower() in ("1", "yes", "true", "on"))


def user_entry(uid, environ):
    """The caller's passwd entry as a dict (a made-up one where NSS has none)."""
    import pwd                  # here, not at the top: most ranks never look (build)
    try:
        pw = pwd.getpwuid(uid)
        return {"name": pw.pw_name, "uid": uid, "gid": pw.pw_gid, "gecos": pw.pw_gecos,
                "home": pw.pw_dir, "shell": pw.pw_shell}
    except KeyError:
        name = environ.get("USER") or "user%d" % uid
        return {"name": name, "uid": uid, "gid": os.getgid(), "gecos": "", "home": environ.get("HOME", "/"),
                "shell": "/bin/sh"}


def _cwd(environ):
    """The real current directory: bound at its real path, so `cd ~/link` works too."""
    try:
        return os.getcwd()
    except OSError:
        return None


def _under_any(path, binds):
    for b in binds:
        d = b["dst"].rstrip("/") or "/"
        if d != "/" and b.get("dir", True) and (path == d or path.startswith(d + "/")):
            return True
    return False


def _covered(path, items):
    """path is visible at the same place through a directory bind already listed."""
    real = os.path.realpath(path)
    return any(b.get("dir") and b["src"] == b["dst"] and (real == b["src"] or real.startswith(b["src"].rstrip("/") + "/"))
               for b in items)


def _system_dir(path):
    if path == "/":
        return True
    return any(path == d or path.startswith(d + "/") for d in SYSTEM_DIRS)
