/*
 * spank_hpcrun: run Slurm job tasks inside hpcrun images.
 *
 * plugstack.conf:
 *   required /usr/lib/hpcrun/spank_hpcrun.so hpcrun=/usr/bin/hpcrun [mounts=/scratch,...]
 *            [batch=no|yes] [container=yes|no] [skip=orted,prted]
 *            [bcast_tmp=/tmp] [bcast_clean=yes|no]
 *
 * User options (srun, sbatch, salloc; names follow Pyxis where they can):
 *   --container-image=IMG      run the step's tasks in IMG
 *   --container-mounts=LIST    extra binds, SRC[:DST[:ro|rw]] comma list (hpcrun -B)
 *   --container-workdir=DIR    working directory inside the image
 *   --container-env=LIST       NAME (the task's value wins over the image's) or NAME=VALUE
 *   --container-batch          run the batch script itself inside the image too
 *   --container-pin=yes|no     no: run the image as it is at launch, not as it was
 *                              at submission (the cli_filter pins it; docs/slurm.md)
 *   --container-bcast          before the step starts, copy the image once to every
 *                              node's local storage with Slurm's own tree (sbcast);
 *                              the tasks then mount the local copy (docs/slurm.md)
 *
 * Which image (first non-empty): --container-image, the task's HPCRUN_IMAGE
 * (the cli_filter exports it), Slurm's own --container (SLURM_CONTAINER) unless
 * it is an OCI bundle directory (a config.json inside: Slurm's runtime, not us).
 * A missing or empty image is still handed to hpcrun, so the task fails with
 * hpcrun's clear error and exit code instead of silently running on the host;
 * HPCRUN_TASK_IMAGE_FROM names the source for that error.
 *
 * How a task is wrapped: slurm_spank_task_init runs in the task process just
 * before Slurm resolves and execve()s argv[0].  We replace argv[0] with the
 * hpcrun path; the array cannot grow, so the original argv[0] and the options
 * travel in HPCRUN_TASK_* variables.  hpcrun sees HPCRUN_TASK_ARGV0, takes
 * its own argv[1:] as the original arguments (hpcrun/cmd_task_entry.py) and
 * execs the program in place inside the image: same PID, PMIx environment,
 * fds, signals and exit status.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

SPANK_PLUGIN(hpcrun, 1);

/* plugstack.conf arguments */
static char *hpcrun_path = NULL;
static char *default_mounts = NULL;
static int batch_default = 0;
static int use_slurm_container = 1;
static char *skip_list = NULL;   /* programs that stay on the host (MPI daemons) */
static char *bcast_tmp = NULL;   /* node-local directory sbcast writes into */
static int bcast_clean = 1;      /* job epilog: remove the job's broadcast copies */

/* user options (set by the callbacks in every context the option reaches) */
static char *opt_image = NULL;
static char *opt_mounts = NULL;
static char *opt_workdir = NULL;
static char *opt_env = NULL;
static int opt_batch = 0;
static int opt_unpinned = 0;
static int opt_bcast = 0;

enum { OPT_IMAGE, OPT_MOUNTS, OPT_WORKDIR, OPT_ENV, OPT_BATCH, OPT_PIN, OPT_BCAST };

static int set_option(int val, const char *optarg, int remote);

/* Indexed by the enum above: set_option names an option by its val. */
static struct spank_option options[] = {
    { "container-image", "IMG", "Run the tasks inside the hpcrun image IMG", 1, OPT_IMAGE, set_option },
    { "container-mounts", "SRC[:DST[:ro]],...", "Bind host paths into the image", 1, OPT_MOUNTS,
      set_option },
    { "container-workdir", "DIR", "Working directory inside the image", 1, OPT_WORKDIR, set_option },
    { "container-env", "NAME[=VALUE],...", "Variables whose task value wins over the image's", 1,
      OPT_ENV, set_option },
    { "container-batch", NULL, "Run the batch script inside the image too", 0, OPT_BATCH,
      set_option },
    { "container-pin", "yes|no", "no: run the image as it is at launch, not as submitted", 1, OPT_PIN,
      set_option },
    { "container-bcast", NULL, "Copy the image to every node's local storage first (sbcast)", 0,
      OPT_BCAST, set_option },
    SPANK_OPTIONS_TABLE_END
};

static int set_option(int val, const char *optarg, int remote)
{
    char **slot = NULL;
    (void) remote;
    switch (val) {
    case OPT_IMAGE: slot = &opt_image; break;
    case OPT_MOUNTS: slot = &opt_mounts; break;
    case OPT_WORKDIR: slot = &opt_workdir; break;
    case OPT_ENV: slot = &opt_env; break;
    case OPT_BATCH: opt_batch = 1; return 0;
    case OPT_BCAST: opt_bcast = 1; return 0;
    case OPT_PIN:
        if (optarg == NULL || (strcmp(optarg, "yes") != 0 && strcmp(optarg, "no") != 0)) {
            slurm_error("hpcrun: --container-pin must be yes or no");
            return -1;
        }
        opt_unpinned = strcmp(optarg, "no") == 0;
        return 0;
    default: return -1;
    }
    if (optarg == NULL || *optarg == '\0') {
        /* Most often an unset shell variable: say which option, refuse the job. */
        slurm_error("hpcrun: --%s is empty: it needs a value", options[val].name);
        return -1;
    }
    free(*slot);
    *slot = strdup(optarg);
    return 0;
}

static int yes(const char *v)
{
    return strcmp(v, "yes") == 0 || strcmp(v, "1") == 0 || strcmp(v, "true") == 0;
}

static int parse_args(int ac, char **av)
{
    for (int i = 0; i < ac; i++) {
        const char *a = av[i];
        if (strncmp(a, "hpcrun=", 7) == 0)
            hpcrun_path = strdup(a + 7);
        else if (strncmp(a, "mounts=", 7) == 0)
            default_mounts = strdup(a + 7);
        else if (strncmp(a, "batch=", 6) == 0)
            batch_default = yes(a + 6);
        else if (strncmp(a, "container=", 10) == 0)
            use_slurm_container = yes(a + 10);
        else if (strncmp(a, "skip=", 5) == 0)
            skip_list = strdup(a + 5);
        else if (strncmp(a, "bcast_tmp=", 10) == 0 && a[10] == '/')
            bcast_tmp = strdup(a + 10);
        else if (strncmp(a, "bcast_clean=", 12) == 0)
            bcast_clean = yes(a + 12);
        else {
            slurm_error("hpcrun: unknown plugstack.conf argument \"%s\"", a);
            return -1;
        }
    }
    if (skip_list == NULL)
        skip_list = strdup("orted,prted,hydra_pmi_proxy");
    if (bcast_tmp == NULL)
        bcast_tmp = strdup("/tmp");
    return 0;
}

/* Options must be registered here, not through a static spank_options table:
 * sbatch and salloc ignore the table (allocator context). */
int slurm_spank_init(spank_t sp, int ac, char **av)
{
    spank_context_t ctx = spank_context();
    if (ctx != S_CTX_LOCAL && ctx != S_CTX_ALLOCATOR && ctx != S_CTX_REMOTE)
        return 0;
    if (parse_args(ac, av) < 0)
        return -1;
    if (ctx == S_CTX_REMOTE && hpcrun_path == NULL) {
        slurm_error("hpcrun: plugstack.conf lacks hpcrun=/path/to/hpcrun");
        return -1;
    }
    for (struct spank_option *o = options; o->name != NULL; o++)
        if (spank_option_register(sp, o) != ESPANK_SUCCESS) {
            slurm_error("hpcrun: cannot register option --%s", o->name);
            return -1;
        }
    return 0;
}

/* The task's value of var in buf, or NULL when unset; "" when set but empty. */
static const char *task_env(spank_t sp, const char *var, char *buf, int len)
{
    if (spank_getenv(sp, var, buf, len) != ESPANK_SUCCESS)
        return NULL;
    return buf;
}

/* An OCI bundle directory belongs to Slurm's own container runtime. */
static int is_oci_bundle(const char *path, const char *cwd)
{
    char full[4096], cfg[4200];
    struct stat st;
    int n = path[0] == '/' || cwd == NULL ? snprintf(full, sizeof full, "%s", path)
                                          : snprintf(full, sizeof full, "%s/%s", cwd, path);
    if (n < 0 || (size_t) n >= sizeof full)   /* too long for a path: not a bundle we can see */
        return 0;
    if (stat(full, &st) != 0 || !S_ISDIR(st.st_mode))
        return 0;
    snprintf(cfg, sizeof cfg, "%s/config.json", full);
    return access(cfg, F_OK) == 0;
}

/* Is the basename of prog in the comma list? */
static int skipped(const char *prog)
{
    const char *base = strrchr(prog, '/');
    size_t n;
    base = base ? base + 1 : prog;
    n = strlen(base);
    for (const char *p = skip_list; p && *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t) (end - p) : strlen(p);
        if (len == n && strncmp(p, base, n) == 0)
            return 1;
        p = end ? end + 1 : NULL;
    }
    return 0;
}

/* Do two paths name programs of the same name (hpcrun, typed or absolute)? */
static int same_base(const char *a, const char *b)
{
    const char *x = strrchr(a, '/'), *y = strrchr(b, '/');
    return strcmp(x ? x + 1 : a, y ? y + 1 : b) == 0;
}

static int set(spank_t sp, const char *var, const char *val)
{
    if (val == NULL || *val == '\0')
        return spank_unsetenv(sp, var) == ESPANK_SUCCESS ? 0 : -1;
    if (spank_setenv(sp, var, val, 1) != ESPANK_SUCCESS) {
        slurm_error("hpcrun: cannot set %s", var);
        return -1;
    }
    return 0;
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
    static char img_buf[4096], cont_buf[4096], cwd_buf[4096], mounts[8192];
    const char *image = opt_image, *from = "--container-image", *c;
    uint32_t stepid = 0;
    int argc = 0;
    char **argv = NULL;
    (void) ac; (void) av;

    if (!spank_remote(sp))
        return 0;
    /* Never inherit a handshake from an outer job: only we set it. */
    spank_unsetenv(sp, "HPCRUN_TASK_ARGV0");
    /* The step's broadcast failed (srun said why): no task runs. */
    if (task_env(sp, "HPCRUN_TASK_BCAST_FAILED", img_buf, sizeof img_buf) != NULL) {
        spank_unsetenv(sp, "HPCRUN_TASK_BCAST_FAILED");
        if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) == ESPANK_SUCCESS && argc >= 1)
            argv[0] = strdup("false");
        return 0;
    }
    /* The broadcast's own helper steps stay on the host. */
    if (task_env(sp, "HPCRUN_TASK_BCAST_STEP", img_buf, sizeof img_buf) != NULL) {
        spank_unsetenv(sp, "HPCRUN_TASK_BCAST_STEP");
        return 0;
    }

    if (spank_get_item(sp, S_JOB_STEPID, &stepid) != ESPANK_SUCCESS)
        return 0;
    if (stepid == SLURM_BATCH_SCRIPT && !(opt_batch || batch_default))
        return 0;   /* the batch script runs on the host; its sruns are wrapped */

    /* The first non-empty source wins.  One that is set but empty (an unset
     * shell variable, `--container=`) still wraps the task when nothing else
     * names an image, so hpcrun refuses it by name (usage error) instead of
     * the task running on the host unnoticed. */
    if (image == NULL && (c = task_env(sp, "HPCRUN_IMAGE", img_buf, sizeof img_buf)) != NULL) {
        image = c;
        from = "HPCRUN_IMAGE";
    }
    if ((image == NULL || *image == '\0') && use_slurm_container
        && (c = task_env(sp, "SLURM_CONTAINER", cont_buf, sizeof cont_buf)) != NULL
        && (*c == '\0' ? image == NULL : !is_oci_bundle(c, getcwd(cwd_buf, sizeof cwd_buf)))) {
        image = c;
        from = "--container";
    }
    if (image == NULL)
        return 0;

    if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS || argc < 1)
        return 0;
    if (skipped(argv[0]) || same_base(argv[0], hpcrun_path))
        return 0;   /* MPI daemons, and hpcrun itself (srun hpcrun broadcast IMG), stay on the host */

    mounts[0] = '\0';
    if (default_mounts)
        snprintf(mounts, sizeof mounts, "%s", default_mounts);
    if (opt_mounts)
        snprintf(mounts + strlen(mounts), sizeof mounts - strlen(mounts), "%s%s",
                 mounts[0] ? "," : "", opt_mounts);

    if (set(sp, "HPCRUN_TASK_IMAGE", image) || set(sp, "HPCRUN_TASK_IMAGE_FROM", from)
        || set(sp, "HPCRUN_TASK_BIND", mounts)
        || set(sp, "HPCRUN_TASK_PWD", opt_workdir) || set(sp, "HPCRUN_TASK_ENV", opt_env)
        || set(sp, "HPCRUN_TASK_BATCH", stepid == SLURM_BATCH_SCRIPT ? "1" : NULL)
        || set(sp, "HPCRUN_TASK_ARGV0", argv[0]))
        return -1;
    /* A step that asks for the latest image drops a pin inherited from its job. */
    if (opt_unpinned && (set(sp, "HPCRUN_IMAGE_DIGEST", NULL) || set(sp, "HPCRUN_IMAGE_DIGEST_PATH", NULL)))
        return -1;
    /* The task process execs argv[0] right after us, so this copy is never freed. */
    argv[0] = strdup(hpcrun_path);
    return argv[0] ? 0 : -1;
}

/* -- --container-bcast: the image to every node's local storage, once per step ----------------
 *
 * In srun (local context), after the allocation exists and before the step's
 * tasks start: `sbcast` sends the image file, read once, down Slurm's own tree
 * to <bcast_tmp>/.hpcrun-sbcast.<uid>.<job>.<step>.<random> on every node of the job;
 * then a helper step (one task per node, --overlap) runs
 * `hpcrun broadcast --mpi no --for IMAGE THAT_FILE`, which verifies the payload
 * and lands it atomically in the node's broadcast directory
 * (docs/broadcast.md), and removes the sbcast file.  The step's launches then
 * mount the local copy.  The job epilog (slurm_spank_job_epilog, below)
 * removes the job's copies on every node. */

#define SBCAST_PREFIX ".hpcrun-sbcast"

/* Run argv, with HPCRUN_TASK_BCAST_STEP=1 and without the variables that name an
 * image (the helper steps must not run inside it, nor broadcast again); its
 * stdout and stderr go to out (NUL-terminated, truncated).  Returns the exit
 * status, 128+signal, or -1. */
static int run_capture(char *const argv[], char *out, size_t outlen)
{
    int fds[2], st;
    size_t used = 0;
    ssize_t n;
    pid_t pid;
    char sink[4096];

    if (pipe(fds) != 0)
        return -1;
    pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        return -1;
    }
    if (pid == 0) {
        dup2(fds[1], 1);
        dup2(fds[1], 2);
        close(fds[0]);
        close(fds[1]);
        setenv("HPCRUN_TASK_BCAST_STEP", "1", 1);
        unsetenv("HPCRUN_IMAGE");
        unsetenv("SLURM_CONTAINER");
        execvp(argv[0], argv);
        fprintf(stderr, "cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(fds[1]);
    out[0] = '\0';
    for (;;) {
        char *buf = used + 1 < outlen ? out + used : sink;
        size_t room = used + 1 < outlen ? outlen - used - 1 : sizeof sink;
        n = read(fds[0], buf, room);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        if (buf == out + used) {
            used += (size_t) n;
            out[used] = '\0';
        }
    }
    close(fds[0]);
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* The first line of text that starts with prefix (or the first line at all
 * when prefix is NULL), copied into line. */
static const char *first_line(const char *text, const char *prefix, char *line, size_t len)
{
    for (const char *p = text; p && *p;) {
        const char *end = strchr(p, '\n');
        size_t n = end ? (size_t) (end - p) : strlen(p);
        if (n > 0 && (prefix == NULL || strncmp(p, prefix, strlen(prefix)) == 0)) {
            snprintf(line, len, "%.*s", (int) n, p);
            return line;
        }
        p = end ? end + 1 : NULL;
    }
    return NULL;
}

/* The value of name in the step's environment (local context), else srun's own. */
static const char *step_env(spank_t sp, const char *name)
{
    char **env = NULL;
    size_t n = strlen(name);
    if (spank_get_item(sp, S_JOB_ENV, &env) == ESPANK_SUCCESS && env != NULL)
        for (char **e = env; *e; e++)
            if (strncmp(*e, name, n) == 0 && (*e)[n] == '=')
                return *e + n + 1;
    return getenv(name);
}

/* Run the helper step `srun ... ARGS` on one task per node of the job. */
static int node_step(uint32_t jobid, uint32_t nnodes, char **args, char *out, size_t outlen)
{
    char job[32], n[32], *argv[32];
    int i = 0;
    snprintf(job, sizeof job, "--jobid=%u", jobid);
    snprintf(n, sizeof n, "%u", nnodes);
    argv[i++] = "srun"; argv[i++] = job; argv[i++] = "--overlap"; argv[i++] = "--mpi=none";
    argv[i++] = "-J"; argv[i++] = "hpcrun-bcast"; argv[i++] = "-N"; argv[i++] = n; argv[i++] = "-n";
    argv[i++] = n; argv[i++] = "--ntasks-per-node=1"; argv[i++] = "-Q";
    while (*args && i < 31)
        argv[i++] = *args++;
    argv[i] = NULL;
    return run_capture(argv, out, outlen);
}

/* Steps of a batch script run srun on the job's first node: a file there,
 * removed by the job epilog, lists the images (path, size, mtime) this job has
 * broadcast.  Not on a login node (SLURMD_NODENAME unset): no epilog there. */
static int marker_path(char *buf, size_t len, uint32_t jobid)
{
    buf[0] = '\0';
    if (getenv("SLURMD_NODENAME") == NULL)
        return 0;
    snprintf(buf, len, "%s/%s.%u.%u.done", bcast_tmp, SBCAST_PREFIX, (unsigned) getuid(), jobid);
    return 1;
}

static int marker_line(char *buf, size_t len, const char *image)
{
    struct stat st;
    buf[0] = '\0';
    if (stat(image, &st) != 0)
        return 0;
    snprintf(buf, len, "%lld %lld.%09ld %s\n", (long long) st.st_size, (long long) st.st_mtim.tv_sec,
             st.st_mtim.tv_nsec, image);
    return 1;
}

static int marker_has(const char *marker, const char *want)
{
    char line[PATH_MAX + 64];
    struct stat st;
    int found = 0, fd = open(marker, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    FILE *f;
    if (fd < 0)
        return 0;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != getuid() || (f = fdopen(fd, "r")) == NULL) {
        close(fd);
        return 0;
    }
    while (!found && fgets(line, sizeof line, f))
        found = strcmp(line, want) == 0;
    fclose(f);
    return found;
}

static int broadcast_image(spank_t sp);

/* A step whose local_user_init fails is never launched, yet slurmctld keeps it
 * running until the job ends (scancel does not end it): a batch script's next
 * srun would wait for its CPUs forever.  So a failed broadcast does not fail
 * here: it has said why (one line), and every task of the step exits 1 at
 * once instead of running (slurm_spank_task_init, HPCRUN_TASK_BCAST_FAILED). */
int slurm_spank_local_user_init(spank_t sp, int ac, char **av)
{
    (void) ac; (void) av;
    if (!opt_bcast || getenv("HPCRUN_TASK_BCAST_STEP") != NULL)
        return 0;
    if (broadcast_image(sp) != 0)
        setenv("HPCRUN_TASK_BCAST_FAILED", "1", 1);
    return 0;
}

static int broadcast_image(spank_t sp)
{
    static char out[16384], line[1024], dest[PATH_MAX + 64], abs_image[PATH_MAX], jobarg[32];
    static char marker[PATH_MAX + 64], mline[PATH_MAX + 64];
    const char *image = opt_image, *c;
    uint32_t jobid = 0, stepid = 0, nnodes = 0;
    uint64_t nonce;
    int rc;

    if (image == NULL && (c = step_env(sp, "HPCRUN_IMAGE")) != NULL && *c)
        image = c;
    if (image == NULL && use_slurm_container && (c = step_env(sp, "SLURM_CONTAINER")) != NULL && *c)
        image = c;
    if (image == NULL) {
        fprintf(stderr, "hpcrun: error: --container-bcast: no image (--container-image, --container or "
                "HPCRUN_IMAGE)\n");
        return -1;
    }
    if (realpath(image, abs_image) == NULL) {
        fprintf(stderr, "hpcrun: error: --container-bcast: %s: %s\n", image, strerror(errno));
        return -1;
    }
    if (spank_get_item(sp, S_JOB_ID, &jobid) != ESPANK_SUCCESS
        || spank_get_item(sp, S_JOB_STEPID, &stepid) != ESPANK_SUCCESS) {
        fprintf(stderr, "hpcrun: error: --container-bcast: cannot tell the job and step\n");
        return -1;
    }
    c = getenv("SLURM_JOB_NUM_NODES");   /* inside an allocation: all of the job's nodes */
    if (c == NULL || (nnodes = (uint32_t) strtoul(c, NULL, 10)) == 0)
        spank_get_item(sp, S_JOB_NNODES, &nnodes);
    /* bcast_tmp is shared (/tmp): a name nobody can guess, or another user makes it first
     * (job ids count up) and sbcast, which will not write over a file, fails the step. */
    if (getrandom(&nonce, sizeof nonce, 0) != (ssize_t) sizeof nonce) {
        fprintf(stderr, "hpcrun: error: --container-bcast: getrandom: %s\n", strerror(errno));
        return -1;
    }
    snprintf(dest, sizeof dest, "%s/%s.%u.%u.%u.%016llx", bcast_tmp, SBCAST_PREFIX, (unsigned) getuid(), jobid,
             stepid, (unsigned long long) nonce);
    snprintf(jobarg, sizeof jobarg, "%u", jobid);

    /* A batch script's later steps: the job's nodes have this image already. */
    if (marker_path(marker, sizeof marker, jobid) && marker_line(mline, sizeof mline, abs_image)
        && marker_has(marker, mline))
        return 0;

    {   /* 1. One read of the shared file, Slurm's tree to every node. */
        char jobopt[48];
        char *argv[] = { "sbcast", jobopt, abs_image, dest, NULL };
        snprintf(jobopt, sizeof jobopt, "--jobid=%u", jobid);
        rc = run_capture(argv, out, sizeof out);
    }
    if (rc != 0) {
        /* sbcast's own message is often "Unspecified error": each node removes
         * what landed and says why, if it can tell (no directory, no room). */
        static char why[4096], reason[1024], kib[32];
        struct stat st;
        char *diag[] = { "sh", "-c", "rm -f \"$0\"; if [ ! -d \"$1\" ]; then echo \"$SLURMD_NODENAME: no "
                         "directory $1\"; else a=$(df -Pk \"$1\" | awk 'NR==2 {print $4}'); [ \"${a:-0}\" -ge "
                         "\"$2\" ] || echo \"$SLURMD_NODENAME: $a KiB free in $1, the image needs $2 KiB\"; fi",
                         dest, bcast_tmp, kib, NULL };
        if (!first_line(out, "sbcast: error:", line, sizeof line) && !first_line(out, NULL, line, sizeof line))
            snprintf(line, sizeof line, "exit status %d", rc);
        snprintf(kib, sizeof kib, "%lld", stat(abs_image, &st) == 0 ? (long long) (st.st_size + 1023) / 1024 : 0LL);
        node_step(jobid, nnodes, diag, why, sizeof why);
        if (first_line(why, NULL, reason, sizeof reason))
            fprintf(stderr, "hpcrun: error: --container-bcast: sbcast of %s to node-local %s failed: %s (%s)\n",
                    abs_image, bcast_tmp, reason, line);
        else
            fprintf(stderr, "hpcrun: error: --container-bcast: sbcast of %s to node-local %s failed: %s\n",
                    abs_image, bcast_tmp, line);
        return -1;
    }
    {   /* 2. Every node verifies and lands its copy; the sbcast file goes either way. */
        char *argv[] = { "sh", "-c", "\"$0\" broadcast --mpi no --job \"$1\" --for \"$2\" \"$3\"; rc=$?; "
                         "rm -f \"$3\"; exit $rc", hpcrun_path, jobarg, abs_image, dest, NULL };
        rc = node_step(jobid, nnodes, argv, out, sizeof out);
    }
    if (rc != 0) {
        /* All or nothing, as the MPI path: the nodes that landed their copy drop the job's copies. */
        char *undo[] = { "sh", "-c", "\"$0\" broadcast --mpi no --clean --job \"$1\"; rm -f \"$2\"",
                         hpcrun_path, jobarg, dest, NULL }, junk[1024];
        node_step(jobid, nnodes, undo, junk, sizeof junk);
        if (first_line(out, "hpcrun: error:", line, sizeof line))
            fprintf(stderr, "%s\n", line);
        else
            fprintf(stderr, "hpcrun: error: --container-bcast: the nodes' landing step failed (%d): %s\n", rc,
                    first_line(out, NULL, line, sizeof line) ? line : "no output");
        return -1;
    }
    if (marker[0] && mline[0]) {
        int fd = open(marker, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
        struct stat st;
        if (fd >= 0) {
            /* another user's file there (made first, writable): not ours to write to */
            if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == getuid()
                && write(fd, mline, strlen(mline)) < 0) { /* only a later step's shortcut is lost */ }
            close(fd);
        }
    }
    return 0;
}

/* Job end, on every node, as root: remove the job's broadcast copies (and any
 * sbcast file a killed step left) as the job's user. */
int slurm_spank_job_epilog(spank_t sp, int ac, char **av)
{
    uid_t uid;
    gid_t gid;
    uint32_t jobid;
    struct passwd *pw;
    pid_t pid;
    int st;

    /* slurm_spank_init is not called before the job epilog: its arguments come here. */
    if (hpcrun_path == NULL && parse_args(ac, av) < 0)
        return 0;
    if (!bcast_clean || hpcrun_path == NULL)
        return 0;
    if (spank_get_item(sp, S_JOB_UID, &uid) != ESPANK_SUCCESS
        || spank_get_item(sp, S_JOB_GID, &gid) != ESPANK_SUCCESS
        || spank_get_item(sp, S_JOB_ID, &jobid) != ESPANK_SUCCESS || (pw = getpwuid(uid)) == NULL)
        return 0;
    pid = fork();
    if (pid < 0)
        return 0;
    if (pid == 0) {
        char prefix[128], job[32];
        DIR *d;
        struct dirent *e;
        int null = open("/dev/null", O_RDWR);
        if (null >= 0) {
            dup2(null, 0);
            dup2(null, 1);
        }
        if (setgid(gid) != 0 || initgroups(pw->pw_name, gid) != 0 || setuid(uid) != 0)
            _exit(126);
        snprintf(prefix, sizeof prefix, "%s.%u.%u.", SBCAST_PREFIX, (unsigned) uid, jobid);
        if ((d = opendir(bcast_tmp)) != NULL) {
            struct stat sb;
            while ((e = readdir(d)) != NULL)
                if (strncmp(e->d_name, prefix, strlen(prefix)) == 0
                    && fstatat(dirfd(d), e->d_name, &sb, AT_SYMLINK_NOFOLLOW) == 0 && sb.st_uid == uid)
                    unlinkat(dirfd(d), e->d_name, 0);
            closedir(d);
        }
        clearenv();
        setenv("HOME", pw->pw_dir, 1);
        setenv("USER", pw->pw_name, 1);
        setenv("LOGNAME", pw->pw_name, 1);
        setenv("PATH", "/usr/local/bin:/usr/bin:/bin", 1);
        snprintf(job, sizeof job, "%u", jobid);
        execl(hpcrun_path, hpcrun_path, "broadcast", "--clean", "--mpi", "no", "--job", job, (char *) NULL);
        _exit(127);
    }
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return 0;
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        slurm_error("hpcrun: job %u: `hpcrun broadcast --clean` as uid %u failed (status %d)", jobid,
                    (unsigned) uid, st);
    return 0;   /* never drain a node for this */
}
