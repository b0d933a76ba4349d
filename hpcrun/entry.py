"""hpcrun's own entry: Python isolated (-I), without site (-S), the rank's modules from one file.

`hpcrun install-entry` (cmd_install_entry.py, docs/install.md) writes, in place of pip's
console script (pip drops options from a script's first line):

  <bin>/hpcrun   `#!<python> -IS` and a few lines (BOOT below): open the bundle, run this
                 module's code from it (which runs the launch's modules: PRELOAD), then cli.main()
  <bin>/run-singularity   the same, then cli.run_singularity() (a SIF's #! line)
  hpcrun/__pycache__/hpcrun.<cache tag>.bundle
                 one marshal'd tuple (this module's code, the package directory's mtime,
                 {module: (file, is package, offset, size)}) followed by the modules'
                 marshal'd code at those offsets: what a rank imports (RANK_MODULES)

-I: no PYTHON* variable, user site or working directory acts before hpcrun's first line.
-S: no site module, .pth files or site-packages scan.  A rank then touches the install
tree 10 times (the script 8, the bundle 1, the package directory 1) instead of ~160.
A bundle older than the package directory (pip installed again) or of another Python
is not used: the modules load from their files, as they always can.

BOOT's first act is to switch the cyclic garbage collector off: a rank execs its program a
few milliseconds later, and until then the collector would only walk the modules being
imported, over and over (~0.3 ms of CPU a rank).  What outlives the launch turns it back
on: the node's keeper (node.py), every subcommand but the Slurm task entry (cli._sub).
"""
import sys

# The modules a rank imports (a joining one, an MPI rank, a Slurm task, a SIF); the
# rest (the keeper's stage/rootfs/linux, the subcommands, imagebuild) load from files.
RANK_MODULES = ("hpcrun", "hpcrun.entry", "hpcrun.rankos", "hpcrun.cli", "hpcrun.errors", "hpcrun.launch",
                "hpcrun.config", "hpcrun.environment", "hpcrun.image", "hpcrun.imagefile", "hpcrun.sif",
                "hpcrun.plan", "hpcrun.join", "hpcrun.fdio", "hpcrun.node", "hpcrun.rankcalls", "hpcrun.mpi",
                "hpcrun.cmd_task_entry")

# What every launch runs (cli -> launch -> plan -> join), run at once from the bundle, each
# after what it imports: the import system's own work (module locks, spec, finder, attributes)
# costs ~0.1 M instructions a module, more than most of these modules' own code.
PRELOAD = ("hpcrun", "hpcrun.errors", "hpcrun.rankos", "hpcrun.fdio", "hpcrun.node", "hpcrun.join",
           "hpcrun.imagefile", "hpcrun.image", "hpcrun.environment", "hpcrun.config", "hpcrun.plan",
           "hpcrun.launch", "hpcrun.cli")

# This Python's own extension modules a rank imports (rankcalls: setns and prctl, through _ctypes).
RANK_EXTENSIONS = ("_ctypes",)

# The installed scripts after their #! line (site: SITE; function: what in cli.py runs).  Short: each is compiled
# at every start (each line costs), the rest runs compiled from the bundle.
BOOT = """\
# Written by `hpcrun install-entry` (docs/install.md): hpcrun/entry.py, compiled, from the bundle.
import gc, marshal, posix, sys
gc.disable()                                # the rank execs its program in milliseconds (entry.py)
SITE = %(site)r
sys.path.append(SITE)
try:
    fd = posix.open(SITE + "/hpcrun/__pycache__/hpcrun.%%s.bundle" %% sys.implementation.cache_tag, posix.O_RDONLY)
    bundle = posix.read(fd, 1 << 24)
    head = marshal.loads(bundle)
    entry = {"__name__": "hpcrun.entry"}
    exec(head[0], entry)
    entry["use"](SITE, bundle, fd, head)
except Exception:
    pass                                    # no bundle for this Python: the files, as usual
from hpcrun.cli import %(function)s
sys.exit(%(function)s())
"""


class Bundle:
    """The meta-path finder and loader of the bundled modules."""

    def __init__(self, data, index, base):
        self.data, self.index, self.base = memoryview(data), index, base    # slices without copies

    def find_spec(self, name, path=None, target=None):
        found = self.index.get(name)
        if found is None:
            return extension_spec(name) if name in RANK_EXTENSIONS else None
        import _frozen_importlib
        # Not has_location: the import system would then work out a __cached__ (a .pyc path
        # nobody reads), ~5 us a module; exec_module sets __file__ itself.
        spec = _frozen_importlib.ModuleSpec(name, self, origin=found[0], is_package=found[1])
        if found[1]:
            spec.submodule_search_locations = [found[0].rpartition("/")[0]]    # the rest: files
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        import marshal
        origin, _, offset, size = self.index[module.__name__]
        module.__file__ = origin                                   # as from the file
        exec(marshal.loads(self.data[self.base + offset:self.base + offset + size]), module.__dict__)

    def preload(self, names):
        """Run the modules `names`, in that order, as the import system would (the same module
        attributes, sys.modules, the parent package's attribute), without its machinery."""
        import _frozen_importlib
        for name in names:
            if name in sys.modules:
                continue
            origin, is_pkg, _, _ = self.index[name]
            module = type(sys)(name)
            module.__spec__ = _frozen_importlib.ModuleSpec(name, self, origin=origin, is_package=is_pkg)
            module.__loader__ = self
            if is_pkg:
                module.__path__ = module.__spec__.submodule_search_locations = [origin.rpartition("/")[0]]
            module.__package__ = name if is_pkg else name.rpartition(".")[0]
            sys.modules[name] = module
            try:
                self.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)


def extension_spec(name):
    """The standard library's extension module `name` straight from its file in this Python's
    lib-dynload (on sys.path, where the path finder would find it): without the path finder's
    listing of that directory (~0.1 ms and 7 metadata calls a rank).  None where it is not
    there (built in, another layout): then the path finder, as usual."""
    import posix
    import _imp
    import _frozen_importlib_external as external
    if name in sys.builtin_module_names:
        return None
    for d in sys.path:
        if d.endswith("/lib-dynload"):
            path = "%s/%s%s" % (d, name, _imp.extension_suffixes()[0])
            try:
                regular = posix.stat(path).st_mode & 0o170000 == 0o100000
            except OSError:
                regular = False
            if regular:
                return external.spec_from_file_location(name, path, loader=external.ExtensionFileLoader(name, path))
            return None
    return None


def use(site, bundle, fd, head=None):
    """Serve the bundle's modules (first on sys.meta_path) if it was read whole, in one read,
    and made since the package directory last changed.  head: the bundle's first object, as
    BOOT unmarshalled it (not twice: ~50 us)."""
    import marshal
    import posix                # not os: rankos.py
    try:
        whole = not posix.read(fd, 1)
    finally:
        posix.close(fd)
    _, stamp, index, blobs = head or marshal.loads(bundle)
    if whole and stamp == posix.stat(site + "/hpcrun").st_mtime_ns and len(bundle) >= blobs:
        found = Bundle(bundle, index, len(bundle) - blobs)
        sys.meta_path.insert(0, found)
        found.preload(PRELOAD)


def add_site_dirs():
    """What -S left out, for a command that imports a package from outside the standard library
    (hpcrun broadcast: mpi4py) where SITE lacks it: the site directories of the Python the entry
    runs on and SITE's .pth files.  -I still keeps the user's site directory out."""
    if sys.flags.no_site:
        import os
        import site
        import hpcrun
        site.main()
        site.addsitedir(os.path.dirname(os.path.dirname(hpcrun.__file__)))


def make(pkg):
    """The bundle's bytes for the package directory pkg (cmd_install_entry writes them)."""
    import marshal
    import os
    stamp = os.stat(pkg).st_mtime_ns
    site = os.path.dirname(pkg)
    index, blobs = {}, []
    offset = 0
    for name in RANK_MODULES:
        rel = name.replace(".", "/")
        is_pkg = os.path.isdir(os.path.join(site, rel))
        origin = os.path.join(site, rel, "__init__.py") if is_pkg else os.path.join(site, rel + ".py")
        with open(origin, "rb") as f:
            blob = marshal.dumps(compile(f.read(), origin, "exec", dont_inherit=True))
        index[name] = (origin, is_pkg, offset, len(blob))
        blobs.append(blob)
        offset += len(blob)
    with open(os.path.join(pkg, "entry.py"), "rb") as f:
        me = compile(f.read(), os.path.join(pkg, "entry.py"), "exec", dont_inherit=True)
    return marshal.dumps((me, stamp, index, offset)) + b"".join(blobs)
