"""The system configuration: /etc/hpcrun/hpcrun.conf and its drop-ins.

Plain `key = value` lines, `#` comments; a key given several times (or with a
comma list) accumulates for list settings.  Files are read in order:
hpcrun.conf, then hpcrun.conf.d/*.conf sorted by name, so a site wires MPI,
fabric or GPU settings as numbered drop-ins (10-mpi.conf, 50-site.conf, ...).
HPCRUN_CONF names another main file (tests, personal installs).  Only the
administrator can write these files; HPCRUN_CONF, for a user, must name a
root-owned file too, so users never override a "forbid" setting.
docs/config.md lists every key.
"""
import os

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


class Config:
    def __init__(self, values, sources):
        self.values = values      # key -> list of raw strings, in file order
        self.sources = sources

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
        raise errors.Error(errors.CONFIG, "bad boolean for %s in config: %r" % (key, v), self.sources[-1] if self.sources else None)

    def getint(self, key, default=0):
        v = self.get(key)
        try:
            return int(v) if v is not None else default
        except ValueError:
            raise errors.Error(errors.CONFIG, "bad number for %s in config: %r" % (key, v))


def load(environ=os.environ):
    main = environ.get("HPCRUN_CONF") or DEFAULT_PATH
    files = [main]
    dropins = main + ".d"
    try:
        files += [os.path.join(dropins, n) for n in sorted(os.listdir(dropins)) if n.endswith(".conf")]
    except OSError:
        pass
    if environ.get("HPCRUN_CONF") and os.getuid() != 0:
        for path in files:
            _check_trusted(path)
    values, sources = {}, []
    for path in files:
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            if path == main and environ.get("HPCRUN_CONF"):
                raise errors.Error(errors.CONFIG, "config file not found", path)
            continue
        except OSError as e:
            raise errors.Error(errors.CONFIG, "config file not readable: %s" % e.strerror, path)
        sources.append(path)
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise errors.Error(errors.CONFIG, "expected 'key = value' at line %d" % n, path)
            key = key.strip().lower().replace(" ", "_").replace("-", "_")
            values.setdefault(key, []).append(value.strip())
    return Config(values, sources)


def _check_trusted(path):
    """HPCRUN_CONF may name another config (tests, a second install), but the
    config holds site policy (forbid_bind, allow_user_binds): for a user it
    must be the administrator's file, owned by root and writable only by root."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise errors.Error(errors.CONFIG, "config file not found", path)
    except OSError as e:
        raise errors.Error(errors.CONFIG, "config file not readable: %s" % e.strerror, path)
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise errors.Error(errors.CONFIG, "HPCRUN_CONF must name a file owned and writable only by root "
                           "(it holds site policy)", path)
