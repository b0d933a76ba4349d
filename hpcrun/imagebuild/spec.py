"""Parse a specfile (grammar: docs/specfile.md).

    From: base.tar             optional header line: a directory, image or archive
    ./hello.py                 paths to include, one a line (before any section,
    /usr/bin/env               or under %include); the first is the runscript
    %files                     SRC DST  copied to DST inside the image
    %env                       NAME=VALUE
    %labels                    KEY VALUE
    %runscript                 shell text, run by /bin/sh with the image's args
    %exclude                   GLOB  image paths left out (fnmatch, * matches /)

Lines starting with # are comments, blank lines are skipped everywhere except
inside %runscript, whose text is kept as written.
"""
import os
import shlex

from hpcrun import errors

SECTIONS = ("include", "files", "env", "labels", "runscript", "exclude")


class Spec:
    def __init__(self, path, text):
        self.path = path
        self.text = text
        self.dir = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
        self.base = None          # From: value, absolute
        self.paths = []           # [(line number, path as written)]
        self.files = []           # [(line number, src, dst)]
        self.env = []             # [(name, value)]
        self.labels = {}
        self.runscript = None     # shell text or None
        self.exclude = []         # globs of image paths left out

    def host_path(self, written):
        """A path as written in the spec, relative ones taken from the spec's directory."""
        return os.path.normpath(os.path.join(self.dir, os.path.expanduser(written)))


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise errors.Error(errors.NOINPUT, "spec file not found", path)
    except (PermissionError, IsADirectoryError):
        raise errors.Error(errors.NOINPUT, "spec file not readable", path)
    except UnicodeDecodeError:
        raise errors.Error(errors.DATA, "spec file is not UTF-8 text", path)
    return parse(text, path)


def parse(text, path=None):
    spec = Spec(path, text)
    where = path or "<spec>"
    section = "include"
    runscript = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        at = "%s:%d" % (where, n)
        if line.startswith("%"):
            name = line[1:].split()[0].lower() if line[1:].split() else ""
            if name not in SECTIONS:
                raise errors.Error(errors.DATA, "unknown section %%%s (known: %s)"
                                   % (name, ", ".join("%" + s for s in SECTIONS)), at)
            if name == "runscript" and spec.runscript is not None:
                raise errors.Error(errors.DATA, "second %runscript section", at)
            section = name
            if name == "runscript":
                spec.runscript = ""
            continue
        if section == "runscript":
            runscript.append(raw)
            continue
        if not line or line.startswith("#"):
            continue
        if section == "include" and line.lower().startswith("from:"):
            if spec.base or spec.paths:
                raise errors.Error(errors.DATA, "From: must come first and only once", at)
            value = line[5:].strip()
            if not value:
                raise errors.Error(errors.DATA, "From: needs a directory, image or archive", at)
            spec.base = spec.host_path(value)
        elif section == "include":
            spec.paths.append((n, line))
        elif section == "files":
            try:
                words = shlex.split(line)
            except ValueError as e:
                raise errors.Error(errors.DATA, "bad %%files line: %s" % e, at)
            if len(words) not in (1, 2):
                raise errors.Error(errors.DATA, "a %files line is SRC [DST]", at)
            dst = words[-1] if len(words) == 2 else words[0]
            if not dst.startswith("/"):
                raise errors.Error(errors.DATA, "%files destination must be absolute", at)
            spec.files.append((n, words[0], dst))
        elif section == "env":
            name, eq, value = line.partition("=")
            name = name.strip()
            if name.startswith("export "):
                name = name[7:].strip()
            if not eq or not name.replace("_", "a").isalnum() or name[0].isdigit():
                raise errors.Error(errors.DATA, "a %env line is NAME=VALUE", at)
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            spec.env.append((name, value))
        elif section == "exclude":
            if not line.startswith(("/", "*")):
                raise errors.Error(errors.DATA, "an %exclude glob matches image paths: start it with / or *", at)
            spec.exclude.append(line.rstrip("/") or "/")
        elif section == "labels":
            key, _, value = line.partition(" ")
            spec.labels[key] = value.strip()
    if spec.runscript is not None:
        spec.runscript = "\n".join(runscript).strip("\n") + "\n"
    return spec
