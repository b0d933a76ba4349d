"""Build an image from a spec: stage a root, run the solvers, write metadata, pack.

Each path the spec lists goes through add_program(), which hands it to the
solver for its kind: ELF programs and libraries (solve_elf), `#!` scripts
(their interpreter, recursively), Python scripts (solve_python, once per
interpreter after all paths are in, with the Python files of the listed
directories).  After all files are in, solve_mpi records the MPI ABI of MPI
programs.
"""
import datetime
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile

import hpcrun
from hpcrun import errors
from hpcrun.imagebuild import base, pack, solve_elf, solve_mpi, solve_python
from hpcrun.imagebuild.tree import APP, Tree, exists, inside

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MOUNT_POINTS = ("proc", "sys", "dev", "tmp", "etc", "home", "var/tmp", "root", "run")
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


class Build:
    def __init__(self, spec, out, base_source=None, verbose=False, log=None, progress=None, platform=None):
        self.spec = spec
        self.platform = platform
        self.out = out
        self.base_source = base_source or spec.base
        self.log = log or (lambda line: None)
        self.verbose = verbose
        self.progress = progress
        self.note = self.log if verbose else (lambda line: None)
        self.warn = lambda line: self.log("hpcrun: warning: " + line)       # noqa: E731
        self.path_dirs = []          # PATH entries the image needs (from `#!/usr/bin/env NAME`)
        self.python = {}             # interpreter (host path) -> [scripts it runs]
        self.listed_dirs = []        # directories the spec lists (their Python files are scanned)

    def run(self):
        _check_output(self.out)
        staging = tempfile.mkdtemp(prefix="hpcrun-build-")
        os.chmod(staging, 0o755)          # it becomes the image's / (mkdtemp makes 0700)
        try:
            return self._run(staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _run(self, staging):
        spec = self.spec
        self.tree = tree = Tree(staging, spec.dir, self.log if self.verbose else None, exclude=spec.exclude)
        self.elf = solve_elf.Solver(tree)
        meta = {}
        if self.base_source:
            got = base.unpack(self.base_source, tree, self.note, self.platform)
            for line in got.get("warnings", ()):
                self.warn(line)
            if spec.exclude:
                _drop_excluded(tree)
            meta.update({k: v for k, v in got.items()
                         if k in ("runscript", "env", "labels", "mpi", "workdir", "image_user")})
        elif self.platform:
            raise errors.Error(errors.USAGE, "--platform needs --from (a docker archive or OCI layout)")
        for d in MOUNT_POINTS:
            tree.mkdir("/" + d)
        if meta.get("workdir") and not exists(staging, meta["workdir"]):
            tree.mkdir(meta["workdir"], "WORKDIR of the base")          # as Docker makes it
        os.chmod(inside(staging, "/tmp", follow_last=True), 0o1777)
        runscript = None
        for n, written in spec.paths:
            host = spec.host_path(written)
            if not os.path.lexists(host):
                raise errors.Error(errors.NOINPUT, "file not found: %s" % written, _where(spec, n))
            if not os.access(host, os.R_OK):
                raise errors.Error(errors.NOINPUT, "file not readable: %s" % written, _where(spec, n))
            argv = self.add_program(host, "listed in the spec, line %d" % n)
            if runscript is None and argv:
                runscript = argv
        for interpreter, scripts in self.python.items():
            extra = [f for d in self.listed_dirs for f in _python_files(d) if f not in scripts]
            solve_python.solve(tree, self.elf, scripts, interpreter, self.note, self.warn, extra)
        for n, src, dst in spec.files:
            host = spec.host_path(src)
            if not os.path.exists(host):
                raise errors.Error(errors.NOINPUT, "file not found: %s" % src, _where(spec, n))
            self._copy(host, dst, "%%files, line %d" % n)
        if spec.runscript is not None:
            if not exists(staging, "/bin/sh"):
                self.add_program("/bin/sh", "runs the %runscript section")
            tree.write("/.hpcrun/runscript", "#!/bin/sh\n" + spec.runscript, "the %runscript section", 0o755)
            runscript = ["/bin/sh", "/.hpcrun/runscript"]
        if runscript:
            meta["runscript"] = runscript
        meta["env"] = self._env(meta.get("env") or [])
        if spec.labels:
            meta["labels"] = dict(meta.get("labels") or {}, **spec.labels)
        mpi = solve_mpi.detect(self.elf)
        if mpi:
            meta["mpi"] = mpi
            solve_mpi.add_runtime(tree, self.elf, mpi, self.note)
        meta["build"] = {"spec": spec.text, "hpcrun_version": hpcrun.VERSION, "host": socket.gethostname(),
                         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if self.base_source:
            meta["build"]["from"] = self.base_source
        for name, content in (("passwd", PASSWD), ("group", GROUP)):
            if not exists(staging, "/etc/" + name):
                tree.write("/etc/" + name, content, "minimal user database")
        self._loader_cache(staging)
        if tree.specials_note():
            self.log("hpcrun: " + tree.specials_note())
        tree.mkdir("/.hpcrun")
        tree.write("/.hpcrun/image.json", json.dumps(meta, indent=1, sort_keys=True) + "\n", "metadata")
        tree.write("/.hpcrun/env", "".join("%s=%s\n" % (k, v) for k, v in meta["env"]), "environment")
        digest = pack.pack(staging, self.out, meta, progress=self.progress)
        return meta, digest

    def add_program(self, host, why):
        """Add host path with what it needs; return the argv that runs it in the image, or None."""
        st = os.stat(host)
        if stat.S_ISDIR(st.st_mode):
            self.tree.add_tree(host, why)
            self.listed_dirs.append(host)
            return None
        if not stat.S_ISREG(st.st_mode):          # a FIFO or a device: never opened
            raise errors.Error(errors.DATA, "not a regular file or directory", host)
        with open(host, "rb") as f:
            head = f.read(256)
        ipath = self.tree.image_path(host)
        if head[:4] == b"\x7fELF":
            self.elf.add(host, why)
            return [ipath]
        if head[:2] == b"#!":
            return self._script(host, head, why)
        self.tree.add(host, why)
        if host.endswith(".py"):
            python = shutil.which("python3") or "/usr/bin/python3"
            self.add_program(python, "interpreter of %s" % ipath)
            self.python.setdefault(python, []).append(host)
            return [self.tree.image_path(python), ipath]
        return [ipath] if os.access(host, os.X_OK) else None

    def _script(self, host, head, why):
        ipath = self.tree.image_path(host)
        line = head[2:].split(b"\n")[0].decode("utf-8", "replace").strip()
        words = line.split(None, 1)
        if not words:
            raise errors.Error(errors.DATA, "empty #! line", host)
        interp, arg = words[0], (words[1] if len(words) > 1 else "")
        if not os.path.exists(interp):
            raise errors.Error(errors.NOINPUT, "script interpreter %s not found" % interp, host)
        self.add_program(interp, "interpreter of %s" % ipath)
        program = interp
        if os.path.basename(interp) == "env" and arg:
            names = [w for w in arg.split() if not w.startswith("-") and "=" not in w]
            if names:
                found = shutil.which(names[0])
                if not found:
                    raise errors.Error(errors.NOINPUT, "%s (from #!%s) not found on PATH" % (names[0], line), host)
                self.add_program(found, "found on PATH by #!%s of %s" % (line, ipath))
                d = self.tree.image_path(os.path.dirname(found))
                if d not in self.path_dirs and d not in DEFAULT_PATH.split(":"):
                    self.path_dirs.append(d)
                program = found
        mapped = self.tree.image_path(interp)
        if mapped != interp:           # interpreter moved under /app: fix the #! line of the copy
            with open(host, "rb") as f:
                body = f.read().split(b"\n", 1)
            new = b"#!" + mapped.encode() + (b" " + arg.encode() if arg else b"") + b"\n"
            self.tree.write(ipath, (new + (body[1] if len(body) > 1 else b"")).decode("utf-8", "surrogateescape"),
                            why, 0o755)
        else:
            self.tree.add(host, why)
        if os.path.basename(program).startswith("python"):
            self.python.setdefault(program, []).append(host)
        return [ipath]

    def _copy(self, host, dst, why):
        if os.path.isdir(host):
            for top, dirs, files in os.walk(host):
                rel = os.path.relpath(top, host)
                for name in files:
                    path, ipath = os.path.join(top, name), os.path.normpath(os.path.join(dst, rel, name))
                    st = os.stat(path)
                    if stat.S_ISREG(st.st_mode):
                        self.tree.add(path, why, ipath)
                    else:
                        self.tree.special(ipath, st.st_mode, st.st_rdev, st.st_mtime_ns, why)
                for name in dirs:
                    self.tree.mkdir(os.path.normpath(os.path.join(dst, rel, name)), why)
        else:
            if dst.endswith("/"):
                dst += os.path.basename(host)
            self.tree.add(host, why, dst)

    def _env(self, inherited):
        env = [list(kv) for kv in inherited]
        names = [k for k, _ in env]
        path = DEFAULT_PATH
        literal = False
        if "PATH" in names:
            path = env[names.index("PATH")][1]
            env.pop(names.index("PATH"))
            if len(path) >= 2 and path[0] == path[-1] == "'":      # an image config's literal form
                path, literal = path[1:-1], True
        extra = [d for d in self.path_dirs + ([APP] if self.tree.has(APP) or _has_app(self.tree) else [])
                 if d not in path.split(":")]
        path = ":".join(extra + [path])
        env.insert(0, ["PATH", base.env_literal(path) if literal else path])
        for k, v in self.spec.env:
            env = [kv for kv in env if kv[0] != k] + [[k, v]]
        return env

    def _loader_cache(self, staging):
        """Libraries the host loader found through its cache outside the default
        directories need an ld.so.cache in the image too."""
        dirs = sorted(d for d in self.elf.cache_dirs if d not in solve_elf.DEFAULT_DIRS
                      and os.path.realpath(d) not in map(os.path.realpath, solve_elf.DEFAULT_DIRS))
        if not dirs:
            return
        cache = inside(staging, "/etc/ld.so.cache")
        r = subprocess.run(["ldconfig", "-X", "-C", cache, "-f", "/dev/null"] + dirs,
                           capture_output=True, text=True)
        if r.returncode == 0:
            self.tree.why["/etc/ld.so.cache"] = "loader cache for " + ", ".join(dirs)
            self.note("+ /etc/ld.so.cache  (for %s)" % ", ".join(dirs))


def _python_files(d):
    for top, dirs, files in os.walk(d):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(top, name)


def _drop_excluded(tree):
    """Remove what %exclude matches from the unpacked base."""
    for top, dirs, files in os.walk(tree.root):
        for name in dirs + files:
            path = os.path.join(top, name)
            if tree.excluded("/" + os.path.relpath(path, tree.root)):
                if name in dirs and not os.path.islink(path):
                    shutil.rmtree(path)
                    dirs.remove(name)
                else:
                    os.unlink(path)


def _has_app(tree):
    return any(p == APP or p.startswith(APP + "/") for p in tree.why)


def _where(spec, n):
    return "%s:%d" % (spec.path or "<spec>", n)


def _check_output(out):
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise errors.Error(errors.CANTCREATE, "output directory does not exist", d)
    if not os.access(d, os.W_OK | os.X_OK):
        raise errors.Error(errors.CANTCREATE, "output directory not writable", d)
    if os.path.isdir(out):
        raise errors.Error(errors.CANTCREATE, "output is a directory", out)
