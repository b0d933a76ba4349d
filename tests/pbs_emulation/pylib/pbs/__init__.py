"""A faithful stand-in for OpenPBS's `pbs` hook module (pbs.v1), for tests.

Only what hooks can observe is reproduced, from the OpenPBS sources
(src/modules/python/pbs/v1/{_svr_types,_base_types,_exc_types}.py and
src/lib/Libpython/module_pbs_v1.c) as summarised in shared/reference/pbs.md:
names, constants, exception classes, accept/reject raising SystemExit, frozen
events, None for unset resources, `in` true for defined-but-unset resources,
pbs_env's "k=v,k2=v2" form with commas escaped as `\\,`.

The runner (../../runner.py) fills the event with _load() before running a
hook, and reads the outcome back with _dump().  Everything starting with an
underscore is the emulator's, not PBS's API.
"""
import os
import sys

# --- event types (each also as HOOK_EVENT_*) ---------------------------------
QUEUEJOB = 0x1
MODIFYJOB = 0x2
RESVSUB = 0x4
MOVEJOB = 0x8
RUNJOB = 0x10
PROVISION = 0x20
EXECJOB_BEGIN = 0x40
EXECJOB_PROLOGUE = 0x80
EXECJOB_EPILOGUE = 0x100
EXECJOB_END = 0x200
EXECJOB_PRETERM = 0x400
EXECJOB_LAUNCH = 0x800
EXECHOST_PERIODIC = 0x1000
EXECHOST_STARTUP = 0x2000
EXECJOB_ATTACH = 0x4000
PERIODIC = 0x8000
RESV_END = 0x10000
EXECJOB_RESIZE = 0x20000
EXECJOB_ABORT = 0x40000
EXECJOB_POSTSUSPEND = 0x80000
EXECJOB_PRERESUME = 0x100000
MANAGEMENT = 0x200000
MODIFYVNODE = 0x400000
JOBOBIT = 0x800000
RESV_BEGIN = 0x1000000
RESV_CONFIRM = 0x2000000
MODIFYRESV = 0x4000000
POSTQUEUEJOB = 0x8000000

_EVENT_NAMES = {
    "queuejob": QUEUEJOB, "modifyjob": MODIFYJOB, "resvsub": RESVSUB, "movejob": MOVEJOB,
    "runjob": RUNJOB, "provision": PROVISION, "execjob_begin": EXECJOB_BEGIN,
    "execjob_prologue": EXECJOB_PROLOGUE, "execjob_epilogue": EXECJOB_EPILOGUE,
    "execjob_end": EXECJOB_END, "execjob_preterm": EXECJOB_PRETERM,
    "execjob_launch": EXECJOB_LAUNCH, "exechost_periodic": EXECHOST_PERIODIC,
    "exechost_startup": EXECHOST_STARTUP, "execjob_attach": EXECJOB_ATTACH, "periodic": PERIODIC,
    "resv_end": RESV_END, "execjob_resize": EXECJOB_RESIZE, "execjob_abort": EXECJOB_ABORT,
    "execjob_postsuspend": EXECJOB_POSTSUSPEND, "execjob_preresume": EXECJOB_PRERESUME,
    "management": MANAGEMENT, "modifyvnode": MODIFYVNODE, "jobobit": JOBOBIT,
    "resv_begin": RESV_BEGIN, "resv_confirm": RESV_CONFIRM, "modifyresv": MODIFYRESV,
    "postqueuejob": POSTQUEUEJOB,
}
for _name, _value in list(_EVENT_NAMES.items()):
    globals()["HOOK_EVENT_" + _name.upper()] = _value

_MOM_EVENTS = (EXECJOB_BEGIN | EXECJOB_PROLOGUE | EXECJOB_EPILOGUE | EXECJOB_END | EXECJOB_PRETERM
               | EXECJOB_LAUNCH | EXECHOST_PERIODIC | EXECHOST_STARTUP | EXECJOB_ATTACH
               | EXECJOB_RESIZE | EXECJOB_ABORT | EXECJOB_POSTSUSPEND | EXECJOB_PRERESUME)

# --- log levels and event classes ---------------------------------------------
LOG_DEBUG = 5
LOG_WARNING = 6
LOG_ERROR = 7
EVENT_ERROR = 0x1
EVENT_SYSTEM = 0x2
EVENT_ADMIN = 0x4
EVENT_JOB = 0x8
EVENT_JOB_USAGE = 0x10
EVENT_SECURITY = 0x20
EVENT_SCHED = 0x40
EVENT_DEBUG = 0x80
EVENT_DEBUG2 = 0x100
EVENT_RESV = 0x200
EVENT_DEBUG3 = 0x400
EVENT_DEBUG4 = 0x800
EVENT_FORCE = 0x8000

REJECT_MSG_MAX = 3171


# --- exceptions (pbs/v1/_exc_types.py) ----------------------------------------
class EventIncompatibleError(AttributeError):
    pass


class UnsetAttributeNameError(Exception):
    pass


class BadAttributeValueTypeError(Exception):
    pass


class BadAttributeValueError(Exception):
    pass


class UnsetResourceNameError(Exception):
    pass


class BadResourceValueTypeError(Exception):
    pass


class BadResourceValueError(Exception):
    pass


# --- emulator state ------------------------------------------------------------
class _State:
    event = None
    frozen = False
    accepted = False
    rejected = False
    reject_msg = ""
    log = []          # [level, message]
    joblog = []       # [jobid, message]
    server_hook = True
    resources = set()  # names defined on the server (lower case)
    nodename = "localhost"


_state = _State()

hook_config_filename = os.environ.get("PBS_HOOK_CONFIG_FILE")
pbs_conf = {"PBS_HOME": "/var/spool/pbs", "PBS_EXEC": "/opt/pbs", "PBS_SERVER": "localhost"}


def _check_mutable():
    if _state.frozen:
        # An explicit raise, not an assert: it survives -OO, as in PBS.
        raise AssertionError("Not permitted to modify attributes ... an event.accept() or "
                             "event.reject() already called.")


# --- environment lists (pbs_env) -----------------------------------------------
_ENV_READONLY = frozenset((
    "PBS_ENVIRONMENT", "PBS_JOBDIR", "PBS_JOBID", "PBS_JOBNAME", "PBS_NODEFILE", "TMPDIR",
    "PBS_O_HOME", "PBS_O_HOST", "PBS_O_LANG", "PBS_O_LOGNAME", "PBS_O_MAIL", "PBS_O_PATH",
    "PBS_O_QUEUE", "PBS_O_SHELL", "PBS_O_SYSTEM", "PBS_O_TZ", "PBS_O_WORKDIR", "PBS_QUEUE"))


def _split_env(text):
    """"k=v,k2=v2" with "\\," inside values -> [(k, v)]."""
    items, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] == ",":
            cur.append(",")
            i += 2
            continue
        if c == ",":
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    out = []
    for item in items:
        if not item:
            continue
        k, sep, v = item.partition("=")
        out.append((k, v if sep else ""))
    return out


class pbs_env(dict):
    """A dict built from "k=v,..." whose str() joins back with commas."""

    def __init__(self, value=None, generic=False):
        super().__init__()
        self._generic = generic
        if isinstance(value, str):
            for k, v in _split_env(value):
                dict.__setitem__(self, k, v)
        elif value:
            for k, v in dict(value).items():
                dict.__setitem__(self, k, v)

    def __setitem__(self, name, value):
        _check_mutable()
        if not self._generic and name in _ENV_READONLY:
            raise BadAttributeValueError("env variable '%s' is readonly" % name)
        dict.__setitem__(self, name, str(value))

    def __delitem__(self, name):
        _check_mutable()
        dict.__delitem__(self, name)

    def __str__(self):
        return ",".join("%s=%s" % (k, str(v).replace(",", "\\,")) for k, v in self.items())


# --- resource lists (pbs_resource) --------------------------------------------
class pbs_resource:
    """Resource_List: r["name"] is the value or None when defined but unset;
    `"name" in r` is True for any defined resource; names are case-insensitive."""

    def __init__(self, values=None):
        object.__setattr__(self, "_values", {})
        for k, v in (values or {}).items():
            self._values[k.lower()] = v

    def _defined(self, name):
        return name.lower() in _state.resources or name.lower() in self._values

    def __getitem__(self, name):
        # Undefined names raise (an emulator choice; real PBS errors out too).
        if not self._defined(name):
            raise UnsetResourceNameError("resource '%s' not found" % name)
        return self._values.get(name.lower())

    def __setitem__(self, name, value):
        _check_mutable()
        if not self._defined(name) and _state.server_hook:
            raise UnsetResourceNameError("resource '%s' not found" % name)
        if value is None:
            self._values.pop(name.lower(), None)
        else:
            self._values[name.lower()] = value

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self[name]

    def __setattr__(self, name, value):
        self[name] = value

    def __contains__(self, name):
        return self._defined(name)

    def keys(self):
        return [k for k, v in self._values.items() if v is not None]

    def __str__(self):
        return ",".join("%s=%s" % (k, v) for k, v in self._values.items() if v is not None)


# --- job ------------------------------------------------------------------------
_JOB_ATTRS = frozenset((
    "Resource_List", "Variable_List", "euser", "egroup", "Job_Owner", "Job_Name", "queue",
    "job_state", "interactive", "Shell_Path_List", "exec_host", "exec_vnode", "executable",
    "argument_list", "Submit_arguments", "comment", "Hold_Types", "Priority", "Account_Name",
    "Output_Path", "Error_Path", "Join_Path", "Mail_Points", "Mail_Users", "run_count",
    "Rerunable", "project", "group_list", "User_List", "tolerate_node_failures"))


class _job:
    def __init__(self, jid, attrs, msmom=True):
        d = object.__getattribute__(self, "__dict__")
        d["id"] = jid
        d["_msmom"] = msmom
        d["_rerun"] = False
        d["_delete"] = False
        d["_attrs"] = {}
        for k, v in attrs.items():
            if k == "Resource_List":
                v = pbs_resource(v)
            elif k == "Variable_List":
                v = pbs_env(v)
            d["_attrs"][k] = v

    def __getattr__(self, name):
        attrs = self.__dict__["_attrs"]
        if name in attrs:
            return attrs[name]
        if name in _JOB_ATTRS:
            return None          # a known attribute that is unset
        raise AttributeError(name)

    def __setattr__(self, name, value):
        _check_mutable()
        if name == "Variable_List":
            raise BadAttributeValueError("attribute 'Variable_List' cannot be directly set.")
        if name not in _JOB_ATTRS:
            raise UnsetAttributeNameError("job attribute '%s' not found" % name)
        self.__dict__["_attrs"][name] = value

    def __str__(self):
        return str(self.id)

    def in_ms_mom(self):
        return self._msmom

    def rerun(self):
        if not _state.event.type & _MOM_EVENTS:
            raise NotImplementedError("rerun(): only for mom hooks")
        self.__dict__["_rerun"] = True

    def delete(self):
        if not _state.event.type & _MOM_EVENTS:
            raise NotImplementedError("delete(): only for mom hooks")
        self.__dict__["_delete"] = True

    def is_checkpointed(self):
        return False

    def stdout_file(self):
        return None

    def stderr_file(self):
        return None

    def release_nodes(self, node_list=None, keep_select=None):
        return None


# --- event ----------------------------------------------------------------------
_WRITABLE_PARAMS = ("progname", "argv", "env")


class _event:
    def __init__(self, etype, hook_name, requestor, requestor_host, params):
        d = object.__getattribute__(self, "__dict__")
        d["type"] = etype
        d["hook_name"] = hook_name
        d["hook_type"] = "site"
        d["requestor"] = requestor
        d["requestor_host"] = requestor_host
        d["freq"] = None
        d["_param"] = params

    def __getattr__(self, name):
        params = self.__dict__["_param"]
        if name in params:
            return params[name]
        raise EventIncompatibleError

    def __setattr__(self, name, value):
        _check_mutable()
        params = self.__dict__["_param"]
        if name in params:
            if name not in _WRITABLE_PARAMS:
                raise BadAttributeValueError("event attribute '%s' is readonly" % name)
            params[name] = value   # even a plain dict for env: PBS str()s it later
            return
        raise UnsetAttributeNameError("event attribute '%s' not found" % name)

    def accept(self, ecode=0):
        _state.accepted = True
        _state.frozen = True
        raise SystemExit(str(ecode))

    def reject(self, emsg="", ecode=255):
        _state.rejected = True
        _state.reject_msg = str(emsg)[:REJECT_MSG_MAX]
        _state.frozen = True
        raise SystemExit(str(ecode))


# --- module functions -------------------------------------------------------------
def event():
    return _state.event


def logmsg(loglevel, message):
    _state.log.append([loglevel, str(message)])


def logjobmsg(jobid, message):
    _state.joblog.append([str(jobid), str(message)])


def get_local_nodename():
    return _state.nodename


class _server:
    name = "localhost"

    def __str__(self):
        return self.name


def server():
    return _server()


def reboot(cmd=None):
    raise NotImplementedError("reboot(): not available in the emulation")


# --- emulator glue (not PBS API) ----------------------------------------------------
def _load(desc):
    """Build pbs.event() from the runner's JSON description."""
    etype = _EVENT_NAMES[desc["type"]]
    _state.server_hook = not (etype & _MOM_EVENTS)
    _state.resources = set(r.lower() for r in desc.get("resourcedef", []))
    _state.nodename = desc.get("nodename", "localhost")
    pbs_conf.update(desc.get("pbs_conf", {}))
    params = {}
    for key in ("job", "job_o"):
        if key in desc:
            j = desc[key]
            attrs = dict(j.get("attrs", {}))
            params[key] = _job(j.get("id", ""), attrs, j.get("msmom", True))
    if "vnode_list" in desc:
        params["vnode_list"] = dict(desc["vnode_list"])
    if etype == EXECJOB_LAUNCH:
        params["vnode_list_fail"] = {}
        params["progname"] = desc["progname"]
        params["argv"] = list(desc["argv"])
        params["env"] = pbs_env(desc["env"], generic=True)
    _state.event = _event(etype, desc.get("hook_name", "hook"), desc.get("requestor", "root"),
                          desc.get("requestor_host", "localhost"), params)
    return _state.event


def _dump():
    """The outcome as PBS's daemons would read it back."""
    e = _state.event
    p = e.__dict__["_param"]
    out = {"accepted": _state.accepted, "rejected": _state.rejected,
           "reject_msg": _state.reject_msg, "log": _state.log, "joblog": _state.joblog}
    if "job" in p:
        j = p["job"]
        out["job"] = {k: (dict((n, v) for n, v in a._values.items() if v is not None)
                          if isinstance(a, pbs_resource) else str(a))
                      for k, a in j.__dict__["_attrs"].items()}
        out["rerun"] = j._rerun
        out["delete"] = j._delete
    if e.type == EXECJOB_LAUNCH:
        out["progname"] = p["progname"]
        out["argv"] = [str(a) for a in p["argv"]]
        out["env"] = str(p["env"])      # what the mom serialises, dict or not
    return out


# Real PBS has no pbs.get_hook_config_file() despite the man page: leave it out.
sys.modules.setdefault("pbs.v1", sys.modules[__name__])
