"""The environment contract: what crosses from the host into the container.

Order (later wins):
  1. the host environment, minus DENY (variables that would make the image's
     programs load host code: LD_PRELOAD, LD_LIBRARY_PATH, PYTHONPATH, ...);
     with --cleanenv only KEEP_CLEAN and the launcher wiring (PMI, PMIx, Open MPI,
     Slurm, PBS ...) survive, because a rank without them cannot find its peers.
  2. PATH reset to the image's default, PYTHONNOUSERSITE=1 (the host's
     ~/.local is visible through $HOME and would shadow the image's modules).
  3. the image's /.hpcrun/env
  4. /.hpcrun/launch.env, written by the node's keeper (host MPI / GPU library paths)
  5. SINGULARITYENV_<NAME>, then APPTAINERENV_<NAME> (Apptainer's forms),
     HPCRUN_ENV_<NAME> variables, --env-file files, --env options.
Steps 1, 2 and 5 are computed on the host (and shown by --dry-run); 3 and 4
are read inside the container, just before exec.  An Apptainer image's
%environment (/.singularity.d/env/*.sh) is sourced by the container's own
/bin/sh between 4 and 5 (launch.apptainer_argv), never by hpcrun.
"""
DENY = frozenset(("LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "LD_DEBUG", "PYTHONPATH", "PYTHONHOME",
                   "PYTHONUSERBASE", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "PERL5LIB", "PERLLIB", "RUBYLIB",
                   "LUA_PATH", "LUA_CPATH", "R_LIBS", "R_LIBS_USER", "CLASSPATH", "BASH_ENV", "ENV",
                   "MODULEPATH", "LOADEDMODULES", "_LMFILES_", "MODULESHOME", "LMOD_CMD", "PKG_CONFIG_PATH",
                   "CPATH", "LIBRARY_PATH", "MANPATH", "INFOPATH", "CONDA_PREFIX", "VIRTUAL_ENV"))
DENY_PREFIXES = ("BASH_FUNC_", "__LMOD", "_ModuleTable", "HPCRUN_ENV_", "HPCRUN_TASK_", "APPTAINERENV_",
                 "SINGULARITYENV_")
# Settings for the inside, in increasing precedence: not passed on as themselves.
USER_PREFIXES = ("SINGULARITYENV_", "APPTAINERENV_", "HPCRUN_ENV_")
KEEP_CLEAN = ("HOME", "USER", "LOGNAME", "TERM", "LANG", "TZ", "DISPLAY", "SHELL", "HOSTNAME",
              "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
# Launcher, fabric, GPU and threading wiring: survives --cleanenv (and is
# hpcrun.mpi's passthrough list; docs/mpi.md).  Prefixes, matched with startswith.
WIRING_PREFIXES = (
    "PMI_", "PMIX_", "OMPI_", "ORTE_", "OPAL_", "PRTE_", "SLURM_", "SLURMD_", "SRUN_", "PBS_", "MPI",
    "I_MPI_", "HYDRA_", "MV2_", "MPICH_", "UCX_", "FI_", "PSM2_", "PSM3_", "HFI_", "IPATH_", "NCCL_",
    "CUDA_", "NVIDIA_", "HIP_", "ROCR_", "GPU_DEVICE_ORDINAL", "OMP_", "KMP_", "HWLOC_", "CRAY_", "LC_",
)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def host_part(environ, cleanenv, extra_env, env_files):
    """Steps 1, 2 and 5: returns (env dict, dropped names, user settings list)."""
    env, dropped = {}, []
    items = list(environ.items())        # once: os.environ decodes every name and value it hands out
    for k, v in items:
        if k in DENY or k.startswith(DENY_PREFIXES):
            if not k.startswith(USER_PREFIXES + ("HPCRUN_TASK_",)):
                dropped.append(k)
            continue
        if cleanenv and not (k in KEEP_CLEAN or k.startswith(WIRING_PREFIXES)):
            dropped.append(k)
            continue
        if k == "PATH":
            dropped.append(k)
            continue
        env[k] = v
    env["PATH"] = DEFAULT_PATH
    env["PYTHONNOUSERSITE"] = "1"
    user = []
    settings = [(k, v) for k, v in items if k.startswith(USER_PREFIXES)]
    for prefix in USER_PREFIXES:
        for k, v in settings:
            if k.startswith(prefix) and len(k) > len(prefix):
                name = k[len(prefix):]
                # Apptainer's APPTAINERENV_PREPEND_PATH / _APPEND_PATH extend PATH
                if name in ("PREPEND_PATH", "APPEND_PATH") and prefix != "HPCRUN_ENV_":
                    name, v = "PATH", (v + ":${PATH}") if name == "PREPEND_PATH" else ("${PATH}:" + v)
                user.append((name, v))
    for path in env_files:
        user.extend(read_env_file(path))
    user.extend(extra_env)
    return env, sorted(dropped), user


def read_env_file(path):
    """NAME=VALUE lines, '#' comments, optional 'export ' and quotes."""
    from hpcrun import errors
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise errors.Error(errors.NOINPUT, "env file not readable: %s" % e.strerror, path)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        name, sep, value = line.partition("=")
        if not sep or not valid_name(name):
            raise errors.Error(errors.USAGE, "bad line %d in env file: expected NAME=VALUE" % n, path)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out.append((name, value))
    return out


def valid_name(name):
    return bool(name) and (name[0].isalpha() or name[0] == "_") and all(c.isalnum() or c == "_" for c in name)


VALUE_MAX = 128 << 10      # MAX_ARG_STRLEN: execve(2) passes no longer environment string (E2BIG)


def expand(value, env, limit=None):
    """$NAME, ${NAME} and ${NAME:-default} against env (unset expands to ''), like a shell would.
    limit: ValueError once substitutions add more than that many characters
    (A=$B$B$B... over a few lines doubles without end)."""
    if "$" not in value:
        return value
    added = 0
    out, i, n = [], 0, len(value)
    while i < n:
        c = value[i]
        if c != "$" or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        if value[i + 1] == "{":
            j = value.find("}", i + 2)
            if j < 0:
                out.append(value[i:])
                break
            name, sep, default = value[i + 2:j].partition(":-")
            out.append(env.get(name, "") or (expand(default, env, limit) if sep else ""))
            added += len(out[-1])
            if limit is not None and added > limit:
                raise ValueError(limit)
            i = j + 1
            continue
        j = i + 1
        while j < n and (value[j].isalnum() or value[j] == "_"):
            j += 1
        if j == i + 1:
            out.append(c)
            i += 1
            continue
        out.append(env.get(value[i + 1:j], ""))
        added += len(out[-1])
        if limit is not None and added > limit:
            raise ValueError(limit)
        i = j
    return "".join(out)


def apply_file(env, path):
    """Apply a NAME=VALUE file from inside the container (steps 3 and 4), if
    present: a regular file only (the image's FIFO must not stop the rank),
    read as bytes and decoded as UTF-8 (no codec lookup, no import, inside)."""
    from hpcrun import fdio
    data = fdio.read_regular(path)
    if data is None:
        return
    text = data.decode("utf-8", "replace")
    # lines end at \n only: str.splitlines() would also split a value at \x85, \u2028, \x0c ...
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        name, sep, value = line.partition("=")
        if sep and valid_name(name):
            # 'VALUE' is literal, as in a shell (an image config's Env: docs/design.md);
            # "VALUE" and a bare VALUE expand $NAME.
            if len(value) >= 2 and value[0] == value[-1] == "'":
                value = value[1:-1]
            else:
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                try:
                    value = expand(value, env, VALUE_MAX)
                except ValueError:
                    value = None
            if value is None or len(value) > VALUE_MAX:
                # the image's own file: 127 "Argument list too long" at the exec would blame the command
                from hpcrun import errors
                raise errors.Error(errors.DATA, "%s: %s is longer than a program's environment takes "
                                   "(128 KiB)" % (path, name))
            env[name] = value
    if env.get("LD_LIBRARY_PATH", None) == "":
        del env["LD_LIBRARY_PATH"]


def final(plan, new_env=dict):
    """Inside the container, just before exec: the complete environment.
    (new_env: ticket.py's, to see which variables the image's files read)"""
    env = new_env(plan["env"]["base"])
    apply_file(env, "/.hpcrun/env")
    apply_file(env, "/.hpcrun/launch.env")
    plan["env"]["path_before_user"] = env.get("PATH", "")     # launch.apptainer_argv rebases on it
    for k, v in plan["env"]["user"]:
        env[k] = expand(v, env)
    if "LD_LIBRARY_PATH" in env:
        env["LD_LIBRARY_PATH"] = env["LD_LIBRARY_PATH"].strip(":")
    return env
