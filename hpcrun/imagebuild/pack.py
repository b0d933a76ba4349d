"""Pack a staged root into an hpcrun image: mksquashfs, then the header.

The SquashFS is written next to the output (same filesystem, hidden name) and
imagefile.write_image() renames the finished image into place, so a failed or
interrupted build never leaves a half-written OUT.img.
"""
import os
import subprocess
import sys
import tempfile

from hpcrun import errors, imagefile


def pack(root, out, meta, mode=0o755, progress=None, comp=None):
    if progress is None:
        progress = sys.stderr.isatty()
    out_dir = os.path.dirname(os.path.abspath(out))
    fd, sqfs = tempfile.mkstemp(prefix=".%s." % os.path.basename(out), suffix=".sqfs", dir=out_dir)
    os.close(fd)
    try:
        # -all-root: files belong to root in the image whoever built it;
        # -noappend: the temp file exists (mkstemp) and must be overwritten
        cmd = ["mksquashfs", root, sqfs, "-noappend", "-all-root", "-no-xattrs"]
        if comp:
            cmd += ["-comp", comp]
        cmd += [] if progress else ["-quiet", "-no-progress"]
        r = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["failed"])[-1]
            raise errors.Error(errors.CANTCREATE, "mksquashfs failed: %s" % last, out)
        try:
            return imagefile.write_image(out, sqfs, meta, mode=mode)
        except OSError as e:
            raise errors.Error(errors.CANTCREATE, "cannot write image: %s" % e.strerror, out)
    finally:
        try:
            os.unlink(sqfs)
        except OSError:
            pass
