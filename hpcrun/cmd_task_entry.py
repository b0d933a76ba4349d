"""The hpcrun side of a Slurm task wrapped by the SPANK plugin.

plugins/slurm/spank_hpcrun.c replaces a task's argv[0] with hpcrun's path just
before Slurm execs it.  The argv array cannot grow, so hpcrun is started as
``hpcrun ARG1 ARG2 ...`` (the task's original arguments) and the rest travels
in the environment:

    HPCRUN_TASK_ARGV0   the task's original argv[0] (its presence selects task mode)
    HPCRUN_TASK_IMAGE   image path (relative: to the task's cwd, then SLURM_SUBMIT_DIR)
    HPCRUN_TASK_IMAGE_FROM  where the plugin found it: --container-image, HPCRUN_IMAGE, --container
                        (named when the image is empty or missing)
    HPCRUN_TASK_BIND    comma list of SRC[:DST[:ro|rw]]  (--container-mounts, plugstack mounts=);
                        a relative SRC is the task's cwd's
    HPCRUN_TASK_PWD     working directory inside the image (--container-workdir; relative: the task's cwd's)
    HPCRUN_TASK_ENV     comma list of NAME or NAME=VALUE (--container-env)
    HPCRUN_TASK_BATCH   "1" for the batch script (its spool directory is bound in)

cli.main() calls main() with its own argv[1:] when HPCRUN_TASK_ARGV0 is set;
``hpcrun task-entry ARGS...`` does the same by hand.  We rebuild the ordinary
command line ``hpcrun [options] IMAGE ARGV0 ARGS...``, drop the HPCRUN_TASK_*
variables (the program must not see them, and a nested hpcrun must not take
itself for a task entry), and go down the normal launch path.
"""
import sys

from hpcrun import rankos as os      # a task is a rank: no `import os` (rankos.py)
from hpcrun.errors import Error, NOINPUT, USAGE

TASK_VARS = ("HPCRUN_TASK_ARGV0", "HPCRUN_TASK_IMAGE", "HPCRUN_TASK_IMAGE_FROM", "HPCRUN_TASK_BIND",
             "HPCRUN_TASK_PWD", "HPCRUN_TASK_ENV", "HPCRUN_TASK_BATCH")

# How a user sets each source the plugin reports, for the empty-image error.
IMAGE_SOURCES = {"HPCRUN_IMAGE": "HPCRUN_IMAGE, set but empty in the task's environment",
                 "--container": "--container / SLURM_CONTAINER, set but empty",
                 "--container-image": "--container-image"}


def is_task_entry(environ=None):
    """True when the SPANK plugin started this hpcrun in place of a task."""
    return bool(os.getenv("HPCRUN_TASK_ARGV0") if environ is None else environ.get("HPCRUN_TASK_ARGV0"))


def _split(value):
    return [item for item in (value or "").split(",") if item]


def resolve_image(image, environ, cwd):
    """Relative paths mean the task's cwd, else the submit directory.

    A path found in neither stays relative to the cwd, so hpcrun's
    "image not found" error names the absolute path the user can check.
    """
    if os.path.isabs(image):
        return image
    here = os.path.join(cwd, image)
    submit = environ.get("SLURM_SUBMIT_DIR")
    if not os.path.exists(here) and submit and os.path.exists(os.path.join(submit, image)):
        return os.path.join(submit, image)
    return here


def launch_argv(args, environ, cwd):
    """The ordinary hpcrun command line for a task with original args `args`."""
    argv0 = environ.get("HPCRUN_TASK_ARGV0")
    image = environ.get("HPCRUN_TASK_IMAGE")
    source = environ.get("HPCRUN_TASK_IMAGE_FROM")
    if argv0 and not image and source:
        # The plugin wraps a task whose image source is set but empty (an unset
        # shell variable, most often) so that it fails here, by name.
        raise Error(USAGE, "image argument is empty", IMAGE_SOURCES.get(source, source))
    if not argv0 or not image:
        raise Error(USAGE, "Slurm task entry without HPCRUN_TASK_ARGV0 and HPCRUN_TASK_IMAGE",
                    "spank_hpcrun plugin")
    opts = []
    for bind in _split(environ.get("HPCRUN_TASK_BIND")):
        # Slurm users write paths relative to where they submit; hpcrun -B wants them absolute.
        src, sep, rest = bind.partition(":")
        if src and not os.path.isabs(src):
            bind = os.path.join(cwd, src) + sep + rest
        opts += ["--bind", bind]
    if environ.get("HPCRUN_TASK_BATCH") == "1" and os.path.isabs(argv0):
        # The batch script lives in slurmd's spool directory, unknown to the image.
        spool = os.path.dirname(argv0)
        opts += ["--bind", "%s:%s:ro" % (spool, spool)]
    if environ.get("HPCRUN_TASK_PWD"):
        opts += ["--pwd", os.path.join(cwd, environ["HPCRUN_TASK_PWD"])]
    for item in _split(environ.get("HPCRUN_TASK_ENV")):
        if "=" in item:
            opts += ["--env", item]
        elif item in environ:
            opts += ["--env", "%s=%s" % (item, environ[item])]
    path = resolve_image(image, environ, cwd)
    if source:
        # The launcher would say "image not found (path)"; say where the path came
        # from too, as the cli_filter does (a stale HPCRUN_IMAGE is not --container).
        # Other failures (unreadable, not an image) stay the launcher's to report.
        try:
            os.stat(path)
        except FileNotFoundError:
            raise Error(NOINPUT, "image not found", "%s, from %s" % (path, source)) from None
        except OSError:
            pass
    return opts + [path, argv0] + list(args)


def main(argv, claim=None):
    """claim: the compiled front's (cli._front_claim): the task is then recorded from here on,
    HPCRUN_TASK_* included, for a join ticket that serves the step's next tasks (ticket.py)."""
    rec = None
    environ = os.environ_dict()
    if claim:
        from hpcrun import ticket
        rec = ticket.start(claim, argv, None)      # K as the front made it: before anything changes
        if rec:
            environ = rec.begin_host(environ)
    try:
        cli_argv = launch_argv(argv, environ, os.getcwd())
    except Error as e:
        print(e.line(), file=sys.stderr)
        if rec:
            rec.discard()
        return e.code
    finally:
        if rec:
            rec.uninstall()
    for name in TASK_VARS:
        os.unsetenv(name)
    from hpcrun import cli
    if claim is None:
        return cli.main(cli_argv)
    from hpcrun import launch                      # (cli.main, our caller, reports its errors)
    return launch.launch(cli.parse(cli_argv, "exec"), rec=rec)
