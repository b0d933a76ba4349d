"""One launch, as a straight line: argv -> image -> plan -> join -> exec.

Nothing forks here except, once per node, the keeper (node.py).  The
process that the MPI launcher or srun started becomes the program: same PID,
same inherited descriptors (PMI_FD ...), its signals and exit status are the
program's own.
"""
from hpcrun import rankos as os     # os without its import cost (rankos.py)
import sys
import time

from hpcrun import config, environment, errors, image, join, plan as plan_mod


def launch(opts, claimed_ticket=None, rec=None):
    """rec: a Slurm task's Recorder, recording since the task entry began (cmd_task_entry)."""
    t0 = time.perf_counter()
    timing = []
    if claimed_ticket or rec:
        from hpcrun import ticket
        if claimed_ticket:                   # the compiled front sent us: record for it (ticket.py)
            claim, args = claimed_ticket
            rec = ticket.start(claim, args, opts)
        elif not ticket.allowed(opts):       # a Slurm task's, recording since its entry
            rec.discard()
            rec = None
    environ = os.environ_dict()              # read once: os.environ decodes on every look
    if rec:
        environ = rec.begin_host(environ)
    try:
        cfg = config.load(environ)
        img = image.open_image(opts.image)                       # validated, nothing mounted yet
        image.check_pin(img, opts.image_digest, environ)         # still the image submitted?
        plan = plan_mod.build(opts, img, cfg, environ)           # plain data
    finally:
        if rec:
            rec.uninstall()
    if opts.dry_run:
        return dry_run(plan, img)
    # Inside, the image's files replace Python's library and imports are
    # sealed (join.seal_imports): import now what the rest may need.
    if opts.runscript:
        import json  # noqa: F401
    if opts.debug:
        import traceback  # noqa: F401  (cli.main prints it)
    t1 = time.perf_counter()
    join.join(plan, cfg, timing, rec)                        # now inside the node's container
    t2 = time.perf_counter()
    for w in plan.get("warnings", ()):
        sys.stderr.write("hpcrun: warning: %s\n" % w)
    if opts.verbose:
        for n in plan.get("notes", ()):
            sys.stderr.write("hpcrun: note: %s\n" % n)
    if rec:
        rec.install("inside")
    try:
        env = environment.final(plan, rec.watched if rec else dict)
        meta = image_json() if opts.runscript else {}
        workdir = meta.get("workdir") if not opts.pwd else None
        if isinstance(workdir, str) and workdir.startswith("/"):   # an image's WORKDIR: `hpcrun run` starts there
            plan["cwd"] = workdir
        cwd = enter_cwd(plan, env, opts, required=workdir)      # first: ./solver is relative to it
        argv = command(plan, env, meta)
    finally:
        if rec:
            rec.uninstall()
    if rec:
        if not plan.get("warnings") and not missing_interpreter(argv[0]):
            rec.write(cwd, argv, env, os.environ)
        else:
            rec.discard()
    if opts.verbose:
        sys.stderr.write("hpcrun: %s image %s, container %s%s; plan %.1f ms, join %.1f ms; exec %s in %s\n" % (
            img.kind, img.path, plan["key"], " (new)" if timing else " (joined)",
            (t1 - t0) * 1e3, (t2 - t1) * 1e3, argv[0], cwd))
    exec_in_place(argv, env)


def dry_run(plan, img):
    import json
    if plan["user"] is None:
        plan["user"] = plan_mod.user_entry(plan["uid"], os.environ)
    out = dict(plan)
    out["image_meta"] = img.meta()
    from hpcrun import stage
    out["stage"] = {"strategy": stage.strategy(plan)}
    if out["stage"]["strategy"] == "fuse":
        out["stage"]["program"] = stage.fuse_program()
    env = out.pop("env")
    out["env"] = {"set": env["base"], "user": dict(env["user"]), "dropped": env["dropped"],
                  "then_inside": ["/.hpcrun/env", "/.hpcrun/launch.env"]
                  + (["/.singularity.d/env/*.sh (the container's /bin/sh)"] if img.kind == "sif" else [])}
    json.dump(out, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


def image_json():
    """The image's /.hpcrun/image.json, read inside ({} if absent or not a JSON object)."""
    import json                       # imported before the join (launch), found in sys.modules
    from hpcrun import fdio
    try:
        meta = json.loads(fdio.read_regular("/.hpcrun/image.json") or b"{}")
    except (ValueError, LookupError):
        return {}
    return meta if isinstance(meta, dict) else {}


# Apptainer's environment, as its action scripts apply it: the image's
# /.singularity.d/env/*.sh sourced in glob (C locale) order by the container's
# /bin/sh, then what the user asked for (APPTAINERENV_*, --env ...) wins again,
# the host wiring's LD_LIBRARY_PATH stays in front, and the command is exec'd
# (same PID).  A PATH the user extended (--env 'PATH=/x:$PATH',
# APPTAINERENV_PREPEND_PATH) extends the PATH the scripts leave.  Data never
# becomes script text, and values travel in the environment (_HPCRUN_ENV_<i>,
# _HPCRUN_PATH_PRE/_POST), not in argv, which any user may read in ps:
#   sh -c SCRIPT hpcrun LD_LIBRARY_PATH N NAME1 ... NAMEn CMD ARGS...
APPTAINER_SH = """\
_hpcrun_ld=$1; _hpcrun_n=$2; shift 2
for _hpcrun_f in /.singularity.d/env/*.sh; do
    if [ -f "$_hpcrun_f" ] && [ -r "$_hpcrun_f" ]; then . "$_hpcrun_f"; fi
done
if [ -n "${_HPCRUN_PATH_PRE+x}" ]; then
    export PATH="$_HPCRUN_PATH_PRE$PATH$_HPCRUN_PATH_POST"
    unset _HPCRUN_PATH_PRE _HPCRUN_PATH_POST
fi
_hpcrun_i=0
while [ "$_hpcrun_i" -lt "$_hpcrun_n" ]; do
    eval "export $1=\\"\\$_HPCRUN_ENV_$_hpcrun_i\\"; unset _HPCRUN_ENV_$_hpcrun_i"
    shift; _hpcrun_i=$((_hpcrun_i + 1))
done
if [ -n "$_hpcrun_ld" ]; then
    case ":${LD_LIBRARY_PATH:-}:" in
        *":$_hpcrun_ld:"*) ;;
        *) export LD_LIBRARY_PATH="$_hpcrun_ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
    esac
fi
unset _hpcrun_ld _hpcrun_n _hpcrun_f _hpcrun_i
if ! command -v -- "$1" >/dev/null 2>&1; then
    printf 'hpcrun: error: command not found in the image (%s)\\n' "$1" >&2
    exit 127
fi
exec "$@"
"""


def is_apptainer(plan):
    """A SIF, or a sandbox/SquashFS that Apptainer built: its /.singularity.d decides."""
    kind = plan["image"]["kind"]
    return kind == "sif" or (kind != "hpcrun" and os.path.isdir("/.singularity.d"))


def env_scripts():
    try:
        return [n for n in os.listdir("/.singularity.d/env") if n.endswith(".sh")]
    except OSError:
        return []


def apptainer_argv(argv, plan, env):
    # Only names a script can set need setting again (valid_name: safe in eval).
    user = []
    for name, _ in plan["env"]["user"]:
        if name in env and name not in user and environment.valid_name(name):
            user.append(name)
    before = plan["env"].get("path_before_user")
    if "PATH" in user and before and before in env["PATH"] and before != env["PATH"]:
        # the user's PATH holds the one before it: put the same around the scripts' PATH
        user.remove("PATH")
        i = env["PATH"].index(before)
        env["_HPCRUN_PATH_PRE"], env["_HPCRUN_PATH_POST"] = env["PATH"][:i], env["PATH"][i + len(before):]
        env["PATH"] = before                 # what the scripts extend
    for i, name in enumerate(user):
        env["_HPCRUN_ENV_%d" % i] = env[name]
    return ["/bin/sh", "-c", APPTAINER_SH, "hpcrun", env.get("LD_LIBRARY_PATH", ""), str(len(user))] + user + argv


def command(plan, env, meta=None):
    """The argv to exec, with argv[0] resolved inside the container."""
    argv = list(plan["argv"])
    apptainer = is_apptainer(plan)
    if plan["runscript"]:
        if os.access("/.hpcrun/runscript", os.X_OK):
            argv = ["/.hpcrun/runscript"] + argv
        elif apptainer and os.path.isfile("/.singularity.d/runscript"):
            # Apptainer's `run`: the runscript (a /bin/sh script it wrote from %runscript)
            rs = "/.singularity.d/runscript"
            argv = ([rs] if os.access(rs, os.X_OK) else ["/bin/sh", rs]) + argv
        else:
            rs = (meta if meta is not None else image_json()).get("runscript")
            if not rs:
                raise errors.Error(errors.NOTFOUND, "image has no runscript", plan["image"]["path"])
            argv = (rs if isinstance(rs, list) else [rs]) + argv
    if apptainer and env_scripts():
        if os.access("/bin/sh", os.X_OK):
            # the program is looked up on the PATH the env scripts leave, by the shell
            argv = apptainer_argv(argv, plan, env)
        else:
            # (Apptainer sources them with a shell built into its runtime; hpcrun
            # runs no image code in its own process, so it needs the image's)
            sys.stderr.write("hpcrun: warning: the image has no /bin/sh to source its environment scripts "
                             "(/.singularity.d/env); running without them\n")
    name = argv[0]
    argv[0] = find_command(name, env.get("PATH", environment.DEFAULT_PATH))
    return argv


def find_command(name, path):
    if "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or ".", name) for d in path.split(":")]
    found_not_exec = None
    for c in candidates:
        try:
            os.stat(c)
        except OSError:
            continue
        if os.path.isdir(c):
            found_not_exec = found_not_exec or c
            continue
        if os.access(c, os.X_OK):
            return c
        found_not_exec = found_not_exec or c
    if found_not_exec:
        raise errors.Error(errors.NOTEXEC, "command not executable in the image", found_not_exec)
    raise errors.Error(errors.NOTFOUND, "command not found in the image", name)


def enter_cwd(plan, env, opts, required=None):
    """The planned directory, else HOME, else /; with --pwd (or an image's WORKDIR:
    required) there is no fallback."""
    required = opts.pwd or required
    for d in (plan["cwd"], env.get("HOME"), "/"):
        if not d:
            continue
        try:
            os.chdir(d)
            if d != plan["cwd"] and required:
                raise errors.Error(errors.NOINPUT, "working directory not found in the container", required)
            env["PWD"] = d
            return d
        except OSError:
            if required:
                raise errors.Error(errors.NOINPUT, "working directory not found in the container", required)
    return "/"


def exec_in_place(argv, env):
    from hpcrun import rankcalls
    # Python ignores SIGPIPE and SIGXFSZ; ignored signals survive execve, so
    # give the program the default dispositions it would have had natively.
    # (_signal, not signal: the latter's enums cost ~2 ms a rank.)
    import _signal
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)
    rankcalls.no_new_privs()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(argv[0], argv, env)
    except OSError as e:
        code = errors.NOTEXEC if e.errno in (13, 8) else errors.NOTFOUND
        missing = missing_interpreter(argv[0]) if e.errno == 2 else None
        if missing:
            raise errors.Error(code, "cannot execute: its %s is not in the image" % missing, argv[0])
        raise errors.Error(code, "cannot execute: %s" % e.strerror, argv[0])


def missing_interpreter(path):
    """Why execve said ENOENT for a file that exists: the `#!` interpreter or
    the ELF loader (PT_INTERP) it names is missing inside, typically a host
    program copied into an image without its libraries.  None if neither."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
            if head.startswith(b"#!"):
                words = head[2:].split(b"\n", 1)[0].split()
                interp, what = (words[0] if words else b""), "#! interpreter"
            elif head[:6] == b"\x7fELF\x02\x01":         # 64-bit little-endian
                interp, what = None, "ELF loader"
                phoff, phsize, phnum = (int.from_bytes(head[0x20:0x28], "little"),
                                        int.from_bytes(head[0x36:0x38], "little"),
                                        int.from_bytes(head[0x38:0x3a], "little"))
                for i in range(min(phnum, 64)):
                    ph = head[phoff + i * phsize:phoff + (i + 1) * phsize]
                    if len(ph) >= 40 and int.from_bytes(ph[0:4], "little") == 3:      # PT_INTERP
                        f.seek(int.from_bytes(ph[8:16], "little"))
                        interp = f.read(min(int.from_bytes(ph[32:40], "little"), 4096)).rstrip(b"\0")
                        break
            else:
                return None
    except OSError:
        return None
    if not interp or os.path.exists(interp):
        return None
    return "%s %s" % (what, os.fsdecode(interp))
