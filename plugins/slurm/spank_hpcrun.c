/*
 * spank_hpcrun: run Slurm job tasks inside hpcrun images.
 *
 * plugstack.conf:
 *   required /usr/lib/hpcrun/spank_hpcrun.so hpcrun=/usr/bin/hpcrun [mounts=/scratch,...]
 *            [batch=no|yes] [container=yes|no] [skip=orted,prted]
 *
 * User options (srun, sbatch, salloc; names follow Pyxis where they can):
 *   --container-image=IMG      run the step's tasks in IMG
 *   --container-mounts=LIST    extra binds, SRC[:DST[:ro|rw]] comma list (hpcrun -B)
 *   --container-workdir=DIR    working directory inside the image
 *   --container-env=LIST       NAME (the task's value wins over the image's) or NAME=VALUE
 *   --container-batch          run the batch script itself inside the image too
 *   --container-pin=yes|no     no: run the image as it is at launch, not as it was
 *                              at submission (the cli_filter pins it; docs/slurm.md)
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
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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

/* user options (set by the callbacks in every context the option reaches) */
static char *opt_image = NULL;
static char *opt_mounts = NULL;
static char *opt_workdir = NULL;
static char *opt_env = NULL;
static int opt_batch = 0;
static int opt_unpinned = 0;

enum { OPT_IMAGE, OPT_MOUNTS, OPT_WORKDIR, OPT_ENV, OPT_BATCH, OPT_PIN };

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
        else {
            slurm_error("hpcrun: unknown plugstack.conf argument \"%s\"", a);
            return -1;
        }
    }
    if (skip_list == NULL)
        skip_list = strdup("orted,prted,hydra_pmi_proxy");
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
    if (skipped(argv[0]))
        return 0;

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
