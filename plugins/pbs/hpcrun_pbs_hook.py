# hpcrun PBS hook: `#PBS -l container_image=IMAGE` for OpenPBS / PBS Professional.
#
# One file for every event it is attached to (docs/pbs.md has the qmgr lines):
#   queuejob, modifyjob  (pbs_server, as root) validate the requested image for
#                        the submitting user, store it as an absolute path and
#                        pin it: HPCRUN_IMAGE_DIGEST in the job's environment
#                        makes hpcrun refuse an image rebuilt while the job
#                        waited (-l container_pin=no: run the image as it is);
#   execjob_launch       (pbs_mom) re-checks it on the job shell's host, exports
#                        HPCRUN_IMAGE into the job environment and, if the config
#                        says so, wraps the job shell in hpcrun.
# MPI ranks never pass through PBS hooks: jobs run `mpiexec hpcrun "$HPCRUN_IMAGE" ./app`.
#
# PBS runs this file in an isolated interpreter (no site-packages, -OO: no
# asserts, no docstrings), in a fresh namespace where __name__ == "builtins",
# under an alarm, and in the server's own process for server events.  So: stdlib
# only, no `if __name__ == "__main__"`, no asserts, nothing that can block (only
# a few stat() calls and one 4 KiB read), and never a bare `except:` (it would
# swallow the SystemExit that accept()/reject() raise).
import json
import os
import pwd
import stat

import pbs

DEFAULTS = {
    "resource": "container_image",  # the custom resource users request (-l NAME=IMAGE)
    "pin_resource": "container_pin", # -l NAME=no: no pin at submission ("" = always pin)
    "variable": "",                  # optional: also accept -v NAME=IMAGE ("" = off)
    "export_variable": "HPCRUN_IMAGE",
    "job_env": {},                   # more variables exported with the image
    "allowed_dirs": [],              # [] = anywhere; else the image must lie under one
    "wrap_job_shell": False,         # run the job shell itself inside the image
    "hpcrun": "/usr/local/bin/hpcrun",
    "wrap_options": [],              # extra hpcrun options for the wrapped job shell
    "launch_failure": "delete",      # on the mom: "delete" the job or "requeue" it
}
PATH_MAX = 4096
READ, SEARCH = 4, 1


class Refusal(Exception):
    """A request we turn down with a message for the user."""


def load_config():
    """The imported config file: PBS stores it as <hook>.CF whatever its suffix,
    and names it in PBS_HOOK_CONFIG_FILE (pbs.hook_config_filename); there is
    no pbs.get_hook_config_file() in real PBS.  Parsed by content: JSON."""
    cfg = dict(DEFAULTS)
    path = getattr(pbs, "hook_config_filename", None)
    if not path:
        return cfg
    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        raise Refusal("hpcrun hook configuration unreadable (%s). Please inform Admin" % err.strerror)
    if not text.strip():
        return cfg
    try:
        data = json.loads(text)
    except ValueError as err:
        raise Refusal("hpcrun hook configuration is not valid JSON (%s). Please inform Admin" % err)
    if not isinstance(data, dict):
        raise Refusal("hpcrun hook configuration must be a JSON object. Please inform Admin")
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise Refusal("hpcrun hook configuration has unknown keys %s. Please inform Admin"
                      % ", ".join(unknown))
    cfg.update(data)
    if cfg["launch_failure"] not in ("delete", "requeue"):
        raise Refusal("hpcrun hook configuration: launch_failure must be delete or requeue. "
                      "Please inform Admin")
    if cfg["wrap_job_shell"] and not os.path.isabs(str(cfg["hpcrun"])):
        # The mom execve()s the job shell's progname without a PATH search.
        raise Refusal("hpcrun hook configuration: hpcrun must be an absolute path (%s). "
                      "Please inform Admin" % cfg["hpcrun"])
    return cfg


# --- reading the request ------------------------------------------------------
def requested_image(job, cfg):
    """(value, where) or (None, None).  Resource_List[x] is None when unset, and
    `x in Resource_List` is true for any defined resource, so test the value."""
    value = None
    resources = job.Resource_List
    if resources is not None:
        try:
            value = resources[cfg["resource"]]
        except Exception:   # resource not defined on this server: nobody can request it
            value = None
    if value is not None:
        return value, "resource"
    name = cfg["variable"]
    variables = job.Variable_List
    if name and variables is not None and variables.get(name) is not None:
        return variables.get(name), "variable"
    return None, None


def label(cfg, where):
    return cfg["resource"] if where == "resource" else cfg["variable"]


def absolute_image_path(value, workdir, what):
    """Validate the text of the request and make it absolute."""
    if not isinstance(value, str):
        value = str(value)
    if not value.strip():
        raise Refusal("%s is empty: give the path of an image, e.g. %s=/apps/img/solver.img"
                      % (what, what))
    if value != value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise Refusal("%s is malformed: it contains spaces at the ends or control characters"
                      % what)
    if len(value) >= PATH_MAX:
        raise Refusal("%s is malformed: path longer than %d characters" % (what, PATH_MAX))
    if value.startswith("~"):
        raise Refusal("%s=%s: '~' is not expanded; give an absolute path or one relative to "
                      "the submission directory" % (what, value))
    if os.path.isabs(value):
        return os.path.normpath(value)
    if not workdir or not os.path.isabs(workdir):
        raise Refusal("%s=%s is a relative path and the job has no PBS_O_WORKDIR to resolve it "
                      "against; give an absolute path" % (what, value))
    return os.path.normpath(os.path.join(workdir, value))


# --- access for the submitting user (we run as root: os.access would say yes) ---
def user_identity(name):
    name = (name or "").split("@")[0]
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise Refusal("unknown user %r on %s: cannot check container image access"
                      % (name, pbs.get_local_nodename()))
    return name, pw.pw_uid, set(os.getgrouplist(name, pw.pw_gid))


def permitted(st, uid, gids, want):
    if uid == 0:
        return True
    if st.st_uid == uid:
        bits = st.st_mode >> 6
    elif st.st_gid in gids:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & want == want


def check_ancestors(path, user, uid, gids):
    parent = os.path.dirname(path)
    parts = []
    while True:
        parts.append(parent)
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    for d in reversed(parts):
        st = os.stat(d)
        if not permitted(st, uid, gids, SEARCH):
            raise Refusal("container image not accessible to user %s: directory %s is not "
                          "searchable (%s)" % (user, d, path))


def image_pin(kind, head):
    """What pins the image, as hpcrun/image.py reads it: an hpcrun image's
    header digest, a SIF's global header from its ID on, a plain SquashFS's
    superblock.  None for a directory (nothing cheap to pin)."""
    if kind == "hpcrun":
        line = head.split(b"\n")[1].split(b" ") if head.count(b"\n") >= 2 else []
        digest = line[4].decode("ascii", "replace") if len(line) == 5 else ""
        if len(digest) == 64 and not digest.strip("0123456789abcdef"):
            return "sha256:" + digest
    elif kind == "sif" and len(head) >= 128:
        return "sif:" + head[48:128].hex()
    elif kind == "squashfs" and len(head) >= 96:
        return "squashfs:" + head[:96].hex()
    return None


def image_kind(path, st):
    """(kind, pin): tell an image by its first bytes, as hpcrun does, without
    importing it: hpcrun header (HPCRUN-IMAGE on line 2), SquashFS (hsqs at 0),
    SIF (SIF_MAGIC at 32), or a directory.  Never opens anything but a regular
    file (a FIFO would block the server)."""
    if stat.S_ISDIR(st.st_mode):
        return "dir", None
    if not stat.S_ISREG(st.st_mode):
        raise Refusal("not a container image: not a regular file or directory (%s)" % path)
    if st.st_size == 0:
        raise Refusal("not a container image: empty file (%s)" % path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError:
        return "unchecked", None    # root squashed on NFS; the mode check already passed
    try:
        head = os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    kind = None
    if head[:4] == b"hsqs":
        kind = "squashfs"
    elif head[32:41] == b"SIF_MAGIC":
        kind = "sif"
    else:
        nl = head.find(b"\n")
        if head[:2] == b"#!" and nl > 0 and head[nl + 1:nl + 13] == b"HPCRUN-IMAGE":
            kind = "hpcrun"
    if kind is not None:
        return kind, image_pin(kind, head)
    raise Refusal("not a container image (no hpcrun header, SquashFS or SIF signature): %s" % path)


def check_image(path, user_name, cfg, what, given):
    user, uid, gids = user_identity(user_name)
    allowed = [os.path.normpath(d) for d in cfg["allowed_dirs"] or []]
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except FileNotFoundError:
        raise Refusal("container image not found: %s (%s=%s)" % (path, what, given))
    except OSError as err:
        raise Refusal("container image not accessible: %s: %s" % (path, err.strerror))
    if allowed and not any(real == d or real.startswith(d.rstrip("/") + "/") for d in allowed):
        raise Refusal("container image %s is outside the allowed directories (%s)"
                      % (path, ", ".join(allowed)))
    for p in {path, real}:
        check_ancestors(p, user, uid, gids)
    want = READ | SEARCH if stat.S_ISDIR(st.st_mode) else READ
    if not permitted(st, uid, gids, want):
        raise Refusal("container image not readable by user %s: %s (mode %o, owner uid %d gid %d)"
                      % (user, path, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid))
    return image_kind(real, st)


def workdir_of(*jobs):
    for job in jobs:
        if job is not None and job.Variable_List is not None:
            wd = job.Variable_List.get("PBS_O_WORKDIR")
            if wd:
                return wd
    return None


def pin_requested(job, original, cfg):
    """False when the user asked for the image as it is at launch (-l container_pin=no);
    qalter of the image keeps the job's earlier choice."""
    name = cfg["pin_resource"]
    value = None
    for j in (job, original):
        if value is None and j is not None and j.Resource_List is not None:
            try:
                value = j.Resource_List[name] if name else None
            except Exception:   # resource not defined on this server: always pin
                value = None
    if value is None or str(value) == "yes":
        return True
    if str(value) == "no":
        return False
    raise Refusal("%s must be yes or no (%s=%s)" % (name, name, value))


def store(job, cfg, where, path):
    """Keep the absolute path, so the mom and qstat see what was checked.
    Custom resources are hook-writable; Variable_List takes item assignment."""
    if where == "resource":
        job.Resource_List[cfg["resource"]] = path
    else:
        job.Variable_List[cfg["variable"]] = path


# --- events -------------------------------------------------------------------
def log_debug(msg):
    # pbs.LOG_DEBUG is only a syslog severity: PBS logs it as ADMIN|SYSTEM, which
    # every default log_events (511) shows.  EVENT_DEBUG3 (0x400) is outside 511:
    # seen only after `qmgr -c "set server log_events=2047"` (mom: $logevent 2047).
    pbs.logmsg(pbs.EVENT_DEBUG3, msg)


def requeued_before(job):
    """True when this job has already been requeued by a launch failure: PBS's
    run_count is 1 on the first run.  Without this a vanished image requeues the
    job at once, 20 times in a few seconds, until PBS holds it for good."""
    try:
        return int(job.run_count or 0) > 1
    except (TypeError, ValueError):
        return False


def on_submit(e, cfg):
    job = e.job
    original = None
    if e.type == pbs.MODIFYJOB:
        original = e.job_o
    value, where = requested_image(job, cfg)
    if value is None:
        return
    what = label(cfg, where)
    path = absolute_image_path(value, workdir_of(job, original), what)
    # qsub: the requestor is the submitter; qalter may be a manager, so check for the owner.
    user = e.requestor
    if original is not None and original.Job_Owner:
        user = original.Job_Owner
    wants_pin = pin_requested(job, original, cfg)
    kind, pin = check_image(path, user, cfg, what, value)
    if path != value:
        store(job, cfg, where, path)
    if wants_pin and pin:
        # hpcrun in every task of the job checks it (docs/pbs.md, docs/run.md)
        job.Variable_List["HPCRUN_IMAGE_DIGEST"] = pin
        job.Variable_List["HPCRUN_IMAGE_DIGEST_PATH"] = path
    log_debug("hpcrun: %s image %s accepted for %s%s" % (kind, path, user, ", pinned to " + pin
                                                         if wants_pin and pin else ""))


def on_launch(e, cfg):
    job = e.job
    value, where = requested_image(job, cfg)
    if value is None:
        return
    env = e.env
    # The job shell has PBS_TASKNUM "1"; TM tasks (orted, hydra proxies) get
    # "%8.8X" hex and are left alone: the ranks they fork are wrapped by
    # `mpiexec hpcrun`.  Never int() it: "0000000A" is not decimal.
    tasknum = env.get("PBS_TASKNUM")
    is_job_shell = tasknum == "1" if tasknum is not None else not e.argv
    if not is_job_shell:
        return
    what = label(cfg, where)
    path = absolute_image_path(value, env.get("PBS_O_WORKDIR") or workdir_of(job), what)
    kind, _ = check_image(path, job.euser or job.Job_Owner, cfg, what, value)
    # Item assignment: the mom replaces the task's whole environment with str(e.env).
    env[cfg["export_variable"]] = path
    for k, v in (cfg["job_env"] or {}).items():
        env[str(k)] = str(v)
    if cfg["wrap_job_shell"]:
        hpcrun = str(cfg["hpcrun"])
        jobs_dir = os.path.join(pbs.pbs_conf.get("PBS_HOME", "/var/spool/pbs"), "mom_priv", "jobs")
        # The shell reads the job script's path (under mom_priv/jobs) from stdin.
        argv = [hpcrun, "--bind", jobs_dir] + [str(o) for o in cfg["wrap_options"] or []]
        argv += [path, e.progname] + list(e.argv[1:])
        e.progname = hpcrun
        e.argv = argv
    log_debug("hpcrun: job %s: %s image %s exported as %s%s" % (
        job.id, kind, path, cfg["export_variable"], ", job shell wrapped" if cfg["wrap_job_shell"] else ""))


def main():
    e = pbs.event()
    server_side = e.type in (pbs.QUEUEJOB, pbs.MODIFYJOB)
    if not server_side and e.type != pbs.EXECJOB_LAUNCH:
        e.accept()
    cfg = None
    try:
        cfg = load_config()
        if server_side:
            on_submit(e, cfg)
        else:
            on_launch(e, cfg)
    except Refusal as refusal:
        msg = str(refusal)
        if server_side:
            e.reject(msg)          # the user sees "qsub: <msg>"
        # On the mom the message only reaches the logs; the owner gets a generic mail.
        if cfg is not None and cfg["launch_failure"] == "requeue":
            if requeued_before(e.job):
                msg += " (requeued once already: deleting the job)"
            else:
                msg += " (requeuing the job once)"
                e.job.rerun()
        jobid = e.job.id if hasattr(e, "job") else ""
        pbs.logjobmsg(jobid, "hpcrun: " + msg)
        pbs.logmsg(pbs.LOG_ERROR, "hpcrun: job %s: %s" % (jobid, msg))
        e.reject("hpcrun: " + msg)
    e.accept()


main()
