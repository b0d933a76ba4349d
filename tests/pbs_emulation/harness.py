"""run_hook(): put one event through one hook file as PBS would.

The hook runs in a child `python3 -I -S -OO runner.py ...` (isolated, no
site-packages, asserts and docstrings stripped), with PBS_HOOK_CONFIG_FILE
naming `<hook>.CF` (PBS stores the imported config under that name whatever its
suffix), cwd in a hooks/tmp directory, and an alarm (PBS default 30 s).
"""
import json
import os
import shutil
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
HOOK = os.path.join(REPO, "plugins", "pbs", "hpcrun_pbs_hook.py")
CONFIG = os.path.join(REPO, "plugins", "pbs", "hpcrun_pbs.json")
PYTHON = "/usr/bin/python3"       # the system interpreter, like pbs_python: not the venv
RUNNER = os.path.join(HERE, "runner.py")

# Built-in resources of a PBS server (a subset; enough for job requests here).
BUILTIN_RESOURCES = ("arch", "cput", "file", "host", "mem", "mpiprocs", "ncpus", "nodect", "nodes",
                     "ompthreads", "place", "pcput", "pmem", "pvmem", "select", "software",
                     "vmem", "vnode", "walltime", "ngpus", "naccelerators", "preempt_targets")
MOM_EVENTS = ("execjob_begin", "execjob_prologue", "execjob_epilogue", "execjob_end",
              "execjob_preterm", "execjob_launch", "exechost_periodic", "exechost_startup",
              "execjob_attach", "execjob_resize", "execjob_abort", "execjob_postsuspend",
              "execjob_preresume")
CLIENT = {"queuejob": "qsub", "modifyjob": "qalter", "movejob": "qmove", "resvsub": "pbs_rsub"}


class HookResult:
    """What PBS reads back: the decision, what the user sees, what changed."""

    def __init__(self, raw, event_type, hook_name):
        self.raw = raw
        self.exception = raw["exception"]
        self.alarm = raw["alarm"]
        self.rejected = raw["rejected"] or bool(self.exception) or self.alarm
        self.accepted = not self.rejected
        self.reject_msg = raw["reject_msg"]
        self.log = raw["log"]
        self.joblog = raw["joblog"]
        self.job = raw.get("job")
        self.rerun = raw.get("rerun", False)
        self.delete = raw.get("delete", False)
        self.progname = raw.get("progname")
        self.argv = raw.get("argv")
        self.env_str = raw.get("env")
        self.is_server = event_type not in MOM_EVENTS
        client = CLIENT.get(event_type, "pbs")
        if self.exception:
            msg = ("request rejected as filter hook '%s' encountered an exception. "
                   "Please inform Admin" % hook_name)
        elif self.alarm:
            msg = "request rejected as filter hook '%s' got an alarm call. Please inform Admin" % hook_name
        elif self.rejected:
            msg = self.reject_msg or "request rejected by filter hook '%s'" % hook_name
        else:
            msg = None
        # Server hooks: the client prints the message. Mom hooks: it only reaches the mom log.
        self.user_message = "%s: %s" % (client, msg) if msg and self.is_server else None
        self.mom_log_message = msg if msg and not self.is_server else None

    def env(self):
        """The job environment as the mom rebuilds it from str(e.env)."""
        return parse_env(self.env_str)

    def __repr__(self):
        return "HookResult(accepted=%r, msg=%r, exception=%r)" % (
            self.accepted, self.reject_msg, self.exception)


def run_hook(event_type, hook=HOOK, config=CONFIG, hook_name="hpcrun", alarm=30, job=None,
             job_o=None, requestor="root", requestor_host="localhost", progname=None, argv=None,
             env=None, resources=("container_image",), pbs_conf=None, nodename="localhost",
             run_as=None):
    """Run `hook` for one event. config: a path to import, a dict (written as
    JSON), a str (raw content) or None (no config imported).  job/job_o:
    {"id": ..., "attrs": {"Resource_List": {...}, "Variable_List": "k=v,...", ...}}."""
    work = tempfile.mkdtemp(prefix="pbs-hook-")
    try:
        hooks_dir = os.path.join(work, "hooks")
        os.makedirs(os.path.join(hooks_dir, "tmp"))
        env_vars = {"PATH": "/usr/bin:/bin"}
        if config is not None:
            cf = os.path.join(hooks_dir, hook_name + ".CF")
            if isinstance(config, dict):
                content = json.dumps(config)
            elif isinstance(config, str) and os.path.isfile(config):
                with open(config) as f:
                    content = f.read()
            else:
                content = config
            with open(cf, "w") as f:
                f.write(content)
            env_vars["PBS_HOOK_CONFIG_FILE"] = cf
        desc = {"type": event_type, "hook_name": hook_name, "requestor": requestor,
                "requestor_host": requestor_host,
                "resourcedef": list(BUILTIN_RESOURCES) + list(resources),
                "pbs_conf": pbs_conf or {}, "nodename": nodename}
        if job is not None:
            desc["job"] = job
        if job_o is not None:
            desc["job_o"] = job_o
        if event_type == "execjob_launch":
            desc["progname"] = progname
            desc["argv"] = list(argv or [])
            desc["env"] = env if isinstance(env, str) else _env_str(env or {})
        desc_path = os.path.join(work, "event.json")
        out_path = os.path.join(work, "out.json")
        with open(desc_path, "w") as f:
            json.dump(desc, f)
        os.chmod(work, 0o755)
        for p in (hooks_dir, desc_path):
            os.chmod(p, 0o755)
        proc = subprocess.run([PYTHON, "-I", "-S", "-OO", RUNNER, desc_path, out_path, hook, str(alarm)],
                              cwd=os.path.join(hooks_dir, "tmp"), env=env_vars, capture_output=True,
                              text=True, timeout=alarm + 30)
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise RuntimeError("emulated pbs_python failed (rc %d): %s" % (proc.returncode, proc.stderr))
        with open(out_path) as f:
            raw = json.load(f)
        return HookResult(raw, event_type, hook_name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parse_env(text):
    """"k=v,k2=v2" with "\\," inside values -> dict (the mom's reading of str(e.env))."""
    items, cur, i = [], [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1:i + 2] == ",":
            cur.append(",")
            i += 2
            continue
        if text[i] == ",":
            items.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    items.append("".join(cur))
    out = {}
    for item in items:
        if item:
            k, _, v = item.partition("=")
            out[k] = v
    return out


def _env_str(d):
    return ",".join("%s=%s" % (k, str(v).replace(",", "\\,")) for k, v in d.items())
