"""hpcrun's command line: parse argv, dispatch, turn errors into one line.

The main form `hpcrun [options] IMAGE COMMAND [ARGS...]` is the hot path (one
per MPI rank), so this module parses by hand and imports nothing heavy.
Subcommands live in hpcrun/cmd_<name>.py and are imported only when used.
"""
from hpcrun import rankos as os     # os without its import cost (rankos.py)
import sys

from hpcrun import errors

USAGE = """\
usage: hpcrun [options] IMAGE COMMAND [ARGS...]
       hpcrun exec [options] IMAGE COMMAND [ARGS...]
       hpcrun run [options] IMAGE [ARGS...]        run the image's runscript
       hpcrun shell [options] IMAGE                 an interactive shell inside
       hpcrun inspect [--json] IMAGE                what an image holds
       hpcrun run-help IMAGE                        the image's help (a SIF's %help)
       hpcrun check [IMAGE]                         will a launch work here?
       hpcrun build OUT.img SPEC | --from SOURCE    make an image
       hpcrun sign [-k KEY] IMAGE                   add an OpenSSH signature
       hpcrun verify [--allowed-signers FILE] IMAGE check its signatures
       hpcrun broadcast IMAGE | --clean             copy IMAGE to node-local storage, once per job (MPI)
       hpcrun install-entry [--bin DIR]             make `hpcrun` start Python with -I -S (docs/install.md)
       hpcrun version

options (before IMAGE):
  -B, --bind SRC[:DST[:ro|rw]]   bind a host path (repeatable, comma lists; also HPCRUN_BIND, APPTAINER_BIND)
      --pwd DIR                  working directory inside (default: the current one)
      --env NAME=VALUE           set a variable inside (repeatable; also HPCRUN_ENV_NAME=VALUE, APPTAINERENV_NAME)
      --env-file FILE            NAME=VALUE lines to set inside
      --cleanenv                 pass only a minimal environment (launcher wiring kept)
      --no-home                  do not bind $HOME
      --mpi auto|hybrid|host|none  MPI library strategy (docs/mpi.md)
      --nv                       make the host's NVIDIA driver visible (also HPCRUN_NV=1)
      --rocm                     make the host's ROCm (AMD GPU) stack visible (also HPCRUN_ROCM=1)
      --image-digest DIGEST      run IMAGE only if it is still the image pinned (sha256:HEX;
                                 also HPCRUN_IMAGE_DIGEST; docs/run.md)
      --dry-run                  print the launch plan as JSON and exit
  -v, --verbose                  say what is done and why, with timings
      --debug                    show tracebacks
  -h, --help                     this text
Exit codes: docs/exit-codes.md."""

SUBCOMMANDS = ("exec", "run", "shell", "inspect", "check", "build", "sign", "verify", "version", "task-entry",
               "help", "run-help", "broadcast", "install-entry")
_WITH_VALUE = {"-B": "binds", "--bind": "binds", "--pwd": "pwd", "--env": "env", "--env-file": "env_files",
               "--mpi": "mpi", "--image-digest": "image_digest"}
_FLAGS = {"--cleanenv": "cleanenv", "--no-home": "no_home", "--dry-run": "dry_run", "-v": "verbose",
          "--verbose": "verbose", "--debug": "debug", "--nv": "nv",
          "--rocm": "rocm"}


class Options:
    def __init__(self):
        self.binds, self.env, self.env_files = [], [], []
        self.pwd = self.mpi = self.image = self.image_digest = None
        self.cleanenv = self.no_home = self.dry_run = self.verbose = self.debug = self.nv = self.rocm = False
        self.command = []
        self.runscript = False


def parse(argv, mode):
    """argv after the subcommand -> Options.  mode: exec | run | shell."""
    o = Options()
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("-") or a == "-":
            break
        name, eq, value = a.partition("=")
        if name in _WITH_VALUE:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise errors.Error(errors.USAGE, "option needs a value", name)
                value = argv[i]
            attr = _WITH_VALUE[name]
            if attr == "binds":
                o.binds.extend(s for s in value.split(",") if s)
            elif attr == "env":
                k, sep, v = value.partition("=")
                from hpcrun import environment
                if not sep or not environment.valid_name(k):
                    raise errors.Error(errors.USAGE, "malformed --env, expected NAME=VALUE", value)
                o.env.append((k, v))
            elif attr == "env_files":
                o.env_files.append(value)
            elif attr == "mpi":
                if value not in ("auto", "hybrid", "host", "none"):
                    raise errors.Error(errors.USAGE, "--mpi must be auto, hybrid, host or none", value)
                o.mpi = value
            elif attr == "image_digest":
                from hpcrun import image
                o.image_digest = image.parse_pin(value, name)
            else:
                setattr(o, attr, value)
        elif a in _FLAGS:
            setattr(o, _FLAGS[a], True)
        elif a in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        elif a[:2] == "-B" and len(a) > 2:
            o.binds.extend(s for s in a[2:].split(",") if s)
        else:
            raise errors.Error(errors.USAGE, "unknown option", a)
        i += 1
    if i >= len(argv):
        raise errors.Error(errors.USAGE, "missing IMAGE (see hpcrun --help)")
    o.image = argv[i]
    if not o.image:
        # `hpcrun "$HPCRUN_IMAGE" cmd` with the variable unset: not the current directory
        raise errors.Error(errors.USAGE, "image argument is empty")
    o.command = argv[i + 1:]
    if mode == "exec":
        if not o.command:
            raise errors.Error(errors.USAGE, "missing COMMAND after the image", o.image)
        first = o.command[0]
        if (first in _WITH_VALUE or first in _FLAGS or first.split("=")[0] in _WITH_VALUE
                or (first[:2] == "-B" and len(first) > 2)):
            raise errors.Error(errors.USAGE, "hpcrun option after the image name; put options before IMAGE",
                               first)
    elif mode == "run":
        o.runscript = True
    elif mode == "shell":
        o.command = o.command or ["/bin/sh"]
    return o


def main(argv=None):
    if sys.stdin is None or sys.stdout is None or sys.stderr is None:
        _hold_closed_standard_fds()
    claim = _front_claim()
    if os.getenv("LC_CTYPE") == "C.UTF-8":
        _undo_locale_coercion()
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv[:argv.index("--")] if "--" in argv else "--debug" in argv
    try:
        code = _dispatch(argv, claim)
        sys.stdout.flush()       # a reader that left shows up here, not at interpreter exit
        _release(claim)          # (a launch that failed: its lock's file goes too)
        return code
    except errors.Error as e:
        if debug:
            import traceback
            traceback.print_exc()
        sys.stderr.write(e.line() + "\n")
        _release(claim)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _stdout_gone()
    except Exception as e:
        if debug:
            raise
        sys.stderr.write("hpcrun: error: internal error: %s: %s (rerun with --debug)\n" % (type(e).__name__, e))
        return errors.SOFTWARE


def _hold_closed_standard_fds():
    """A caller closed fd 0, 1 or 2 (`hpcrun IMG prog 2>&-`, a daemon's child); Python then has no
    sys.stdin, sys.stdout or sys.stderr.  /dev/null holds each such number until the exec
    (close-on-exec: the program gets it closed, as the caller had it), so that nothing hpcrun opens
    takes it (the keeper's pipe and run directory would become its standard fds: node.start), and
    what hpcrun would say there goes nowhere, as the caller chose."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)     # the lowest free number: fd
            if null != fd:
                os.dup2(null, fd, inheritable=False)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))


def _front_claim():
    """The compiled front's mark (ticket.py), ours alone, never the program's or the plan's:
    removed first thing.  [K, the lock fd the job's other ranks wait on or None, its
    directory's fd or None] or None."""
    mark = os.getenv("_HPCRUN_TICKET")
    if mark is not None:
        os.unsetenv("_HPCRUN_TICKET")
    if not mark:
        return None
    k, _, fd = mark.partition(":")
    lock = int(fd) if fd.isdigit() and 2 < int(fd) < 1 << 20 else None
    tickets = None
    if lock is not None:
        try:
            os.set_inheritable(lock, False)     # never into the program, the keeper, a subcommand's children
            # where its file is (the front made it there), opened now, on the host: ticket.let_go
            tickets = os.open("/tmp/hpcrun-%d/tickets" % os.getuid(),
                              os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            pass
    return [k, lock, tickets]


def _release(claim):
    """Let the job's waiting ranks go on (no ticket comes from here)."""
    if claim and claim[1] is not None:
        from hpcrun import ticket
        ticket.let_go(claim)


def _undo_locale_coercion():
    """Python sets LC_CTYPE=C.UTF-8 where the caller's locale is C or unset (PEP 538), over a
    caller's LC_CTYPE=C too: that is Python's, not the caller's, and must not reach the program.
    The environment hpcrun was started with is /proc/self/environ (its first LC_CTYPE is the
    one os.environ would hold)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            started = f.read().split(b"\0")
    except OSError:
        return
    for e in started:
        if e.startswith(b"LC_CTYPE="):
            os.setenv("LC_CTYPE", e[9:])
            return
    os.unsetenv("LC_CTYPE")


def _dispatch(argv, claim=None):
    if os.getenv("HPCRUN_TASK_ARGV0") is not None and argv[:1] != ["task-entry"]:
        return _sub("task-entry", argv, claim)     # a Slurm task: a rank, which the front may serve next
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else errors.USAGE
    if argv[0] in ("version", "--version"):
        from hpcrun import VERSION
        print("hpcrun %s" % VERSION)
        return 0
    if argv[0] in ("exec", "run", "shell"):
        mode, rest = argv[0], argv[1:]
    elif argv[0] in SUBCOMMANDS:
        # --debug is main's (tracebacks), for every command: not the subcommand's option to refuse
        rest = argv[1:]
        cut = rest.index("--") if "--" in rest else len(rest)
        _release(claim)
        return _sub(argv[0], [a for a in rest[:cut] if a != "--debug"] + rest[cut:])
    else:
        mode, rest = "exec", argv
    from hpcrun import launch
    return launch.launch(parse(rest, mode), claim and (claim, argv))


def _stdout_gone():
    """stdout's reader left early (`hpcrun --dry-run IMG | head`): not a bug of
    ours.  Point stdout at /dev/null so the interpreter's last flush is quiet,
    and exit as a shell reports a writer killed by SIGPIPE."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError):
        pass
    return 128 + 13


def _sub(name, argv, claim=None):
    """The subcommand's main(argv), imported by name (no import circle: cmd_task_entry uses cli);
    claim: the front's, to the Slurm task entry only."""
    import importlib
    if name != "task-entry":           # a Slurm task is a rank: it execs; the rest may run long
        import gc
        gc.enable()                    # (the installed entry turned the collector off: entry.py)
    try:
        mod = importlib.import_module("hpcrun.cmd_" + name.replace("-", "_"))
    except ImportError as e:
        if e.name != "hpcrun.cmd_" + name.replace("-", "_"):
            raise
        raise errors.Error(errors.USAGE, "this hpcrun has no '%s' command" % name)
    return mod.main(argv) if claim is None else mod.main(argv, claim)


def run_singularity(argv=None):
    """`run-singularity IMAGE [ARGS...]`: what a SIF's first line
    (`#!/usr/bin/env run-singularity`) calls.  A real Apptainer or
    Singularity on PATH does the work (never shadowed); only where neither is
    installed does hpcrun run the image."""
    argv = sys.argv[1:] if argv is None else argv
    for name in ("apptainer", "singularity"):
        # PATH unset: the default path, as execvp has it (not the cwd: "" would be ".")
        for d in os.getenv("PATH", os.defpath).split(":"):
            exe = os.path.join(d or ".", name)
            if os.path.isfile(exe) and os.access(exe, os.X_OK):
                os.execv(exe, [name, "run"] + argv)
    if not argv:
        sys.stderr.write("usage: run-singularity IMAGE [ARGS...]\n")
        return errors.USAGE
    return main(["run", "--"] + argv) if argv[0].startswith("-") else main(["run"] + argv)
