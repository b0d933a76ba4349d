"""hpcrun build [-v] [--from SOURCE [--platform OS/ARCH[/VARIANT]]] [--no-exec] OUT.img [SPEC]

SPEC is a specfile (docs/specfile.md) or, as a one-line spec, a program or
script to pack with everything it needs.  --from SOURCE starts from a base
(directory, image, docker save tarball or OCI layout); with no SPEC the base
is repacked as an hpcrun image.  From a multi-platform docker/OCI image the
host's platform is taken, or the one --platform names.
"""
import argparse
import os
import stat
import sys
import time

from hpcrun import errors


def main(argv):
    p = Parser(prog="hpcrun build", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT.img")
    p.add_argument("spec", metavar="SPEC", nargs="?")
    p.add_argument("--from", dest="base", metavar="SOURCE", help="directory, image or archive to start from")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="the image to take from a multi-platform base (default: this host's)")
    p.add_argument("-v", "--verbose", action="store_true", help="say why each file is in the image")
    p.add_argument("--no-exec", action="store_true", help="do not make the image executable")
    p.add_argument("--progress", choices=("auto", "yes", "no"), default="auto")
    args = p.parse_args(argv)
    if not args.spec and not args.base:
        raise errors.Error(errors.USAGE, "hpcrun build needs a SPEC or --from SOURCE")
    from hpcrun.imagebuild import base, builder, spec as specmod
    platform = base.parse_platform(args.platform) if args.platform else None
    if args.spec:
        spec = _load_spec(specmod, args.spec)
    else:
        spec = specmod.parse("", None)
    progress = {"auto": None, "yes": True, "no": False}[args.progress]
    log = lambda line: print(line, file=sys.stderr)          # noqa: E731
    t0 = time.monotonic()
    meta, digest = builder.Build(spec, args.out, base_source=args.base and os.path.abspath(args.base),
                                 verbose=args.verbose, log=log, progress=progress,
                                 platform=platform).run()
    if args.no_exec:
        os.chmod(args.out, os.stat(args.out).st_mode & ~0o111)
    size = os.stat(args.out).st_size
    print("built %s: %.1f MiB, sha256 %s, %.1f s" % (args.out, size / 1048576.0, digest, time.monotonic() - t0),
          file=sys.stderr)
    return 0


def _load_spec(specmod, path):
    """A specfile, or a program/script given directly (a one-line spec)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):       # a FIFO or device would block or never end
            raise errors.Error(errors.DATA, "spec is not a regular file", path)
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise errors.Error(errors.NOINPUT, "spec file not found", path)
    except OSError as e:
        raise errors.Error(errors.NOINPUT, "spec file not readable: %s" % e.strerror, path)
    if head == b"\x7fELF" or head[:2] == b"#!" or path.endswith(".py"):
        spec = specmod.parse(os.path.basename(path) + "\n", os.path.abspath(path))
        return spec
    return specmod.load(path)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise errors.Error(errors.USAGE, message, self.prog)
