"""Submit and follow Slurm jobs from Python (tests, demos, benchmarks; not shipped in the wheel).

Two backends give the same small API:

- pyslurm, when it is importable *and* its version matches the cluster's Slurm
  (pyslurm's versions follow Slurm's: 22.5.x for Slurm 22.05; a mismatched
  pyslurm fails at load or misreads structures);
- otherwise Slurm's own commands with their JSON output: ``sbatch --parsable``,
  ``squeue --json`` (Slurm 22.05's
  scontrol has no --json), ``scancel``.

On Debian 12 (Slurm 22.05) PyPI has no matching pyslurm build (it carries
17.11-18.8 and 25.11 only), so the CLI backend is the one used there; docs/slurm.md
says so.  ``backend()`` tells which one a process uses.

    jid = submit("#!/bin/sh\\nsrun hostname\\n", ["-N2"], env=env)
    info = wait(jid, timeout=60, env=env)      # -> {"job_id", "state", "exit_code", ...}
"""
import json
import re
import subprocess
import time

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


class SlurmError(RuntimeError):
    pass


def _run(argv, env=None, timeout=60, input=None):
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, input=input)
    if r.returncode != 0:
        raise SlurmError("%s failed (%d): %s" % (argv[0], r.returncode, r.stderr.strip()))
    return r.stdout


def slurm_version(env=None):
    """(major, minor) of the Slurm the commands talk to, from `sinfo --version`."""
    out = _run(["sinfo", "--version"], env=env)
    m = re.search(r"(\d+)\.(\d+)", out)
    if not m:
        raise SlurmError("cannot read Slurm's version from %r" % out)
    return int(m.group(1)), int(m.group(2))


def _pyslurm(env=None):
    """The pyslurm module when it matches the cluster's Slurm, else None."""
    try:
        import pyslurm
    except ImportError:
        return None
    m = re.match(r"(\d+)\.(\d+)", getattr(pyslurm, "__version__", ""))
    try:
        # pyslurm 22.5.x <-> Slurm 22.05: the minor is written without its zero.
        if m and (int(m.group(1)), int(m.group(2))) == slurm_version(env):
            return pyslurm
    except SlurmError:
        pass
    return None


def backend(env=None):
    return "pyslurm" if _pyslurm(env) else "cli"


def submit(script, args=(), env=None, cwd=None):
    """Submit a batch script (text); return the job id as an int."""
    py = _pyslurm(env)
    if py is not None and not args and cwd is None and env is None:
        return py.JobSubmitDescription(script=script).submit()
    r = subprocess.run(["sbatch", "--parsable"] + list(args), input=script, env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise SlurmError("sbatch failed (%d): %s" % (r.returncode, r.stderr.strip()))
    return int(r.stdout.strip().split(";")[0])


def _state(job):
    s = job.get("job_state")
    if isinstance(s, list):   # newer Slurm: a list of flags
        s = s[0] if s else ""
    return s or ""


def _jobs(env=None):
    # squeue --json lists finished jobs too (until MinJobAge) and ignores
    # filters in 22.05; scontrol has no --json before 23.02.
    return json.loads(_run(["squeue", "--json"], env=env)).get("jobs", [])


def job(job_id, env=None):
    """Facts about one job: job_id, state, exit_code and signal of the batch script, nodes."""
    for j in _jobs(env):
        if j.get("job_id") == int(job_id):
            status = j.get("exit_code") or 0   # a wait(2) status in 22.05
            if isinstance(status, dict):     # newer Slurm: {"return_code", "signal": {...}}
                code, sig = status.get("return_code"), status.get("signal", {}).get("signal_id")
            else:
                code, sig = (status >> 8) & 0xff, status & 0x7f
            return {"job_id": j["job_id"], "state": _state(j), "exit_code": code, "signal": sig or 0,
                    "reason": j.get("state_reason"), "nodes": j.get("nodes"), "raw": j}
    raise SlurmError("no such job %s" % job_id)


def queue(env=None):
    """Job ids, states and names of every job slurmctld knows."""
    return [{"job_id": j.get("job_id"), "state": _state(j), "name": j.get("name")} for j in _jobs(env)]


def wait(job_id, timeout=120, env=None, poll=0.2):
    """Until the job has finished; return job(job_id).  Raises SlurmError on timeout."""
    end = time.monotonic() + timeout
    while True:
        info = job(job_id, env=env)
        if info["state"] in FINISHED:
            return info
        if time.monotonic() > end:
            raise SlurmError("job %s still %s after %ss" % (job_id, info["state"], timeout))
        time.sleep(poll)


def wait_state(job_id, states, timeout=60, env=None, poll=0.1):
    """Until the job is in one of `states` (e.g. {"RUNNING"})."""
    end = time.monotonic() + timeout
    while True:
        info = job(job_id, env=env)
        if info["state"] in states:
            return info
        if time.monotonic() > end or info["state"] in FINISHED:
            raise SlurmError("job %s is %s, not %s" % (job_id, info["state"], sorted(states)))
        time.sleep(poll)


def cancel(job_id, signal=None, env=None):
    _run(["scancel"] + (["--signal=%s" % signal] if signal else []) + [str(job_id)], env=env)


def output(path):
    with open(path, errors="replace") as f:
        return f.read()


__all__ = ["submit", "job", "queue", "wait", "wait_state", "cancel", "backend", "slurm_version",
           "SlurmError", "FINISHED", "output"]
