"""The system configuration: /etc/hpcrun/hpcrun.conf and its drop-ins.

Plain `key = value` lines, `#` comments; a key given several times (or with a
comma list) accumulates for list settings.  Files are read in order:
hpcrun.conf, then hpcrun.conf.d/*.conf sorted by name, so a site wires MPI,
fabric or GPU settings as numbered drop-ins (10-mpi.conf, 50-site.conf, ...).
HPCRUN_CONF names another main file.  For root it replaces the site's file
(an administrator trying a new one).  For a user it can never loosen site
policy, whoever owns it: the site's files are read first and stay the only
source of policy, and the user's file comes after them with what a user may
choose (USER_KEYS) and restrictions that add to the site's (TIGHTEN_ONLY).
docs/config.md lists every key.
"""
from hpcrun import rankos as os     # os without its import cost (rankos.py)
import _stat as stat     # stat.py's C half, all of it a rank uses (stat.py: ~0.2 M instructions more)

from hpcrun import errors

DEFAULT_PATH = "/etc/hpcrun/hpcrun.conf"

DEFAULTS = {
    "mount_strategy": "auto",       # auto | kernel | fuse | extract
    "writable_layer": "overlay",    # overlay | none (then bind destinations must exist)
    "run_dir": "/tmp/hpcrun-%u",    # node-local: locks, keeper records, staged payloads
    "linger": "10",                 # seconds a node's container outlives its last process
    "default_binds": "yes",         # /dev /proc /sys /tmp /var/tmp $HOME cwd /etc/hosts ...
    "allow_user_binds": "yes",
    "mpi": "auto",
    "nv": "no",
}


# Every key some module reads (docs/config.md has a row or a line for each).  The
# launch ignores others; `hpcrun check` names them, so a typo such as
# `forbid-bnd` does not silently leave a policy unset.
KNOWN_KEYS = frozenset((
    "mount_strategy", "writable_layer", "run_dir", "broadcast_dir", "linger", "keeper_timeout",
    "require_signature", "allowed_signers", "sif_keyring",
    "default_binds", "bind", "allow_user_binds", "forbid_bind",
    "mpi", "mpi_auto_prefer", "mpi_lib", "mpi_flavor", "mpi_version", "mpi_host_extra", "fabric_extra",
    "mpi_ldcache", "mpi_host_bind", "mpi_site_mca_params", "munge_socket_dir",
    "nv", "nv_extra", "nv_devices", "nv_ldcache", "nv_path", "nv_container_cli",
    "rocm", "rocm_extra", "rocm_devices", "rocm_ldcache", "rocm_path"))


# What a user's HPCRUN_CONF may set: choices that are the user's own anyway
# (most have a command-line or environment equivalent).  Everything else -
# binds, host libraries and devices, mount_strategy, any key added later - is
# site policy, refused from a user's file (fail closed).
USER_KEYS = frozenset(("linger", "keeper_timeout", "run_dir", "broadcast_dir", "mpi", "mpi_auto_prefer", "nv", "rocm",
                       "writable_layer"))
# Keys a user's file may only make stricter: forbid_bind adds to the list; a
# boolean may be switched to "no" only.
TIGHTEN_ONLY = frozenset(("forbid_bind", "allow_user_binds", "default_binds"))


class Config:
    def __init__(self, values, sources):
        self.values = values      # key -> list of raw strings, in file order
        self.sources = sources
        self.origin = {}          # key -> the file that set it last

    def get(self, key, default=None):
        v = self.values.get(key)
        if v:
            return v[-1]
        return DEFAULTS.get(key, default)

    def getlist(self, key):
        out = []
        for v in self.values.get(key, []):
            out.extend(x.strip() for x in v.split(",") if x.strip())
        return out

    def getbool(self, key, default=False):
        v = self.get(key)
        if v is None:
            return default
        v = v.strip().lower()
        if v in ("1", "yes", "true", "on", "always"):
            return True
        if v in ("0", "no", "false", "off", "never"):
            return False
        raise errors.Error(errors.CONFIG, "bad boolean for %s in config: %r" % (key, v), self.origin.get(key))

    def getint(self, key, default=0):
        v = self.get(key)
        try:
            return int(v) if v is not None else default
        except ValueError:
            raise errors.Error(errors.CONFIG, "bad number for %s in config: %r" % (key, v))


def load(environ=None):
    if environ is None:
        environ = os.environ_dict()
    chosen = environ.get("HPCRUN_CONF")
    if not chosen or os.getuid() == 0:
        cfg = Config({}, [])
        _read_files(cfg, chosen or DEFAULT_PATH, required=bool(chosen))
        return cfg
    cfg = Config({}, [])
    _read_files(cfg, DEFAULT_PATH, required=False)
    if os.path.realpath(chosen) == os.path.realpath(DEFAULT_PATH):
        return cfg
    mine = Config({}, [])
    _read_files(mine, chosen, required=True)
    _add_users_own(cfg, mine)
    return cfg


def _read_files(cfg, main, required):
    files = [main]
    dropins = main + ".d"
    try:
        files += [os.path.join(dropins, n) for n in sorted(os.listdir(dropins)) if n.endswith(".conf")]
    except OSError:
        pass
    for path in files:
        try:
            text = _read_text(path)
        except FileNotFoundError:
            if path == main and required:
                raise errors.Error(errors.CONFIG, "config file not found", path)
            continue
        except OSError as e:
            raise errors.Error(errors.CONFIG, "config file not readable: %s" % e.strerror, path)
        cfg.sources.append(path)
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise errors.Error(errors.CONFIG, "expected 'key = value' at line %d" % n, path)
            key = key.strip().lower().replace(" ", "_").replace("-", "_")
            cfg.values.setdefault(key, []).append(value.strip())
            cfg.origin[key] = path


def _read_text(path):
    """A config file's text; a FIFO or device (HPCRUN_CONF=/dev/zero) is
    refused, not read forever or waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:
            raise errors.Error(errors.CONFIG, "config file is not a regular file of at most 1 MiB", path)
        data = b""
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.Error(errors.CONFIG, "config file is not UTF-8 text", path)


def _add_users_own(site, mine):
    """Merge a user's HPCRUN_CONF into the site's config without loosening it."""
    for key, values in mine.values.items():
        where = mine.origin[key]
        if key in USER_KEYS or key == "forbid_bind":
            site.values.setdefault(key, []).extend(values)
        elif key in TIGHTEN_ONLY:
            if mine.getbool(key) and not site.getbool(key, True):
                raise errors.Error(errors.CONFIG, "HPCRUN_CONF cannot loosen the site's policy: %s is no in %s"
                                   % (key, site.origin.get(key, DEFAULT_PATH)), where)
            site.values.setdefault(key, []).extend(values)
        else:
            raise errors.Error(errors.CONFIG, "HPCRUN_CONF cannot set %s: site policy, set only in %s "
                               "(a user's file may set %s, and restrict %s)"
                               % (key, DEFAULT_PATH, ", ".join(sorted(USER_KEYS)),
                                  ", ".join(sorted(TIGHTEN_ONLY))), where)
    site.sources += mine.sources
