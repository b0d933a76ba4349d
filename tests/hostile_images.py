"""Hostile images for tests/test_hostile.py, built for real: a busybox root,
changed on purpose, packed with mksquashfs and written as an hpcrun image
(or a plain SquashFS file, or a hand-made header that lies).

Nothing here runs hpcrun; the tests do, as the unprivileged test user.
"""
import hashlib
import os
import shutil
import socket
import stat
import subprocess

import imagetools
from hpcrun import imagefile

PAGE = 4096

# Python modules hpcrun could import lazily once it is inside the container,
# where /usr/lib/python3.11 is the image's: each one, planted in the image,
# leaves a marker if it ever runs.  encodings/* covers codec lookups.
TRAPPED_STDLIB = ("traceback", "linecache", "tokenize", "json/__init__", "json/decoder", "json/scanner",
                  "json/encoder", "textwrap", "subprocess", "signal", "shutil", "tempfile", "locale",
                  "gettext", "warnings", "struct", "hashlib", "pwd", "grp", "ctypes/__init__", "fcntl",
                  "platform", "string", "re/__init__", "enum", "functools", "collections/__init__",
                  "contextlib", "importlib/util", "importlib/metadata/__init__", "sitecustomize",
                  "usercustomize", "_sha256", "select", "selectors", "threading", "socket", "errno",
                  "keyword", "operator", "reprlib", "copy", "weakref", "types", "io", "abc", "codecs",
                  "stat", "posixpath", "genericpath", "os", "site", "token", "ast", "dis", "inspect")
TRAPPED_CODECS = ("latin_1", "iso8859_1", "iso8859_15", "cp1252", "cp437", "utf_16", "utf_16_le", "utf_16_be",
                  "utf_32", "idna", "punycode", "ascii", "utf_8", "utf_8_sig", "euc_jp", "shift_jis",
                  "mbcs", "raw_unicode_escape", "unicode_escape", "charmap", "undefined", "hex_codec",
                  "base64_codec", "big5", "koi8_r", "mac_roman", "__init__", "aliases")
TRAP_MARK_DIR = "/hostile-out"          # a test binds a directory of its own here

SHOWIDS_C = r"""
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
/* What a program gets: its ids and the lines of /proc/self/status about privilege. */
int main(void) {
    uid_t r, e, s; gid_t gr, ge, gs;
    getresuid(&r, &e, &s); getresgid(&gr, &ge, &gs);
    printf("ids %d %d %d %d %d %d\n", (int)r, (int)e, (int)s, (int)gr, (int)ge, (int)gs);
    FILE *f = fopen("/proc/self/status", "r");
    char line[512];
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "Cap", 3) || !strncmp(line, "NoNewPrivs", 10) || !strncmp(line, "Uid", 3)
            || !strncmp(line, "Gid", 3))
            fputs(line, stdout);
    return 0;
}
"""

# Acts, from outside, with the capabilities a process gets in the namespaces a
# rank joined (what hostile code inside hpcrun's own process would hold after
# setns): joins the user and mount namespaces of PID, then one mount call.
NSMOUNT_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: nsmount PID remount-rw|umount|tmpfs PATH\n"); return 2; }
    char p[64];
    snprintf(p, sizeof p, "/proc/%s/ns/user", argv[1]);
    int u = open(p, O_RDONLY);
    snprintf(p, sizeof p, "/proc/%s/ns/mnt", argv[1]);
    int m = open(p, O_RDONLY);
    if (u < 0 || m < 0) { perror("open ns"); return 3; }
    if (setns(u, CLONE_NEWUSER)) { perror("setns user"); return 3; }
    if (setns(m, CLONE_NEWNS)) { perror("setns mnt"); return 3; }
    int rc;
    if (!strcmp(argv[2], "remount-rw"))
        rc = mount(NULL, argv[3], NULL, MS_REMOUNT | MS_BIND, NULL);
    else if (!strcmp(argv[2], "umount"))
        rc = umount2(argv[3], MNT_DETACH);
    else
        rc = mount("hostile", argv[3], "tmpfs", 0, "size=1m");
    if (rc) { printf("refused: %s\n", strerror(errno)); return 1; }
    printf("done\n");
    return 0;
}
"""

# Preloaded into whatever starts with LD_PRELOAD: leaves <dir>/<program name>.
PRELOAD_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
__attribute__((constructor)) static void mark(void) {
    char exe[256] = {0}, path[512];
    const char *dir = "%s";
    if (readlink("/proc/self/exe", exe, sizeof exe - 1) < 0) strcpy(exe, "unknown");
    const char *base = strrchr(exe, '/') ? strrchr(exe, '/') + 1 : exe;
    snprintf(path, sizeof path, "%%s/%%s", dir, base);
    int fd = open(path, O_WRONLY | O_CREAT, 0666);
    if (fd >= 0) close(fd);
}
"""


def compile_c(source, out, static=True, shared=False):
    src = out + ".c"
    with open(src, "w") as f:
        f.write(source)
    argv = ["gcc", "-O1", "-o", out, src]
    if shared:
        argv += ["-shared", "-fPIC"]
    elif static:
        argv.append("-static")
    subprocess.run(argv, check=True, capture_output=True)
    os.unlink(src)
    os.chmod(out, 0o755)
    return out


def base_root(root, token, runscript=None):
    """A busybox root whose /marker holds token, with /opt and /data dirs."""
    imagetools.make_busybox_root(root, runscript=runscript, env=[("PATH", "/bin:/usr/bin")])
    for d in ("opt", "data"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    write(root, "/marker", token + "\n")
    return root


def write(root, path, text, mode=0o644):
    p = os.path.join(root, path.lstrip("/"))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    if os.path.lexists(p):
        os.unlink(p)
    with open(p, "w") as f:
        f.write(text)
    os.chmod(p, mode)
    return p


def link(root, path, target):
    """Make root/path a symlink to target (replacing what is there)."""
    p = os.path.join(root, path.lstrip("/"))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    elif os.path.lexists(p):
        os.unlink(p)
    os.symlink(target, p)
    return p


def special(root, path, kind, dev=None):
    """Put a FIFO, socket or device node at root/path (we run as root)."""
    p = os.path.join(root, path.lstrip("/"))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    if os.path.lexists(p):
        os.unlink(p)
    if kind == "fifo":
        os.mkfifo(p, 0o644)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(p)
        s.close()
        os.chmod(p, 0o666)
    elif kind == "chr":
        os.mknod(p, 0o666 | stat.S_IFCHR, dev)
    elif kind == "blk":
        os.mknod(p, 0o666 | stat.S_IFBLK, dev)
    else:
        raise ValueError(kind)
    return p


def booby_trap(root, py_dirs=("/usr/lib/python3.11",)):
    """Plant Python modules that leave a marker (and shout on stderr) if hpcrun ever imports them."""
    for d in py_dirs:
        for name in TRAPPED_STDLIB:
            write(root, "%s/%s.py" % (d, name), _trap_code("%s:%s" % (d, name)))
        for name in TRAPPED_CODECS:
            write(root, "%s/encodings/%s.py" % (d, name), _trap_code("%s:encodings.%s" % (d, name)))


def _trap_code(label):
    return ("import sys as _s\n"
            "_s.stderr.write('HOSTILE IMAGE CODE RAN: %s\\n')\n"
            "try:\n"
            "    open('%s/%s', 'w').close()\n"
            "except Exception:\n"
            "    pass\n"
            "raise SystemExit(99)\n") % (label, TRAP_MARK_DIR, label.replace("/", "_"))


def image(root, out):
    """root -> hpcrun image (the header tells the truth).  The header's
    metadata comes from /.hpcrun/image.json only where that is a plain file
    (some cases make it a FIFO or a device)."""
    import json
    meta = {}
    p = os.path.join(root, ".hpcrun/image.json")
    if os.path.isfile(p) and not os.path.islink(p):
        with open(p) as f:
            meta = json.load(f)
    return imagetools.make_image(root, out, meta=meta)


def squashfs(root, out):
    return imagetools.mksquashfs(root, out)


def big_image(root, out, megabytes):
    """An hpcrun image with megabytes of random data stored uncompressed
    (-noD: quick to build), so that staging it takes a while."""
    with open(os.path.join(root, "opt", "big"), "wb") as f:
        for _ in range(megabytes):
            f.write(os.urandom(1 << 20))
    sq = out + ".sqfs.tmp"
    subprocess.run(["mksquashfs", root, sq, "-noappend", "-quiet", "-all-root", "-no-progress", "-noD"],
                   check=True, stdout=subprocess.DEVNULL)
    try:
        imagefile.write_image(out, sq, {}, mode=0o755)
    finally:
        os.unlink(sq)
    return out


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def raw_image(out, payload, fixed=None, meta=b"{}", offset=None, pad_to=None, tail=b""):
    """An hpcrun image written by hand, so its header can say anything.

    payload: SquashFS bytes.  fixed: the whole `HPCRUN-IMAGE ...` line (bytes,
    without newline); default: the true one.  offset: where the payload goes
    (default: the next page after the header)."""
    if offset is None:
        used = len(imagefile.SHEBANG) + 120 + len(meta)
        offset = (used + PAGE - 1) // PAGE * PAGE
    if fixed is None:
        fixed = b"HPCRUN-IMAGE 1 %d %d %s" % (offset, len(payload), hashlib.sha256(payload).hexdigest().encode())
    header = imagefile.SHEBANG + fixed + b"\n" + meta + b"\n"
    pad_end = pad_to if pad_to is not None else offset
    if len(header) > pad_end:
        header = header[:pad_end]
    with open(out, "wb") as f:
        f.write(header + b"\0" * (pad_end - len(header)))
        f.write(payload)
        f.write(tail)
    os.chmod(out, 0o755)
    return out


def lying_image(out, payload, claimed_sha256):
    """A well-formed image whose header names another payload's digest."""
    used = len(imagefile.SHEBANG) + 120
    offset = (used + PAGE - 1) // PAGE * PAGE
    fixed = b"HPCRUN-IMAGE 1 %d %d %s" % (offset, len(payload), claimed_sha256.encode())
    return raw_image(out, payload, fixed=fixed, offset=offset)
