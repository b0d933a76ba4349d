"""hpcrun.mpi against real files: the host's Open MPI, real mpirun environments, and images
whose MPI is built here (a fake MPICH: libmpi.so.12 compiled with gcc)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import imagetools
from hpcrun import config, errors, mpi
from hpcrun.mpi import inject, select

MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]
HOST_LIBMPI = "/lib/x86_64-linux-gnu/libmpi.so.40"


def cfg(**values):
    return config.Config({k: [v] for k, v in values.items()}, [])


def gcc(*args):
    subprocess.run(["gcc"] + list(args), check=True, capture_output=True)


def build_fake_mpich(d):
    """libmpi.so.12 that says it is MPICH 4.0.2, and a program linked against it."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "mpi.c"), "w") as f:
        f.write('const char mpich_version[] = "MPICH Version:\\t4.0.2\\nMPICH Release date: x";\n'
                'int MPI_Init(int *c, char ***v) { return 0; }\nint MPI_Finalize(void) { return 0; }\n')
    with open(os.path.join(d, "hello.c"), "w") as f:
        f.write('#include <stdio.h>\nint MPI_Init(int*, char***); int MPI_Finalize(void);\n'
                'int main(int c, char **v) { MPI_Init(&c, &v); puts("fake mpich hello"); '
                'return MPI_Finalize(); }\n')
    gcc("-shared", "-fPIC", "-o", os.path.join(d, "libmpi.so.12"), "-Wl,-soname,libmpi.so.12",
        os.path.join(d, "mpi.c"))
    gcc("-o", os.path.join(d, "hello"), os.path.join(d, "hello.c"), "-L" + d, "-l:libmpi.so.12")
    return d


def glibc_root(root):
    imagetools.make_busybox_root(root)
    imagetools.add_host_program(root, "/bin/true")
    return root


@pytest.fixture(scope="module")
def mpich_root(shared_dir):
    """An image root with glibc, the fake MPICH in /usr/lib/x86_64-linux-gnu and /app/hello."""
    root = glibc_root(os.path.join(shared_dir, "mpi-unit-mpich-root"))
    build = build_fake_mpich(os.path.join(shared_dir, "mpi-unit-fake-mpich"))
    os.makedirs(os.path.join(root, "app"), exist_ok=True)
    shutil.copy2(os.path.join(build, "libmpi.so.12"), os.path.join(root, "usr/lib/x86_64-linux-gnu/"))
    shutil.copy2(os.path.join(build, "hello"), os.path.join(root, "app/hello"))
    return root


@pytest.fixture(scope="module")
def ompi_root(shared_dir):
    """An image root with the host's Open MPI copied in (what a Debian 12 image would hold)."""
    root = glibc_root(os.path.join(shared_dir, "mpi-unit-ompi-root"))
    os.makedirs(os.path.join(root, "app"), exist_ok=True)
    src = os.path.join(shared_dir, "mpi-unit-hello.c")
    with open(src, "w") as f:
        f.write('#include <mpi.h>\nint main(int c, char **v) { MPI_Init(&c, &v); MPI_Finalize(); }\n')
    subprocess.run(["mpicc", "-o", os.path.join(root, "app/hello"), src], check=True)
    imagetools.add_host_program(root, os.path.join(root, "app/hello"))
    return root


def mpirun_env(tmp_path, np=2):
    """The environment real mpirun ranks see, and what host_binds makes of it while they live.
    Each rank writes its own file: mpirun interleaves long stdout lines."""
    script = ("import json, os, sys; sys.path.insert(0, %r)\n"
              "from hpcrun import config, mpi\n"
              "out = {'env': dict(os.environ), 'binds': mpi.host_binds(os.environ, config.Config({}, [])),"
              " 'facts': mpi.rank_facts(os.environ)}\n"
              "with open('rank-%%s.json' %% os.environ['OMPI_COMM_WORLD_RANK'], 'w') as f: json.dump(out, f)\n"
              % os.path.dirname(os.path.dirname(mpi.__file__)))
    subprocess.run(MPIRUN + ["-np", str(np), sys.executable, "-c", script], capture_output=True,
                   text=True, timeout=120, check=True, cwd=str(tmp_path))
    ranks = []
    for n in range(np):
        with open(os.path.join(str(tmp_path), "rank-%d.json" % n)) as f:
            ranks.append(json.load(f))
    return ranks


def test_rank_facts_and_binds_under_real_mpirun(tmp_path):
    ranks = mpirun_env(tmp_path, 3)
    assert sorted(r["facts"]["rank"] for r in ranks) == [0, 1, 2]
    for r in ranks:
        assert r["facts"]["size"] == 3 and r["facts"]["local_size"] == 3
        assert r["facts"]["local_rank"] == r["facts"]["rank"]
        assert mpi.launcher(r["env"]) == "openmpi"
        srcs = [b["src"] for b in r["binds"]]
        # the job session dir holds the PMIx dstore: one bind, at the same path, nothing nested
        assert srcs == [r["env"]["OMPI_MCA_orte_jobfam_session_dir"]]
        assert all(b["src"] == b["dst"] and not b["ro"] for b in r["binds"])
        assert r["env"]["PMIX_DSTORE_21_BASE_PATH"].startswith(srcs[0] + "/")
        # every launcher variable is on the pass-through list
        wiring = [k for k in r["env"] if k.startswith(("OMPI_", "PMIX_"))]
        assert wiring and all(k.startswith(mpi.env_passthrough_prefixes()) for k in wiring)


def test_rank_facts_sources():
    # mpirun inside a Slurm allocation: SLURM_PROCID is the daemon's index, not the rank
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_NODE_RANK": "1", "SLURM_PROCID": "1",
           "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "PMIX_RANK": "5"}
    assert mpi.rank_facts(env) == {"rank": 5, "size": 8, "local_rank": 1, "local_size": 4, "node": 1}
    # srun --mpi=pmix: PMIx rank, the rest from Slurm
    env = {"PMIX_RANK": "3", "PMIX_NAMESPACE": "slurm.pmix.12.0", "SLURM_PROCID": "3", "SLURM_NTASKS": "6",
           "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "3(x2)"}
    assert mpi.rank_facts(env) == {"rank": 3, "size": 6, "local_rank": 0, "local_size": 3, "node": 1}
    # hydra / srun --mpi=pmi2
    env = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2", "PMI_FD": "7"}
    assert mpi.rank_facts(env)["rank"] == 2 and mpi.launcher(env) == "pmi"
    assert mpi.rank_facts({}) == dict.fromkeys(("rank", "size", "local_rank", "local_size", "node"))


def test_host_binds_slurm_pmix_layout(tmp_path, monkeypatch):
    spool = tmp_path / "spool" / "pmix.12.0"
    (spool / "pmix_dstor_ds21_1").mkdir(parents=True)
    systmp = tmp_path / "tmpfs"
    appdir = systmp / ("spmix_appdir_%d_12.0" % os.getuid())
    appdir.mkdir(parents=True)
    env = {"PMIX_SERVER_TMPDIR": str(spool) + "/", "PMIX_SYSTEM_TMPDIR": str(systmp),
           "PMIX_DSTORE_21_BASE_PATH": str(spool / "pmix_dstor_ds21_1"),
           "PMIX_DSTORE_ESH_BASE_PATH": str(spool / "gone"), "SLURM_JOB_ID": "12", "SLURM_STEP_ID": "0"}
    munge = tmp_path / "munge"
    munge.mkdir()
    binds = mpi.host_binds(env, cfg(munge_socket_dir=str(munge)))
    assert [b["src"] for b in binds] == sorted([str(spool), str(systmp), str(munge)], key=len)
    assert all(b["dst"] == b["src"] for b in binds)
    # /tmp itself is never bound for PMIX_SYSTEM_TMPDIR (the default /tmp bind covers it)
    env["PMIX_SYSTEM_TMPDIR"] = "/tmp"
    assert "/tmp" not in [b["src"] for b in mpi.host_binds(env, cfg(munge_socket_dir=str(munge)))]


def test_host_openmpi_facts():
    facts = select.library_facts(HOST_LIBMPI)
    version = subprocess.run(["ompi_info", "--parsable", "--version"], capture_output=True, text=True)
    assert facts["flavor"] == "openmpi" and facts["soname"] == "libmpi.so.40"
    assert facts["version"] and facts["version"] in version.stdout
    assert select.host_mpi(cfg())["path"] == HOST_LIBMPI


def test_fake_mpich_refused_under_openmpi_mpirun(mpich_root, tmp_path):
    env = mpirun_env(tmp_path, 1)[0]["env"]
    for mode in ("auto", "hybrid", "host"):
        plan = {"argv": ["/app/hello"], "image_meta": {}}
        with pytest.raises(errors.Error) as e:
            select.prepare(plan, mpich_root, cfg(), mode, env)
        assert e.value.code == errors.MPI_ABI
        assert "MPICH" in e.value.what and "Open MPI" in e.value.what
    assert "rank 0 of 1" in errors.Error.line(e.value) or mode == "host"
    # without a launcher the image's MPICH may run as a singleton
    plan = {"argv": ["/app/hello"], "image_meta": {}}
    select.prepare(plan, mpich_root, cfg(), "auto", {})
    assert plan["mpi_selected"]["mode"] == "hybrid"
    assert plan["mpi_selected"]["image"]["flavor"] == "mpich"
    assert plan["mpi_selected"]["image"]["version"] == "4.0.2"
    # none: no questions asked
    mpi.prepare({"argv": ["/app/hello"]}, mpich_root, cfg(), "none")


def test_openmpi_image_hybrid_and_host(ompi_root, tmp_path):
    env = mpirun_env(tmp_path, 1)[0]["env"]
    plan = {"argv": ["/app/hello"], "image_meta": {}}
    select.prepare(plan, ompi_root, cfg(), "auto", env)
    assert plan["mpi_selected"]["mode"] == "hybrid"
    assert not plan.get("binds") and not plan.get("ld_library_path_prepend")
    assert any("mpirun" in n for n in plan["notes"])

    plan = {"argv": ["/app/hello"], "image_meta": {}}
    select.prepare(plan, ompi_root, cfg(mpi_auto_prefer="host"), "auto", env)
    assert plan["mpi_selected"]["mode"] == "host"
    binds = {b["dst"]: b for b in plan["binds"]}
    assert os.path.realpath(binds["/.hpcrun/host/lib/libmpi.so.40"]["src"]) == os.path.realpath(HOST_LIBMPI)
    assert "/.hpcrun/host/lib/libopen-pal.so.40" in binds        # the closure, not just libmpi
    assert "/.hpcrun/host/lib/libc.so.6" not in binds            # glibc stays the image's
    assert plan["ld_library_path_prepend"] == ["/.hpcrun/host/lib"]
    components = [d for d in binds if d.endswith("/openmpi") and os.path.isdir(binds[d]["src"])]
    assert components and all(binds[d]["src"] == d for d in components)
    assert all(b["ro"] for b in plan["binds"] if not b["src"].startswith("/dev/"))


def test_openmpi_version_rules():
    img = {"flavor": "openmpi", "soname": "libmpi.so.40", "version": "4.1.4", "inside": "/usr/lib/libmpi.so.40"}
    assert select.host_problem(img, dict(img, version="4.1.6")) is None
    assert "minor" in select.host_problem(img, dict(img, version="4.0.7"))
    assert select.host_problem(img, dict(img, version="5.0.3"))
    problem, _ = select.hybrid_problem(img, dict(img, version="5.0.3"), "openmpi")
    assert problem and "5.0.3" in problem
    mpich = {"flavor": "mpich", "soname": "libmpi.so.12", "version": "3.3", "inside": "/usr/lib/libmpi.so.12"}
    assert select.host_problem(mpich, dict(mpich, impl="Intel MPI", version="2021.10")) is None
    assert select.hybrid_problem(mpich, None, "pmi")[0] is None


def test_host_mpi_needing_newer_glibc_refused(ompi_root, shared_dir, tmp_path):
    d = str(tmp_path)
    with open(os.path.join(d, "c.c"), "w") as f:
        f.write("int fake_new_symbol(void) { return 0; }\n")
    with open(os.path.join(d, "v.map"), "w") as f:
        f.write("GLIBC_2.99 { global: fake_new_symbol; local: *; };\n")
    os.makedirs(os.path.join(d, "fakec"))
    gcc("-shared", "-fPIC", "-nostdlib", "-o", os.path.join(d, "fakec/libc.so.6"), "-Wl,-soname,libc.so.6",
        "-Wl,--version-script," + os.path.join(d, "v.map"), os.path.join(d, "c.c"))
    with open(os.path.join(d, "m.c"), "w") as f:
        f.write("extern int fake_new_symbol(void);\nint MPI_Init(void) { return fake_new_symbol(); }\n")
    lib = os.path.join(d, "libmpi.so.40")
    gcc("-shared", "-fPIC", "-o", lib, "-Wl,-soname,libmpi.so.40", os.path.join(d, "m.c"),
        os.path.join(d, "fakec/libc.so.6"))
    plan = {"argv": ["/app/hello"], "image_meta": {}}
    with pytest.raises(errors.Error) as e:
        select.prepare(plan, ompi_root, cfg(mpi_lib=lib, mpi_version="4.1.4"), "host", {})
    assert e.value.code == errors.MPI_ABI and "GLIBC_2.99" in e.value.what
    assert e.value.subject == os.path.realpath(lib)
    # a busybox image has no glibc at all: host libraries cannot load there
    bare = os.path.join(d, "bare")
    imagetools.make_busybox_root(bare)
    with pytest.raises(errors.Error) as e:
        select.inject_host_mpi({}, bare, cfg(), select.host_mpi(cfg()), None)
    assert "no glibc" in e.value.what


def test_image_library_follows_links_inside_root(tmp_path):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "opt/mpi/lib"))
    os.makedirs(os.path.join(root, "usr/lib"))
    shutil.copy2(HOST_LIBMPI, os.path.join(root, "opt/mpi/lib/libmpi.so.40.30.4"))
    os.symlink("/opt/mpi/lib/libmpi.so.40.30.4", os.path.join(root, "usr/lib/libmpi.so.40"))
    inside, host = inject.image_library(root, prefix="libmpi.so.")
    assert inside == "/opt/mpi/lib/libmpi.so.40.30.4" or inside == "/usr/lib/libmpi.so.40"
    assert host.startswith(root + "/") and os.path.isfile(host)
    assert inject.resolve_in(root, "/usr/lib/libmpi.so.40") == os.path.join(root, "opt/mpi/lib/libmpi.so.40.30.4")
    os.symlink("../../../../../etc", os.path.join(root, "usr/lib/escape"))
    assert inject.resolve_in(root, "/usr/lib/escape/passwd") == os.path.join(root, "etc/passwd")


def test_plan_skips_mpi_only_where_it_would_answer_nothing():
    # plan.build imports hpcrun.mpi only when a variable starts with plan.MPI_ENV_PREFIXES (or the
    # site sets mpi_host_bind): every variable launcher() and host_binds() read must start so.
    import inspect
    import re
    from hpcrun import plan
    src = inspect.getsource(mpi.launcher) + inspect.getsource(mpi.host_binds)
    names = set(re.findall(r'environ\.get\("(\w+)"|"(\w+)" (?:not )?in environ', src))
    names = {a or b for a, b in names} | {"PMIX_DSTORE_"}     # the prefix host_binds scans for
    assert len(names) >= 10
    assert all(n.startswith(plan.MPI_ENV_PREFIXES) for n in names), names
    assert "for k in sorted(environ)" in src and 'k.startswith("PMIX_DSTORE_")' in src
    # without any of them the skipped calls would have answered nothing
    plain = {"PATH": "/usr/bin", "HOME": "/root", "MPI_LOCALRANKID": "0"}
    assert mpi.launcher(plain) is None and mpi.host_binds(plain, cfg()) == []
