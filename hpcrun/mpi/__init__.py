"""MPI under hpcrun: what a rank needs to reach its launcher, and which MPI it runs.

The launch path calls four functions (docs/mpi.md):
  host_binds(environ, config)       host directories a rank needs at the same path (PMIx, Open MPI
                                    session dir, Slurm's pmix spool dir, munge); part of the node key
  env_passthrough_prefixes()        variables that survive even --cleanenv
  rank_facts(environ)               rank, size, local rank/size, node, from the launcher's own variables
  prepare(plan, image_root, config, mode)
                                    inside the keeper: find image and host MPI, check the ABI, and for
                                    host mode bind the host MPI + fabric stack under /.hpcrun/host
"""
from hpcrun import rankos as os     # os without its import cost (rankos.py)

from hpcrun import environment, errors

# Variables a rank needs to find its launcher, its peers and its fabric (one list, kept in environment.py).
PASSTHROUGH_PREFIXES = environment.WIRING_PREFIXES

# (rank, size, local_rank, local_size, node) in order of trust: the MPI launcher's own words first.
# SLURM_* last: under mpirun inside an allocation SLURM_PROCID is the daemon's index, not the rank.
_RANK_SOURCES = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_NODE_RANK"),
    ("PMIX_RANK", None, None, None, None),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", None),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", None, "SLURM_NODEID"),
    ("PBS_TASKNUM", None, None, None, None),
)


def env_passthrough_prefixes():
    return PASSTHROUGH_PREFIXES


def rank_facts(environ):
    """{"rank", "size", "local_rank", "local_size", "node"}: ints, None where unknown."""
    facts = dict.fromkeys(("rank", "size", "local_rank", "local_size", "node"))
    # Slurm's variables describe the rank only when srun itself launched it (or nothing else did)
    slurm_ok = environ.get("PMIX_NAMESPACE", "").startswith("slurm.pmix.")
    for names in _RANK_SOURCES:
        if names[0] == "SLURM_PROCID" and facts["rank"] is not None and not slurm_ok:
            continue
        for field, name in zip(("rank", "size", "local_rank", "local_size", "node"), names):
            if name and facts[field] is None:
                facts[field] = _int(environ.get(name))
    if facts["local_size"] is None and (slurm_ok or facts["rank"] == _int(environ.get("SLURM_PROCID"))):
        facts["local_size"] = _slurm_local_size(environ)
    if facts["size"] is None:
        facts["size"] = _int(environ.get("PMIX_SIZE")) or _int(environ.get("OMPI_UNIVERSE_SIZE"))
    if facts["node"] is None and environ.get("PMIX_HOSTNAME"):
        facts["node"] = environ["PMIX_HOSTNAME"]
    return facts


def _int(v):
    try:
        return int(v) if v not in (None, "") else None
    except ValueError:
        return None


def _slurm_local_size(environ):
    """SLURM_TASKS_PER_NODE looks like "2(x3),1"; this node's entry is SLURM_NODEID's."""
    spec, node = environ.get("SLURM_TASKS_PER_NODE"), _int(environ.get("SLURM_NODEID"))
    if not spec or node is None:
        return None
    counts = []
    for part in spec.split(","):
        n, _, rep = part.partition("(x")
        counts += [_int(n)] * (_int(rep.rstrip(")")) or 1 if rep else 1)
    return counts[node] if node < len(counts) else None


def launcher(environ):
    """Which launcher started this process, from its variables:
    "openmpi" (Open MPI's mpirun/orted), "pmix" (srun --mpi=pmix, prterun), "pmi" (PMI-1/2:
    MPICH hydra, srun --mpi=pmi2), "slurm" (srun without MPI plugin), "pbs", or None."""
    if "OMPI_COMM_WORLD_RANK" in environ or "OMPI_MCA_orte_hnp_uri" in environ:
        return "openmpi"
    if "PMIX_RANK" in environ or "PMIX_NAMESPACE" in environ:
        return "pmix"
    if "PMI_FD" in environ or "PMI_RANK" in environ or "PMI_PORT" in environ:
        return "pmi"
    if "SLURM_STEP_ID" in environ or "SLURM_PROCID" in environ:
        return "slurm"
    if "PBS_JOBID" in environ:
        return "pbs"
    return None


def host_binds(environ, config):
    """Host directories the launcher's variables name, bound at the same path.  Only those that
    exist; a directory inside another one on the list is left out (the outer bind carries it)."""
    uid = os.getuid()
    cands = []

    def add(path, why):
        if path and os.path.isabs(path):
            cands.append((os.path.normpath(path), why))

    add(environ.get("PMIX_SERVER_TMPDIR"), "PMIx server rendezvous (PMIX_SERVER_TMPDIR)")
    for k in sorted(environ):
        if k.startswith("PMIX_DSTORE_") and k.endswith("_BASE_PATH"):
            add(environ[k], "PMIx shared-memory data store (%s)" % k)
    systmp = environ.get("PMIX_SYSTEM_TMPDIR")
    if systmp and os.path.normpath(systmp) not in ("/", "/tmp", "/var/tmp", "/dev/shm"):
        add(systmp, "PMIx system rendezvous (PMIX_SYSTEM_TMPDIR)")
    # Open MPI (orted) session directory of this job family: contact.txt, hwloc.sm, pmix_dstor_*
    add(environ.get("OMPI_MCA_orte_jobfam_session_dir"), "Open MPI job session dir")
    loc = environ.get("OMPI_FILE_LOCATION")
    if loc and "OMPI_MCA_orte_jobfam_session_dir" not in environ:
        add(os.path.dirname(os.path.dirname(loc.rstrip("/"))), "Open MPI job session dir (OMPI_FILE_LOCATION)")
    # srun --mpi=pmix: Open MPI keeps its job session in <TmpFS>/spmix_appdir_<uid>_<job>.<step>
    job, step = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID"), environ.get("SLURM_STEP_ID")
    if job and step is not None:
        base = systmp or "/tmp"
        add(os.path.join(base, "spmix_appdir_%d_%s.%s" % (uid, job, step)), "Slurm PMIx application dir")
    if job:
        for d in config.getlist("munge_socket_dir") or ["/run/munge", "/var/run/munge"]:
            if os.path.isdir(d):
                add(os.path.realpath(d), "munge socket (srun/sbatch from inside the image)")
                break
    for extra in config.getlist("mpi_host_bind"):
        add(extra, "site MPI wiring (mpi_host_bind)")
    out, seen = [], []
    for path, why in sorted(cands, key=lambda c: len(c[0])):
        if not os.path.isdir(path) or any(path == s or path.startswith(s.rstrip("/") + "/") for s in seen):
            continue
        seen.append(path)
        out.append({"src": path, "dst": path, "ro": False, "why": why})
    return out


def prepare(plan, image_root, config, mode):
    """Check host against image and, in host mode, inject the host MPI and fabric stack."""
    if mode in (None, "", "none"):
        return
    if mode not in ("auto", "hybrid", "host"):
        raise errors.Error(errors.USAGE, "--mpi must be auto, hybrid, host or none", mode)
    from hpcrun.mpi import select
    select.prepare(plan, image_root, config, mode, os.environ)
