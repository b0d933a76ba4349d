/* hpcrun's compiled front for ranks that only join a running node container (issue 15).

   The contract is docs/install.md's "The compiled front" (and hpcrun/ticket.py, its Python
   side): K = sha256 of (installed hpcrun, ids, argv, cwd, environment with per-rank values
   left out); /tmp/hpcrun-<uid>/tickets/<K> holds what the Python path observed and decided
   for that K.  Here every observation is replayed, as this rank, and the rank joins only if
   each comes out identical.  Anything else -- no ticket, a parse error, a changed file, a
   dead keeper, any doubt -- execs the Python entry with the same argv (and _HPCRUN_TICKET=K),
   so a miss is exactly the Python path.  After setns there is no way back: everything that
   can fail is checked before it.

   Built by `hpcrun install-entry`: cc -O2 -DPY_ENTRY='"<bin>/hpcrun-py"' -DSITE='"<site>"'. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "sha256.h"

#if !defined(PY_ENTRY) || !defined(SITE)
#error "build with -DPY_ENTRY='\"<bin>/hpcrun-py\"' -DSITE='\"<site-packages>\"'"
#endif

#define MARK "_HPCRUN_TICKET"
#define TICKET_MAX (1 << 20)

extern char **environ;

/* Values of these differ between the ranks of one job: only their names enter K. */
static const char *const PER_RANK[] = {
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_NODE_RANK", "OMPI_MCA_ess_base_vpid",
    "OMPI_MCA_orte_ess_node_rank", "PMIX_RANK", "PMIX_ID", "PMI_RANK", "PMI_FD", "MPI_LOCALRANKID",
    "SLURM_PROCID", "SLURM_LOCALID", "SLURM_TASK_PID", "PBS_TASKNUM", "PBS_VNODENUM", NULL};

static char **g_argv;
static char g_key[65];          /* K, "" when it could not be computed */
static int g_debug;
static int g_run_fd = -1;       /* the run directory, once open */
static int g_userns;            /* the ticket's: inside, ids are seen through the container's namespace */
static int g_held[4] = {-1, -1, -1, -1};   /* <key>.lock, ns/user, ns/mnt, root: let go before a wait */
static int g_waited;            /* this rank waited for its job's first rank already */
static int g_inside;            /* replaying inside observations now */
static jmp_buf g_again;

#define WAIT_SECONDS 60         /* at most, for a job's first rank to write the ticket */

/* The Python path, unchanged: same argv, the caller's environment (less any _HPCRUN_TICKET
   it brought: that name is ours) plus _HPCRUN_TICKET=K when K is known. */
static int private_dir(int dir_fd, const char *name);
static int first_wave(void);

static void __attribute__((noreturn)) python(const char *why)
{
    size_t n = 0, k = 0;
    char mark[sizeof MARK "=" + 64 + 16];
    if (g_debug)
        fprintf(stderr, "hpcrun: front: python path: %s\n", why);
    int writer = first_wave();          /* may not return: a wait, then another look */
    while (environ[n])
        n++;
    char **env = malloc((n + 2) * sizeof *env);
    if (env) {
        for (size_t i = 0; i < n; i++)
            if (strncmp(environ[i], MARK "=", sizeof MARK))
                env[k++] = environ[i];
        if (g_key[0]) {
            if (writer >= 0)            /* the ticket's lock goes along: Python lets go of it */
                snprintf(mark, sizeof mark, MARK "=%s:%d", g_key, writer);
            else
                snprintf(mark, sizeof mark, MARK "=%s", g_key);
            env[k++] = mark;
        }
        env[k] = NULL;
    }
    execve(PY_ENTRY, g_argv, env ? env : environ);
    fprintf(stderr, "hpcrun: error: cannot start the Python entry: %s (%s)\n", strerror(errno), PY_ENTRY);
    exit(70);
}

/* A job's ranks start together, before any of them has written the ticket they would
   share (K holds the job's own variables).  The first to miss takes tickets/<K>.lock
   exclusively and hands it to the Python path, which lets go once the ticket is written (or
   once it knows there will be none; exec and exit let go too).  The others wait for that,
   bounded, holding nothing else, and look again once: a job's first wave so costs one
   Python launch per node and container, not one per rank.  Returns the writer's lock fd
   (inheritable now), or -1: the Python path without one. */
static int first_wave(void)
{
    char name[80];
    struct stat st;
    if (!g_key[0] || g_run_fd < 0 || g_waited)
        return -1;
    if (mkdirat(g_run_fd, "tickets", 0700) && errno != EEXIST)
        return -1;
    int dfd = private_dir(g_run_fd, "tickets");
    if (dfd < 0)
        return -1;
    snprintf(name, sizeof name, "%s.lock", g_key);
    int lock = openat(dfd, name, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    close(dfd);
    if (lock < 0)
        return -1;
    if (fstat(lock, &st) || !S_ISREG(st.st_mode) || st.st_uid != getuid()) {
        close(lock);
        return -1;
    }
    if (!flock(lock, LOCK_EX | LOCK_NB)) {
        if (lock <= 2) {                /* a standard fd the caller closed: not for the lock */
            int high = fcntl(lock, F_DUPFD, 3);     /* (the Python path takes only one above 2) */
            close(lock);
            return high;                            /* inheritable, or -1 */
        }
        return fcntl(lock, F_SETFD, 0) ? (close(lock), -1) : lock;
    }
    if (errno != EWOULDBLOCK) {
        close(lock);
        return -1;
    }
    for (int i = 0; i < 4; i++)          /* the writer may need <key>.lock exclusively */
        if (g_held[i] >= 0) {
            close(g_held[i]);
            g_held[i] = -1;
        }
    /* Polled, not alarm(): the caller's pending alarm (and a blocked SIGALRM) must reach the
       program as on the Python path, untouched.  1 ms, doubling to 4 ms between looks. */
    struct timespec now, end, step = {0, 1000000};
    clock_gettime(CLOCK_MONOTONIC, &end);
    end.tv_sec += WAIT_SECONDS;
    int got;
    while (!(got = !flock(lock, LOCK_SH | LOCK_NB)) && errno == EWOULDBLOCK) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > end.tv_sec || (now.tv_sec == end.tv_sec && now.tv_nsec >= end.tv_nsec))
            break;
        nanosleep(&step, NULL);
        if (step.tv_nsec < 4000000)
            step.tv_nsec *= 2;
    }
    close(lock);
    g_waited = 1;
    if (g_debug)
        fprintf(stderr, "hpcrun: front: waited for the first rank: %s\n", got ? "done" : "timed out");
    if (got)
        longjmp(g_again, 1);
    return -1;
}

/* ------------------------------------------------------------------------------- K --- */

struct entry { const char *s; size_t len; size_t name; };   /* emitted bytes; length of NAME */

static int entry_cmp(const void *a, const void *b)
{
    const struct entry *x = a, *y = b;
    int c = memcmp(x->s, y->s, x->len < y->len ? x->len : y->len);
    return c ? c : (x->len > y->len) - (x->len < y->len);      /* strcmp's order */
}

static int gid_cmp(const void *a, const void *b)
{
    gid_t x = *(const gid_t *)a, y = *(const gid_t *)b;
    return (x > y) - (x < y);
}

static void hash_str(sha256 *s, const char *p) { sha256_update(s, p, strlen(p) + 1); }

static void hash_num(sha256 *s, unsigned long long v)
{
    char b[24];
    snprintf(b, sizeof b, "%llu", v);
    hash_str(s, b);
}

/* K into g_key, or leave it "" (the Python path without the variable). */
static void compute_key(int argc, char **argv)
{
    sha256 s;
    struct stat st;
    char cwd[4096], b[80];
    if (stat(SITE "/hpcrun", &st) || !getcwd(cwd, sizeof cwd))
        return;
    sha256_init(&s);
    hash_str(&s, "hpcrun-ticket-1");
    snprintf(b, sizeof b, "%llu:%llu:%lld", (unsigned long long)st.st_dev, (unsigned long long)st.st_ino,
             (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec);
    hash_str(&s, b);
    int ng = getgroups(0, NULL);
    gid_t *groups = malloc((ng > 0 ? ng : 1) * sizeof *groups);
    if (ng < 0 || !groups || (ng = getgroups(ng, groups)) < 0)
        return;
    qsort(groups, ng, sizeof *groups, gid_cmp);
    hash_num(&s, getuid());
    hash_num(&s, getgid());
    hash_num(&s, ng);
    for (int i = 0; i < ng; i++)
        hash_num(&s, groups[i]);
    hash_num(&s, argc - 1);
    for (int i = 1; i < argc; i++)
        hash_str(&s, argv[i]);
    hash_str(&s, cwd);

    size_t n = 0, m = 0;
    while (environ[n])
        n++;
    struct entry *e = malloc((n + 1) * sizeof *e);
    if (!e)
        return;
    for (size_t i = 0; i < n; i++) {
        const char *v = environ[i], *eq = strchr(v, '=');
        if (!eq || eq == v)             /* Python's os.environ would not hold it as given */
            return;
        size_t name = eq - v;
        if (name == sizeof MARK - 1 && !strncmp(v, MARK, name))
            continue;                   /* ours; Python pops it before hashing */
        e[m] = (struct entry){v, strlen(v), name};
        for (const char *const *p = PER_RANK; *p; p++)
            if (strlen(*p) == name && !strncmp(*p, v, name))
                e[m].len = name;        /* its name only: presence counts, not the value */
        m++;
    }
    qsort(e, m, sizeof *e, entry_cmp);
    hash_num(&s, m);
    for (size_t i = 0; i < m; i++) {
        /* one name twice: which one Python sees is not ours to guess.  Same names sort together. */
        if (i && e[i].name == e[i - 1].name && !memcmp(e[i].s, e[i - 1].s, e[i].name))
            return;
        sha256_update(&s, e[i].s, e[i].len);
        sha256_update(&s, "", 1);
    }
    free(e);
    free(groups);
    sha256_hex(&s, g_key);
}

/* ------------------------------------------------------------------- observations --- */

/* A path's fd: on the host as given, inside through the keeper's root (its symlinks
   resolved within it, no /proc magic links).  -errno on failure. */
static int path_fd(int root, const char *path, int flags)
{
    int fd;
    if (root < 0) {
        fd = open(path, flags | O_CLOEXEC);
    } else {
        struct open_how how = {.flags = (unsigned)(flags | O_CLOEXEC),
                               .resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS};
        fd = (int)syscall(SYS_openat2, root, path, &how, sizeof how);
    }
    return fd < 0 ? -errno : fd;
}

static int access_fd(int fd, int mode)
{
    return syscall(SYS_faccessat2, fd, "", mode, AT_EMPTY_PATH) ? -errno : 0;
}

static char *identity(const struct stat *st)
{
    char *out;
    int r;
    if (g_inside && g_userns) {
        /* as Python saw it, inside: the container's user namespace maps the user's own uid
           and gid only; any other owner shows as the kernel's overflow ids (65534) */
        struct stat *v = (struct stat *)st;
        if (v->st_uid != getuid())
            v->st_uid = 65534;
        if (v->st_gid != getgid())
            v->st_gid = 65534;
    }
    if (S_ISDIR(st->st_mode))
        r = asprintf(&out, "D %llu %llu %u %u %u", (unsigned long long)st->st_dev, (unsigned long long)st->st_ino,
                     (unsigned)st->st_mode, (unsigned)st->st_uid, (unsigned)st->st_gid);
    else
        r = asprintf(&out, "F %llu %llu %u %u %u %lld %lld %lld", (unsigned long long)st->st_dev,
                     (unsigned long long)st->st_ino, (unsigned)st->st_mode, (unsigned)st->st_uid,
                     (unsigned)st->st_gid, (long long)st->st_size,
                     (long long)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec,
                     (long long)st->st_ctim.tv_sec * 1000000000LL + st->st_ctim.tv_nsec);
    return r < 0 ? NULL : out;
}

static char *error_str(int err)
{
    char *out;
    return asprintf(&out, "E%d", err) < 0 ? NULL : out;
}

static int name_cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* "N" + the names in the directory fd, sorted bytewise, joined by "/"; fd is closed. */
static char *listing(int fd)
{
    DIR *d = fdopendir(fd);
    struct dirent *de;
    char **names = NULL, *out;
    size_t n = 0, cap = 0, len = 2;
    if (!d) {
        close(fd);
        return NULL;
    }
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        if (n == cap && !(names = realloc(names, (cap = cap ? 2 * cap : 64) * sizeof *names)))
            return NULL;
        if (!(names[n++] = strdup(de->d_name)))
            return NULL;
        len += strlen(de->d_name) + 1;
    }
    closedir(d);
    qsort(names, n, sizeof *names, name_cmp);
    if (!(out = malloc(len)))
        return NULL;
    char *p = stpcpy(out, "N");
    for (size_t i = 0; i < n; i++)
        p = stpcpy(stpcpy(p, i ? "/" : ""), names[i]);
    return out;
}

/* The outcome of one observation now, as the EXPECT string Python wrote (docs/install.md,
   OP table); NULL for an OP we do not know (the caller misses). */
static char *observe(int root, const char *op, const char *path)
{
    struct stat st;
    char target[4097];
    ssize_t n;
    int fd;
    if (!strcmp(op, "stat") || !strcmp(op, "lstat")) {
        int nofollow = op[0] == 'l';
        if (root < 0) {
            if ((nofollow ? lstat(path, &st) : stat(path, &st)))
                return error_str(errno);
            return identity(&st);
        }
        if ((fd = path_fd(root, path, O_PATH | (nofollow ? O_NOFOLLOW : 0))) < 0)
            return error_str(-fd);
        int r = fstat(fd, &st) ? errno : 0;
        close(fd);
        return r ? error_str(r) : identity(&st);
    }
    if (!strcmp(op, "readlink")) {
        if (root < 0) {
            n = readlink(path, target, sizeof target - 1);
        } else {
            if ((fd = path_fd(root, path, O_PATH | O_NOFOLLOW)) < 0)
                return error_str(-fd);
            if (fstat(fd, &st) || !S_ISLNK(st.st_mode))
                errno = EINVAL, n = -1;              /* readlink(2) of a non-link */
            else
                n = readlinkat(fd, "", target, sizeof target - 1);
            close(fd);
        }
        if (n < 0 || n == sizeof target - 1)
            return error_str(n < 0 ? errno : ENAMETOOLONG);
        target[n] = 0;
        char *out;
        return asprintf(&out, "L%s", target) < 0 ? NULL : out;
    }
    if (!strncmp(op, "access", 6)) {
        if (op[6] < '0' || op[6] > '7' || op[7])
            return NULL;
        int mode = op[6] - '0', ok;
        if (root < 0) {
            ok = !faccessat(AT_FDCWD, path, mode, 0);       /* real ids, as os.access */
        } else {
            fd = path_fd(root, path, O_PATH);
            ok = fd >= 0 && !access_fd(fd, mode);
            if (fd >= 0)
                close(fd);
        }
        return strdup(ok ? "1" : "0");
    }
    if (!strcmp(op, "open") || !strcmp(op, "openl") || !strcmp(op, "chdir")) {
        int dir = op[0] == 'c';
        if ((fd = path_fd(root, path, O_PATH | (op[4] == 'l' ? O_NOFOLLOW : 0) | (dir ? O_DIRECTORY : 0))) < 0)
            return error_str(-fd);
        int r = fstat(fd, &st) ? errno : 0;
        if (!r && S_ISLNK(st.st_mode))
            r = ELOOP;                            /* open(2) with O_NOFOLLOW of a link */
        if (!r)
            r = -access_fd(fd, dir ? X_OK : R_OK);
        close(fd);
        if (r)
            return error_str(r);
        return dir ? strdup("0") : identity(&st);
    }
    if (!strcmp(op, "listdir")) {
        if ((fd = path_fd(root, path, O_RDONLY | O_DIRECTORY)) < 0)
            return error_str(-fd);
        return listing(fd);
    }
    return NULL;
}

/* ------------------------------------------------------------------------ the ticket --- */

struct ticket {
    char **f;                   /* its NUL-terminated strings */
    size_t n;
    const char *key, *pid, *start, *cwd;
    int userns;
    size_t obs, obs_end;        /* observations: f[obs .. obs_end), 4 strings each */
    char **args, **env;
};

static int digits(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}

/* A directory at dir_fd/name (AT_FDCWD: a path) of ours, that no one else can write into. */
static int private_dir(int dir_fd, const char *name)
{
    struct stat st;
    int fd = openat(dir_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return -1;
    if (fstat(fd, &st) || !S_ISDIR(st.st_mode) || st.st_uid != getuid() || (st.st_mode & 022)) {
        close(fd);
        errno = EPERM;                  /* not ours: never "missing" */
        return -1;
    }
    return fd;
}

/* Read and parse tickets/<K> under the run directory; any doubt is the Python path. */
static void read_ticket(int run_fd, struct ticket *t)
{
    struct stat st;
    int dfd = private_dir(run_fd, "tickets");
    if (dfd < 0)
        python(errno == ENOENT ? "no ticket (no tickets directory yet)" : "no private tickets directory");
    int fd = openat(dfd, g_key, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    close(dfd);
    if (fd < 0)
        python("no ticket");
    if (fstat(fd, &st) || !S_ISREG(st.st_mode) || st.st_uid != getuid() || (st.st_mode & 022)
        || st.st_size > TICKET_MAX || st.st_size == 0)
        python("ticket not a private regular file");
    char *data = malloc(st.st_size + 1);
    ssize_t got = 0, r;
    while (data && got < st.st_size && (r = read(fd, data + got, st.st_size - got)) > 0)
        got += r;
    close(fd);
    if (!data || got != st.st_size || data[got - 1])
        python("ticket truncated");
    t->n = 0;
    for (ssize_t i = 0; i < got; i++)
        t->n += !data[i];
    t->f = malloc((t->n + 1) * sizeof *t->f);
    if (!t->f)
        python("out of memory");
    for (size_t i = 0, at = 0; i < t->n; i++) {
        t->f[i] = data + at;
        at += strlen(data + at) + 1;
    }
    t->f[t->n] = NULL;

    char **f = t->f;
    size_t i = 9;
    if (t->n < 9 || strcmp(f[0], "hpcrun-ticket") || strcmp(f[1], "1") || strcmp(f[2], "expires")
        || !digits(f[3]) || strcmp(f[4], "keeper"))
        python("ticket header");
    if ((long long)time(NULL) >= strtoll(f[3], NULL, 10))
        python("ticket expired");
    t->key = f[5]; t->pid = f[6]; t->start = f[7];
    /* the key names files in the run directory: nothing that could leave it */
    if (!*t->key || strlen(t->key) > 128 || strspn(t->key, "0123456789abcdefghijklmnopqrstuvwxyz"
                                                   "ABCDEFGHIJKLMNOPQRSTUVWXYZ_-") != strlen(t->key)
        || !digits(t->pid) || strlen(t->pid) > 9 || !digits(t->start) || (strcmp(f[8], "0") && strcmp(f[8], "1")))
        python("ticket keeper");
    t->userns = f[8][0] == '1';
    t->obs = i;
    while (i + 4 <= t->n && (!strcmp(f[i], "host") || !strcmp(f[i], "inside")))
        i += 4;
    t->obs_end = i;
    if (i + 2 > t->n || strcmp(f[i], "cwd") || f[i + 1][0] != '/')
        python("ticket cwd");
    t->cwd = f[i + 1];
    i += 2;
    size_t a0 = i;
    while (i + 2 <= t->n && !strcmp(f[i], "arg"))
        i += 2;
    size_t nargs = (i - a0) / 2;
    size_t e0 = i;
    while (i + 2 <= t->n && (!strcmp(f[i], "set") || !strcmp(f[i], "pass")))
        i += 2;
    size_t nenv = (i - e0) / 2;
    if (!nargs || i + 1 != t->n || strcmp(f[i], "end"))
        python("ticket body");
    t->args = malloc((nargs + 1) * sizeof *t->args);
    t->env = malloc((nenv + 1) * sizeof *t->env);
    if (!t->args || !t->env)
        python("out of memory");
    for (size_t k = 0; k < nargs; k++)
        t->args[k] = f[a0 + 2 * k + 1];
    t->args[nargs] = NULL;
    for (size_t k = 0; k < nenv; k++) {
        char *v = f[e0 + 2 * k + 1];
        if (f[e0 + 2 * k][0] == 's') {
            if (!strchr(v, '=') || v[0] == '=')
                python("ticket set");
            t->env[k] = v;
        } else {                            /* pass: the caller's value, present by K */
            char *mine = getenv(v);
            if (!mine || strchr(v, '=') || asprintf(&t->env[k], "%s=%s", v, mine) < 0)
                python("ticket pass");
        }
    }
    t->env[nenv] = NULL;
}

/* Replay the observations of one place (root < 0: the host) in order; 1 if all hold. */
static int replay(const struct ticket *t, const char *where, int root)
{
    for (size_t i = t->obs; i < t->obs_end; i += 4) {
        if (strcmp(t->f[i], where))
            continue;
        const char *op = t->f[i + 1], *path = t->f[i + 2];
        if (root >= 0 && path[0] != '/')
            return 0;
        if (root < 0 && !strcmp(op, "chdir"))
            return 0;           /* the host cwd is K's; Python moving it there is not replayed */
        g_inside = root >= 0;
        char *now = observe(root, op, path);
        g_inside = 0;
        int same = now && !strcmp(now, t->f[i + 3]);
        if (g_debug && !same)
            fprintf(stderr, "hpcrun: front: %s %s %s: %s, now %s\n", where, op, path, t->f[i + 3],
                    now ? now : "(unknown)");
        free(now);
        if (!same)
            return 0;
    }
    return 1;
}

/* /proc/<pid>/stat's start time (field 22) equals start, and it is no zombie. */
static int alive(const char *pid, const char *start)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%s/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *s = strrchr(buf, ')');            /* the command name may hold anything */
    if (!s || s[1] != ' ' || s[2] == 'Z' || s[2] == 'X')
        return 0;
    s += 2;
    for (int k = 0; k < 19; k++)            /* field 3 (state) -> field 22 */
        if (!(s = strchr(s, ' ')))
            return 0;
        else
            s++;
    size_t len = strcspn(s, " ");
    return len == strlen(start) && !strncmp(s, start, len);
}

static int open_proc(const char *pid, const char *what, int flags)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%s/%s", pid, what);
    return open(path, flags | O_CLOEXEC);
}

/* --------------------------------------------------------------------------- main --- */

static void __attribute__((noreturn)) fail(int code, const char *what, const char *subject)
{
    fprintf(stderr, "hpcrun: error: %s (%s)\n", what, subject);
    exit(code);
}

int main(int argc, char **argv)
{
    struct ticket t;
    struct stat a, b;
    char run_dir[64], name[160];
    g_argv = argv;
    g_debug = getenv("HPCRUN_FRONT_DEBUG") != NULL;
    if (argc < 1)
        python("no argv");
    /* Never a ticket (cli.py): the subcommands.  Straight to Python: no K, no first-wave
       wait for nothing.  A Slurm task (the SPANK plugin put us in its argv[0], the rest in
       HPCRUN_TASK_*) is a rank like any other: its K holds those variables too. */
    static const char *const never[] = {"inspect", "check", "build", "sign", "verify", "version", "task-entry",
                                        "help", "run-help", "broadcast", "install-entry", "-h", "--help",
                                        "--version", NULL};
    for (const char *const *p = never; argc > 1 && *p; p++)
        if (!strcmp(argv[1], *p))
            python("a subcommand");
    compute_key(argc, argv);
    if (!g_key[0])
        python("no K");

    /* 1. the ticket, in the default run directory only (made as node.open_run_dir makes it) */
    snprintf(run_dir, sizeof run_dir, "/tmp/hpcrun-%u", (unsigned)getuid());
    if (mkdir(run_dir, 0700) && errno != EEXIST)
        python("no run directory");
    int run_fd = g_run_fd = private_dir(AT_FDCWD, run_dir);
    if (run_fd < 0)
        python("no private run directory");
    setjmp(g_again);                    /* after a wait for the job's first rank: once more */
    read_ticket(run_fd, &t);
    g_userns = t.userns;

    /* 2. the host as Python saw it */
    if (!replay(&t, "host", -1))
        python("a host observation changed");

    /* 3. the key's lock, shared, as fdio.lock_current; never created here */
    snprintf(name, sizeof name, "%s.lock", t.key);
    int lock = -1;
    for (int tries = 0; lock < 0; tries++) {
        if (tries == 100 || (lock = openat(run_fd, name, O_RDWR | O_NOFOLLOW | O_CLOEXEC)) < 0)
            python("no lock file");
        g_held[0] = lock;
        if (flock(lock, LOCK_SH) || fstat(lock, &a))
            python("lock");
        if (fstatat(run_fd, name, &b, AT_SYMLINK_NOFOLLOW) || a.st_ino != b.st_ino || a.st_dev != b.st_dev) {
            close(lock);
            lock = g_held[0] = -1;  /* a departing keeper unlinked it: the current one */
        }
    }

    /* 4. the keeper: its record, and the process it names still the one */
    snprintf(name, sizeof name, "%s.pid", t.key);
    int fd = openat(run_fd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);   /* a FIFO: no wait */
    char rec[129], want[64];
    ssize_t n = fd < 0 ? -1 : read(fd, rec, sizeof rec - 1);
    if (fd >= 0)
        close(fd);
    if (n <= 0)
        python("no keeper record");
    rec[n] = 0;
    snprintf(want, sizeof want, "%s %s\n", t.pid, t.start);
    if (strcmp(rec, want) || !alive(t.pid, t.start))
        python("keeper gone or another");

    /* 5. its namespaces and root, then the container as Python saw it, through that root */
    int user_ns = g_held[1] = t.userns ? open_proc(t.pid, "ns/user", O_RDONLY) : -1;
    int mnt_ns = g_held[2] = open_proc(t.pid, "ns/mnt", O_RDONLY);
    int root = g_held[3] = open_proc(t.pid, "root", O_PATH | O_DIRECTORY);
    if ((t.userns && user_ns < 0) || mnt_ns < 0 || root < 0)
        python("keeper's namespaces");
    if (!alive(t.pid, t.start))         /* the fds are of that keeper, not of a reused PID */
        python("keeper gone");
    if (!replay(&t, "inside", root))
        python("an inside observation changed");
    close(root);
    g_held[3] = -1;

    /* 6. join; only a setns(user) that failed leaves us as we were */
    if (t.userns && setns(user_ns, CLONE_NEWUSER))
        python("setns user");
    if (setns(mnt_ns, CLONE_NEWNS)) {
        snprintf(name, sizeof name, "pid %s", t.pid);
        fprintf(stderr, "hpcrun: error: cannot join the node's container: %s (%s)\n", strerror(errno), name);
        exit(71);
    }
    if (user_ns >= 0)
        close(user_ns);
    close(mnt_ns);
    close(lock);
    close(run_fd);

    /* 7. as launch.exec_in_place */
    if (chdir(t.cwd))
        fail(66, "working directory not found in the container", t.cwd);
    signal(SIGPIPE, SIG_DFL);
    signal(SIGXFSZ, SIG_DFL);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        fail(71, "cannot set no_new_privs", strerror(errno));
    execve(t.args[0], t.args, t.env);
    int err = errno;
    char what[256];
    snprintf(what, sizeof what, "cannot execute: %s", strerror(err));
    fail(err == EACCES || err == ENOEXEC ? 126 : 127, what, t.args[0]);
}
