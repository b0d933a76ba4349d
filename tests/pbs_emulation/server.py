"""The emulated pbs_server side: qmgr, qsub and qalter.

qmgr understands the commands an admin runs to install hooks (create
resource, create/set/import hook).  qsub follows PBS's rules for directives:
prefix from -C, else $PBS_DPREFIX, else "#PBS" (-C "" turns them off); leading
whitespace skipped, then a prefix match; read only until the first executable
line (blank lines, lines whose first non-space character is "#", and lines
starting with ":" or "#!" in column 0 are not executable); a trailing "\\"
continues a directive; CRLF scripts are refused; getopt with PBS's option
string and no long options; -l merges per resource with the command line
winning; any -v on the command line drops every `#PBS -v` of the script.
Submission then runs the queuejob hooks, qalter the modifyjob hooks.
"""
import getopt
import os
import pwd
import grp
import shlex
import socket
import tempfile

from . import harness

OPTSTRING = "a:A:c:C:e:fhIj:J:k:l:m:M:N:o:p:q:r:R:S:u:v:VW:XzP:"


class QsubError(Exception):
    def __init__(self, message, rc=1):
        super().__init__(message)
        self.message = message
        self.rc = rc


class Result:
    def __init__(self, rc, out="", err="", jobid=None, hook_results=()):
        self.rc, self.out, self.err, self.jobid = rc, out, err, jobid
        self.hook_results = list(hook_results)

    def __repr__(self):
        return "Result(rc=%r, out=%r, err=%r)" % (self.rc, self.out, self.err)


class Server:
    def __init__(self, name="pbs-emu"):
        self.name = name
        self.resources = {r: "builtin" for r in harness.BUILTIN_RESOURCES}
        self.hooks = {}
        self.jobs = {}
        self.seq = 0

    # --- qmgr -------------------------------------------------------------------
    def qmgr(self, command, cwd=None):
        """One `qmgr -c COMMAND`; returns (rc, message)."""
        words = shlex.split(command)
        if len(words) < 3:
            return 1, "qmgr: Syntax error"
        verb, obj, name, rest = words[0], words[1], words[2], words[3:]
        if verb == "create" and obj == "resource":
            attrs = _attrs(rest)
            self.resources[name.lower()] = attrs.get("type", "long")
            return 0, ""
        if verb == "create" and obj == "hook":
            if name in self.hooks:
                return 1, "qmgr obj=%s svr=default: hook name already exists" % name
            self.hooks[name] = {"event": [], "order": 1, "alarm": 30, "enabled": True,
                                "script": None, "config": None}
            return 0, ""
        if obj != "hook" or name not in self.hooks:
            return 1, "qmgr: unknown object %s %s" % (obj, name)
        hook = self.hooks[name]
        if verb == "set":
            for k, v in _attrs(rest).items():
                if k == "event":
                    hook["event"] = [x.strip() for x in v.split(",") if x.strip()]
                elif k in ("order", "alarm"):
                    hook[k] = int(v)
                elif k == "enabled":
                    hook[k] = v.lower() in ("true", "t", "1", "y")
                else:
                    hook[k] = v
            return 0, ""
        if verb == "import" and len(rest) == 3:
            content_type, _encoding, path = rest
            path = os.path.join(cwd or os.getcwd(), path)
            with open(path) as f:
                content = f.read()
            if content_type == "application/x-python":
                hook["script"] = content
            elif content_type == "application/x-config":
                hook["config"] = content       # stored as <hook>.CF, suffix forgotten
            else:
                return 1, "qmgr: bad content type %s" % content_type
            return 0, ""
        return 1, "qmgr: Syntax error"

    def run_hooks(self, event_type, **kw):
        """All enabled hooks for the event, in order; stops at the first reject.
        Each hook's event starts from the previous one's result (the caller
        passes `chain` to carry progname/argv/env and the job)."""
        results = []
        for name, hook in sorted(self.hooks.items(), key=lambda kv: kv[1]["order"]):
            if event_type not in hook["event"] or not hook["enabled"] or hook["script"] is None:
                continue
            with tempfile.NamedTemporaryFile("w", suffix=".py", prefix=name + "-", delete=False) as f:
                f.write(hook["script"])
            os.chmod(f.name, 0o644)
            try:
                config = hook["config"] if hook["config"] is not None else None
                r = harness.run_hook(event_type, hook=f.name, config=config, hook_name=name,
                                     alarm=hook["alarm"], resources=self.custom_resources(), **kw)
            finally:
                os.unlink(f.name)
            results.append(r)
            if r.rejected:
                break
            kw = _chain(kw, r)
        return results

    def custom_resources(self):
        return [r for r, t in self.resources.items() if t != "builtin"]

    # --- qsub -------------------------------------------------------------------
    def qsub(self, script, args=(), user=None, cwd=None, env=None):
        """Submit `script` (text) with qsub's command-line `args` as `user`
        (a pwd entry; default: the caller) from `cwd`, with `env` the
        submitter's environment.  Returns Result(rc, out=jobid, err)."""
        user = user or pwd.getpwuid(os.getuid())
        env = dict(env if env is not None else {"PATH": "/usr/bin:/bin", "HOME": user.pw_dir})
        cwd = cwd or user.pw_dir
        try:
            req = parse_submission(script, list(args), env)
            resources = {}
            for k, v in req["resources"].items():
                if k.lower() not in self.resources:
                    raise QsubError("qsub: Unknown resource Resource_List.%s" % k)
                resources[k.lower()] = v
        except QsubError as e:
            return Result(e.rc, err=e.message + "\n")
        host = socket.gethostname()
        variables = {"PBS_O_HOME": user.pw_dir, "PBS_O_LOGNAME": user.pw_name,
                     "PBS_O_PATH": env.get("PATH", ""), "PBS_O_MAIL": "/var/mail/" + user.pw_name,
                     "PBS_O_SHELL": env.get("SHELL", user.pw_shell), "PBS_O_WORKDIR": cwd,
                     "PBS_O_HOST": host, "PBS_O_SYSTEM": os.uname().sysname}
        if "LANG" in env:
            variables["PBS_O_LANG"] = env["LANG"]
        if req["export_all"]:
            variables.update({k: v for k, v in env.items() if k not in variables})
        for k, v in req["variables"]:
            variables[k] = v if v is not None else env.get(k, "")
        name = req["options"].get("-N") or "STDIN"
        job = {"id": "", "attrs": {"Resource_List": resources,
                                   "Variable_List": harness._env_str(variables),
                                   "Job_Name": name}}
        results = self.run_hooks("queuejob", job=job, requestor=user.pw_name, requestor_host=host)
        for r in results:
            if r.rejected:
                return Result(1, err=r.user_message + "\n", hook_results=results)
        final = results[-1].job if results else {"Resource_List": resources,
                                                  "Variable_List": job["attrs"]["Variable_List"]}
        self.seq += 1
        jobid = "%d.%s" % (self.seq, self.name)
        group = grp.getgrgid(user.pw_gid).gr_name
        self.jobs[jobid] = {
            "id": jobid, "script": script, "queue": req["options"].get("-q") or "workq",
            "attrs": {"Resource_List": dict(final["Resource_List"]),
                      "Variable_List": final["Variable_List"], "Job_Name": name,
                      "Job_Owner": "%s@%s" % (user.pw_name, host), "euser": user.pw_name,
                      "egroup": group, "queue": req["options"].get("-q") or "workq"},
            "shell": req["options"].get("-S"),
            "exe_args": req["exe_args"],
        }
        return Result(0, out=jobid + "\n", jobid=jobid, hook_results=results)

    def qalter(self, jobid, args, user=None):
        user = user or pwd.getpwuid(os.getuid())
        try:
            opts, rest = getopt.getopt(list(args), OPTSTRING)
        except getopt.GetoptError as e:
            return Result(2, err="qalter: %s\n" % e)
        changes = {}
        for o, v in opts:
            if o == "-l":
                for k, val in _resource_list(v):
                    if k.lower() not in self.resources:
                        return Result(1, err="qalter: Unknown resource Resource_List.%s\n" % k)
                    changes[k.lower()] = val
        job = self.jobs[jobid]
        results = self.run_hooks("modifyjob", job={"id": jobid, "attrs": {"Resource_List": changes}},
                                 job_o={"id": jobid, "attrs": job["attrs"]},
                                 requestor=user.pw_name, requestor_host=socket.gethostname())
        for r in results:
            if r.rejected:
                return Result(1, err=r.user_message + "\n", hook_results=results)
        if results:
            changes = results[-1].job["Resource_List"]
        job["attrs"]["Resource_List"].update(changes)
        return Result(0, hook_results=results)


def _chain(kw, r):
    kw = dict(kw)
    if r.job is not None and "job" in kw:
        attrs = dict(kw["job"]["attrs"])
        for k, v in r.job.items():
            attrs[k] = v
        kw["job"] = dict(kw["job"], attrs=attrs)
    if r.progname is not None:
        kw["progname"], kw["argv"], kw["env"] = r.progname, r.argv, r.env_str
    return kw


def _attrs(words):
    """qmgr `a=b, c="d,e"` (already shlex-split) -> dict."""
    text = " ".join(words)
    out, cur, quote = {}, "", False
    parts = []
    for c in text:
        if c == '"':
            quote = not quote
        elif c == "," and not quote and "=" in cur and not cur.rstrip().endswith("="):
            # a comma ends an attribute only when the next one follows (a=b, c=d)
            parts.append(cur)
            cur = ""
            continue
        cur += c
    parts.append(cur)
    merged = []
    for p in parts:
        if "=" in p or not merged:
            merged.append(p)
        else:
            merged[-1] += "," + p
    for p in merged:
        k, _, v = p.strip().partition("=")
        out[k.strip()] = v.strip().strip('"')
    return out


def _resource_list(value):
    """"a=b,c=d" -> [(a, b), (c, d)] (select values keep their colons)."""
    out = []
    for item in value.split(","):
        if not item:
            continue
        k, sep, v = item.partition("=")
        out.append((k.strip(), v if sep else ""))
    return out


def _variable_list(value):
    out = []
    for item in value.split(","):
        if not item:
            continue
        k, sep, v = item.partition("=")
        out.append((k, v if sep else None))
    return out


def _is_executable_line(line):
    if line.startswith(":") or line.startswith("#!"):
        return False
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def directives(script, prefix):
    """The option words of every directive before the first executable line."""
    if "\r\n" in script:
        raise QsubError("qsub: script contains cr, lf")
    lines = script.split("\n")
    found = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        body = line.lstrip()
        if prefix and body.startswith(prefix):
            text = body[len(prefix):]
            while text.rstrip().endswith("\\") and i < len(lines):
                text = text.rstrip()[:-1] + lines[i].strip()
                i += 1
            found.append(text.strip())
            continue
        if _is_executable_line(line):
            break
    return found


def parse_submission(script, args, env):
    try:
        cmd_opts, rest = getopt.getopt(args, OPTSTRING)
    except getopt.GetoptError as e:
        raise QsubError("qsub: %s\nusage: qsub [-a date_time] ... [script | -- command [arg1 ...]]"
                        % e, rc=2)
    exe_args = rest if args and "--" in args else []
    prefix = None
    for o, v in cmd_opts:
        if o == "-C":
            prefix = v
    if prefix is None:
        prefix = env.get("PBS_DPREFIX", "#PBS")
    script_opts = []
    if prefix != "":
        for text in directives(script, prefix):
            try:
                words = shlex.split(text)
                opts, extra = getopt.getopt(words, OPTSTRING)
            except (ValueError, getopt.GetoptError):
                raise QsubError("qsub: directive error: %s" % text)
            if extra:
                raise QsubError("qsub: directive error: %s" % text)
            script_opts.extend(opts)
    cmd_keys = {o for o, _ in cmd_opts}
    options, resources, variables = {}, {}, []
    export_all = False
    # Script first, then the command line on top: it wins per option / per resource.
    for source, opts in (("script", script_opts), ("cmd", cmd_opts)):
        for o, v in opts:
            if o == "-l":
                for k, val in _resource_list(v):
                    resources[k] = val
            elif o == "-v":
                if source == "script" and "-v" in cmd_keys:
                    continue     # all-or-nothing: the command line's -v replaces them all
                variables.extend(_variable_list(v))
            elif o == "-V":
                export_all = True
            elif source == "cmd" or o not in cmd_keys:
                options[o] = v
    return {"options": options, "resources": resources, "variables": variables,
            "export_all": export_all, "exe_args": exe_args}
