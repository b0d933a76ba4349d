"""The emulated pbs_mom: execjob_launch hooks, then the real start of the task.

Job shell (start_exec.c finish_exec): progname = the owner's shell, argv = [],
env = pbs_environment + Variable_List + the PBS_* job variables with
PBS_TASKNUM "1".  After the hooks, argv[0] becomes "-" + basename(progname),
argv[1:] is what the hooks left, the environment is REPLACED by the parse of
str(e.env), and progname is execve()d with no PATH search (a relative progname
resolves against the job's cwd, like execve).  stdin is a pipe carrying one
line: the path of the job script $PBS_HOME/mom_priv/jobs/<jobid>.SC, owned by
the user.

TM task (start_process): progname == argv[0], argv kept as is, PBS_TASKNUM
in "%8.8X" hex, the spawner's environment on top, execvp().
"""
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile

from . import harness


class JobRun:
    def __init__(self):
        self.hook_results = []
        self.deleted = False
        self.requeued = False
        self.exec_error = None
        self.exit_status = None
        self.stdout = ""
        self.stderr = ""
        self.argv = None
        self.progname = None
        self.env = None
        self.mom_log = []


class Mom:
    def __init__(self, server, environment=None):
        self.server = server
        self.pbs_home = tempfile.mkdtemp(prefix="pbs-home-")
        os.chmod(self.pbs_home, 0o755)
        for d in ("mom_priv/jobs", "aux", "spool"):
            os.makedirs(os.path.join(self.pbs_home, d))
        os.chmod(os.path.join(self.pbs_home, "mom_priv"), 0o751)
        os.chmod(os.path.join(self.pbs_home, "mom_priv/jobs"), 0o711)
        os.chmod(os.path.join(self.pbs_home, "aux"), 0o755)
        # $PBS_HOME/pbs_environment: the base of every job's environment.
        self.environment = dict(environment or {"PATH": "/bin:/usr/bin", "LANG": "C.UTF-8"})
        self.host = socket.gethostname()

    def close(self):
        shutil.rmtree(self.pbs_home, ignore_errors=True)

    def pbs_conf(self):
        return {"PBS_HOME": self.pbs_home, "PBS_EXEC": "/opt/pbs", "PBS_SERVER": self.server.name}

    def _job_env(self, job, user, tasknum):
        attrs = job["attrs"]
        res = attrs["Resource_List"]
        ncpus = str(res.get("ncpus", _select_total(res.get("select"), "ncpus") or 1))
        env = dict(self.environment)
        env.update(harness.parse_env(attrs["Variable_List"]))
        env.update({
            "HOME": user.pw_dir, "LOGNAME": user.pw_name, "USER": user.pw_name,
            "SHELL": user.pw_shell, "PBS_JOBNAME": attrs["Job_Name"], "PBS_JOBID": job["id"],
            "PBS_QUEUE": job["queue"], "PBS_JOBCOOKIE": job.setdefault("cookie", secrets.token_hex(16)),
            "PBS_NODENUM": "0", "PBS_TASKNUM": tasknum, "PBS_MOMPORT": "15003",
            "OMP_NUM_THREADS": ncpus, "NCPUS": ncpus,
            "PBS_NODEFILE": os.path.join(self.pbs_home, "aux", job["id"]),
            "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_JOBDIR": user.pw_dir,
            "TMPDIR": job["tmpdir"],
        })
        return env

    def _prepare(self, job, user):
        if "tmpdir" in job:
            return
        job["tmpdir"] = tempfile.mkdtemp(prefix="pbs.%s." % job["id"])
        os.chown(job["tmpdir"], user.pw_uid, user.pw_gid)
        slots = _select_total(job["attrs"]["Resource_List"].get("select"), "mpiprocs") or 1
        with open(os.path.join(self.pbs_home, "aux", job["id"]), "w") as f:
            f.write((self.host + "\n") * slots)
        script = os.path.join(self.pbs_home, "mom_priv", "jobs", job["id"] + ".SC")
        with open(script, "w") as f:
            f.write(job["script"])
        os.chown(script, user.pw_uid, user.pw_gid)
        os.chmod(script, 0o700)
        job["script_path"] = script

    def cleanup(self, jobid):
        job = self.server.jobs[jobid]
        if "tmpdir" in job:
            shutil.rmtree(job.pop("tmpdir"), ignore_errors=True)

    def _hooks(self, job, progname, argv, env, run):
        results = self.server.run_hooks(
            "execjob_launch", job={"id": job["id"], "attrs": job["attrs"], "msmom": True},
            requestor="pbs_mom", progname=progname, argv=argv, env=env,
            pbs_conf=self.pbs_conf(), nodename=self.host)
        run.hook_results = results
        for r in results:
            if r.rejected:
                run.mom_log.append(r.mom_log_message)
                run.mom_log.extend(m for _, m in r.joblog)
                if r.rerun:
                    run.requeued = True
                else:
                    run.deleted = True   # and the owner is mailed a generic message
                return None
        if not results:
            return progname, argv, harness._env_str(env)
        last = results[-1]
        return last.progname, last.argv, last.env_str

    def run_job(self, jobid, timeout=300):
        """Start the job shell for real and wait for it; returns a JobRun."""
        job = self.server.jobs[jobid]
        user = pwd.getpwnam(job["attrs"]["euser"])
        self._prepare(job, user)
        run = JobRun()
        progname = job.get("shell") or user.pw_shell      # qsub -S, else the login shell
        argv = list(job.get("exe_args") or [])
        out = self._hooks(job, progname, argv, self._job_env(job, user, "1"), run)
        if out is None:
            return run
        progname, hook_argv, env_str = out
        run.progname = progname
        run.argv = ["-" + os.path.basename(progname)] + list(hook_argv[1:])
        run.env = harness.parse_env(env_str)
        # execve(progname): no PATH search; a relative name is relative to the cwd.
        exe = progname if os.path.isabs(progname) else os.path.join(user.pw_dir, progname)
        spool = os.path.join(self.pbs_home, "spool", jobid)
        try:
            with open(spool + ".OU", "w+") as fo, open(spool + ".ER", "w+") as fe:
                try:
                    proc = subprocess.Popen(run.argv, executable=exe, env=run.env, cwd=user.pw_dir,
                                            stdin=subprocess.PIPE, stdout=fo, stderr=fe,
                                            **_as_user(user))
                except OSError as e:
                    run.exec_error = "execve(%s): %s" % (progname, e.strerror)
                    return run
                # The job shell reads the script's path from stdin; one that exits
                # without reading it (a wrapper, a failed exec) is no error of the mom's.
                try:
                    proc.stdin.write((job["script_path"] + "\n").encode())
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                try:
                    run.exit_status = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    run.exit_status = "timeout"
                fo.seek(0)
                fe.seek(0)
                run.stdout, run.stderr = fo.read(), fe.read()
        finally:
            for s in (".OU", ".ER"):
                if os.path.exists(spool + s):
                    os.unlink(spool + s)
        return run

    def launch_tm_task(self, jobid, argv, spawner_env=None, tasknum=2, timeout=60):
        """A task spawned through TM (tm_spawn: orted, hydra_pmi_proxy)."""
        job = self.server.jobs[jobid]
        user = pwd.getpwnam(job["attrs"]["euser"])
        self._prepare(job, user)
        run = JobRun()
        env = self._job_env(job, user, "%8.8X" % tasknum)
        env.update(spawner_env or {})
        out = self._hooks(job, argv[0], list(argv), env, run)
        if out is None:
            return run
        run.progname, run.argv, env_str = out
        run.env = harness.parse_env(env_str)
        try:
            proc = subprocess.run(run.argv, env=run.env, cwd=user.pw_dir, capture_output=True,
                                  text=True, timeout=timeout, **_as_user(user))
        except OSError as e:
            run.exec_error = "execvp(%s): %s" % (run.argv[0], e.strerror)
            return run
        run.exit_status, run.stdout, run.stderr = proc.returncode, proc.stdout, proc.stderr
        return run


def _as_user(user):
    if os.getuid() != 0 or user.pw_uid == 0:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid,
            "extra_groups": os.getgrouplist(user.pw_name, user.pw_gid)}


def _select_total(select, key):
    """select=2:ncpus=4:mpiprocs=4+1:ncpus=2 -> total of `key` over chunks."""
    if not select:
        return 0
    total = 0
    for chunk in str(select).split("+"):
        parts = chunk.split(":")
        count = int(parts[0]) if parts[0].isdigit() else 1
        vals = dict(p.split("=", 1) for p in parts if "=" in p)
        per = vals.get(key)
        if per is None and key == "mpiprocs":
            per = "1" if "ncpus" in vals else "1"
        total += count * int(per or 0)
    return total
