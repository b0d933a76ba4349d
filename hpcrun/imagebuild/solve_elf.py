"""ELF solver: the program interpreter and every DT_NEEDED library, found as
glibc's loader finds them, transitively.

Search order for a name without a slash (ld.so(8)): DT_RPATH of the object and
of the objects that loaded it (only when the object has no DT_RUNPATH),
LD_LIBRARY_PATH, DT_RUNPATH of the object, /etc/ld.so.cache, then the default
directories.  A candidate of another machine or word size is skipped, as the
loader skips it.
"""
import os
import platform

from hpcrun import elf, errors, ldcache

DEFAULT_DIRS = ["/lib/%s-linux-gnu" % platform.machine(), "/usr/lib/%s-linux-gnu" % platform.machine(),
                "/lib", "/usr/lib", "/lib64", "/usr/lib64"]
LIB = "lib/%s-linux-gnu" % platform.machine()      # what Debian's loader expands $LIB to


class Solver:
    def __init__(self, tree, env=None):
        self.tree = tree
        self.env = os.environ if env is None else env
        self.done = {}             # real host path -> ElfInfo
        self.by_soname = {}        # soname -> path it was resolved to (the loader loads a soname once)
        self.cache_dirs = set()    # directories of libraries the image's loader must find via its cache
        self.elves = []            # (image path, ElfInfo) of every ELF object added

    def add(self, path, why, info=None):
        """Add the ELF file at host path (already in the tree or not) and its dependencies."""
        real = os.path.realpath(path)
        if real in self.done or self._excluded(path):
            return
        info = info or elf.read(real)
        if info is None:
            return
        self.done[real] = info
        self.tree.add(path, why)
        self.elves.append((self.tree.image_path(real), info))
        origin = os.path.dirname(real) if info.interp or not info.soname else os.path.dirname(path)
        self._deps(path, origin, info, [])

    def _deps(self, path, origin, info, loaders):
        """loaders: [(origin, ElfInfo)] of the objects that loaded this one (for DT_RPATH)."""
        who = self.tree.image_path(path)
        if info.interp:
            if not os.path.exists(info.interp):
                raise errors.Error(errors.NOINPUT, "program interpreter %s not found" % info.interp, who)
            self.tree.add(info.interp, "interpreter of %s" % who)
            self.done.setdefault(os.path.realpath(info.interp), elf.read(info.interp))
        for name in info.needed:
            if name in self.by_soname:
                continue
            found, how = self.find(name, origin, info, loaders)
            if found is None:
                raise errors.Error(errors.NOINPUT, "cannot resolve shared library %s needed by %s" % (name, who),
                                   "searched: " + how)
            self.by_soname[name] = found
            if self._excluded(found):            # the spec leaves it out (the site provides it)
                continue
            if how in ("ld.so.cache", "LD_LIBRARY_PATH"):
                self.cache_dirs.add(os.path.dirname(found))
            self.tree.add(found, "%s needed by %s (via %s)" % (name, who, how))
            real = os.path.realpath(found)
            if real in self.done:
                continue
            dep = self.done[real] = elf.read(real)
            self.elves.append((self.tree.image_path(real), dep))
            self._deps(found, os.path.dirname(found), dep, loaders + [(origin, info)])

    def _excluded(self, path):
        return (self.tree.excluded(self.tree.image_path(os.path.abspath(path)))
                or self.tree.excluded(self.tree.image_path(os.path.realpath(path))))

    def missing(self, path):
        """The first library path's closure cannot resolve (None when all resolve);
        lets optional plugins be left out whole instead of half-added."""
        todo, seen = [(path, [])], set()
        while todo:
            p, loaders = todo.pop()
            real = os.path.realpath(p)
            if real in seen:
                continue
            seen.add(real)
            info = elf.read(real)
            if info is None:
                continue
            origin = os.path.dirname(p)
            for name in info.needed:
                if name in self.by_soname:
                    continue
                found, _ = self.find(name, origin, info, loaders)
                if found is None:
                    return name
                todo.append((found, loaders + [(origin, info)]))
        return None

    def find(self, name, origin, info, loaders):
        """(host path, how it was found) or (None, the places searched)."""
        if "/" in name:
            path = os.path.join(origin, name)
            return (path, "path") if self._fits(path, info) else (None, path)
        searched = []
        if not info.runpath:
            for o, i in [(origin, info)] + loaders[::-1]:
                if i.runpath:
                    continue
                hit = self._search(name, [_expand(d, o) for d in i.rpath], info, searched)
                if hit:
                    return hit, "RPATH of %s" % self.tree.image_path(o)
        lib_path = [d for d in self.env.get("LD_LIBRARY_PATH", "").split(":") if d]
        hit = self._search(name, lib_path, info, searched)
        if hit:
            return hit, "LD_LIBRARY_PATH"
        hit = self._search(name, [_expand(d, origin) for d in info.runpath], info, searched)
        if hit:
            return hit, "RUNPATH"
        for path in ldcache.read().get(name, []):
            if self._fits(path, info):
                return path, "ld.so.cache"
        searched.append("ld.so.cache")
        hit = self._search(name, DEFAULT_DIRS, info, searched)
        if hit:
            return hit, "default path"
        return None, ", ".join(searched)

    def _search(self, name, dirs, info, searched):
        for d in dirs:
            searched.append(d)
            path = os.path.join(d, name)
            if self._fits(path, info):
                return path
        return None

    def _fits(self, path, info):
        try:
            cand = elf.read(path) if os.path.isfile(path) else None
        except errors.Error:
            return False
        return cand is not None and cand.machine == info.machine and cand.bits == info.bits


def _expand(d, origin):
    for token in ("${ORIGIN}", "$ORIGIN"):
        d = d.replace(token, origin)
    for token in ("${LIB}", "$LIB"):
        d = d.replace(token, LIB)
    for token in ("${PLATFORM}", "$PLATFORM"):
        d = d.replace(token, platform.machine())
    return os.path.normpath(d)
