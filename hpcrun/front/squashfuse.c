/* hpcrun-squashfuse: squashfuse_ll's file system, without the per-open round trips.
 *
 *   hpcrun-squashfuse [-f] [-o offset=N] IMAGE MOUNTPOINT   (always in the foreground: -f is
 *                                                           squashfuse's flag for it)
 *
 * Why it exists (docs/staging.md, "The FUSE daemon"): each rank's MPI_Init opens
 * Open MPI's libraries and about 100 plugins.  Through squashfuse_ll every open()
 * is an OPEN and a RELEASE request to the one daemon, and every opendir() an
 * OPENDIR, READDIRs and a RELEASEDIR: about 210 requests per rank, 3,400 for
 * `mpirun -np 16 hello`, each a wake-up of the daemon on a node whose cores the
 * ranks already fill.  Lookups and attributes are cached by the kernel already.
 *
 * This daemon answers OPEN and OPENDIR with ENOSYS, once.  Since Linux 4.19
 * (files) and 5.1 (directories) the kernel then stops sending them for the
 * life of the mount, and no RELEASE either; it keeps file pages cached across
 * opens (FOPEN_KEEP_CACHE) and caches directory listings (FOPEN_CACHE_DIR).
 * What is left is a lookup per new name, and reads and readdirs of what is not
 * cached yet: the file system and its decompression are libsquashfuse's own
 * (the library of Debian's squashfuse), the same code squashfuse_ll runs.
 * READ and READDIR, which squashfuse_ll serves from what its OPEN left in the
 * file handle, find the inode by number here instead.
 *
 * The mount is read-only (ro: the kernel refuses every write with EROFS before
 * it reaches us), nosuid and nodev (libfuse's defaults).  The daemon runs as
 * the user, inside the keeper's namespaces, as squashfuse_ll would.  It is
 * built by `hpcrun install-entry` where libsquashfuse-dev and libfuse3-dev are
 * installed; without it the keeper runs squashfuse_ll.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <squashfuse/config.h>      /* FUSE_USE_VERSION, as the library was built */
#include <squashfuse/ll.h>

static void die_usage(void)
{
    fputs("usage: hpcrun-squashfuse [-f] [-o offset=N] IMAGE MOUNTPOINT\n", stderr);
    exit(2);
}

static void op_init(void *data, struct fuse_conn_info *conn)
{
    (void)data;
#ifdef FUSE_CAP_CACHE_SYMLINKS
    if (conn->capable & FUSE_CAP_CACHE_SYMLINKS)     /* readlink answers kept in the page cache */
        conn->want |= FUSE_CAP_CACHE_SYMLINKS;
#endif
#ifdef FUSE_CAP_NO_OPEN_SUPPORT
    conn->want |= conn->capable & (FUSE_CAP_NO_OPEN_SUPPORT | FUSE_CAP_NO_OPENDIR_SUPPORT);
#endif
}

/* "Not implemented": the kernel opens without asking from now on (see above). */
static void op_open_none(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    fuse_reply_err(req, ENOSYS);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    sqfs_ll_i lli;
    sqfs_off_t got = size;
    char *buf;
    (void)fi;
    if (sqfs_ll_iget(req, &lli, ino))
        return;                                   /* answered (ENOENT) */
    if (!S_ISREG(lli.inode.base.mode)) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    if (!(buf = malloc(size ? size : 1))) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    if (sqfs_read_range(&lli.ll->fs, &lli.inode, off, &got, buf))
        fuse_reply_err(req, EIO);
    else
        fuse_reply_buf(req, buf, got);
    free(buf);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    sqfs_ll_i lli;
    sqfs_dir dir;
    sqfs_name name;
    sqfs_dir_entry entry;
    sqfs_err err = SQFS_OK;
    struct stat st;
    char *buf, *pos;
    size_t left = size;
    (void)fi;
    if (sqfs_ll_iget(req, &lli, ino))
        return;
    if (!S_ISDIR(lli.inode.base.mode)) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    if (sqfs_dir_open(&lli.ll->fs, &lli.inode, &dir, off)) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (!(buf = pos = malloc(size ? size : 1))) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    memset(&st, 0, sizeof(st));
    sqfs_dentry_init(&entry, name);
    while (sqfs_dir_next(&lli.ll->fs, &dir, &entry, &err)) {
        size_t used;
        st.st_ino = lli.ll->ino_fuse_num(lli.ll, &entry);
        st.st_mode = sqfs_dentry_mode(&entry);
        used = sqfs_ll_add_direntry(req, pos, left, sqfs_dentry_name(&entry), &st,
                                    sqfs_dentry_next_offset(&entry));
        if (used > left)
            break;                                /* full: the kernel asks again from this offset */
        pos += used;
        left -= used;
    }
    if (err)
        fuse_reply_err(req, EIO);
    else
        fuse_reply_buf(req, buf, pos - buf);
    free(buf);
}

static const struct fuse_lowlevel_ops ops = {
    .init = op_init,
    .lookup = sqfs_ll_op_lookup,
    .forget = sqfs_ll_op_forget,
    .getattr = sqfs_ll_op_getattr,
    .readlink = sqfs_ll_op_readlink,
    .open = op_open_none,
    .read = op_read,
    .opendir = op_open_none,
    .readdir = op_readdir,
    .statfs = stfs_ll_op_statfs,
    .getxattr = sqfs_ll_op_getxattr,
    .listxattr = sqfs_ll_op_listxattr,
};

int main(int argc, char **argv)
{
    const char *image, *mountpoint;
    unsigned long long offset = 0;
    char *end;
    int i = 1, rc;
    struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
    struct fuse_session *se;
    sqfs_ll *ll;

    if (i < argc && strcmp(argv[i], "-f") == 0)
        i++;
    if (argc - i == 4 && strcmp(argv[i], "-o") == 0 && strncmp(argv[i + 1], "offset=", 7) == 0) {
        const char *n = argv[i + 1] + 7;
        errno = 0;
        offset = strtoull(n, &end, 10);
        if (errno || end == n || *end || *n == '-')
            die_usage();
        i += 2;
    }
    if (argc - i != 2)
        die_usage();
    image = argv[i];
    mountpoint = argv[i + 1];

    if (!(ll = sqfs_ll_open(image, (size_t)offset)))
        return 1;                                 /* the library said why, on stderr */
    if (fuse_opt_add_arg(&args, argv[0]) ||
        fuse_opt_add_arg(&args, "-o") ||
        fuse_opt_add_arg(&args, "ro,fsname=hpcrun-squashfuse,subtype=squashfuse"))
        return 1;
    se = fuse_session_new(&args, &ops, sizeof(ops), ll);
    if (!se)
        return 1;
    if (fuse_set_signal_handlers(se) || fuse_session_mount(se, mountpoint)) {
        fuse_session_destroy(se);
        return 1;
    }
    rc = fuse_session_loop(se);                   /* one thread: libsquashfuse's caches take no locks */
    fuse_session_unmount(se);
    fuse_remove_signal_handlers(se);
    fuse_session_destroy(se);
    sqfs_ll_destroy(ll);
    fuse_opt_free_args(&args);
    return rc ? 1 : 0;
}
