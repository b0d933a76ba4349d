"""Apptainer SIF files behave as in Apptainer (issue 17, items 8-12).

The SIFs are written by tests/siftools.py, by the format's own rules (checked
here against the SIF reference tooling's files in /work/shared/data/sif), with
what `apptainer build` puts in them: a Def.FILE object, the inspect-metadata.json
object, and a SquashFS root whose /.singularity.d holds the runscript, env/*.sh,
labels and help.  Expected behaviour is Apptainer's documented one (user guide:
"Environment and Metadata", "Bind Paths and Mounts", `run`, `run-help`, `inspect`).
Launches run as the unprivileged test user (user namespace, squashfuse).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import imagetools  # noqa: E402
import siftools  # noqa: E402

from hpcrun import errors  # noqa: E402

REF = "/work/shared/data/sif"
DEFFILE = """Bootstrap: localimage
From: busybox.sif

%environment
    export GREETING="hello from env"

%runscript
    echo "runscript args: $*"

%labels
    Author hpcrun-tests

%help
    This container greets.
"""
RUNSCRIPT = ('echo "runscript args: $*"\necho "greeting=$GREETING"\necho "argc=$#"\n'
             '[ "$1" = fail ] && exit 3\nexit 0\n')
ENV90 = ('#!/bin/sh\nexport GREETING="hello from env"\nexport PATH="/opt/tools/bin:$PATH"\n'
         'export OVERRIDE=image\nexport ORDER=90\n'
         'export SOURCED_IN="$$:$(readlink /proc/$$/exe)"\n'
         "export SOURCED_ARGV=\"$(tr '\\0\\n' '  ' < /proc/$$/cmdline)\"\n")
ENV91 = '#!/bin/sh\nexport ORDER="$ORDER,91"\n'          # Apptainer sources env/*.sh in glob order
HELP = "    This container greets.\n"
LABELS = {"Author": "hpcrun-tests", "org.label-schema.schema-version": "1.0"}


@pytest.fixture(scope="module")
def sif_dir(shared_dir):
    d = tempfile.mkdtemp(prefix="sif-", dir=shared_dir)
    os.chmod(d, 0o755)
    return d


@pytest.fixture(scope="module")
def app_sif(sif_dir):
    """A SIF as `apptainer build app.sif app.def` writes it (busybox root)."""
    root = os.path.join(sif_dir, "root")
    imagetools.make_busybox_root(root)
    shutil.rmtree(os.path.join(root, ".hpcrun"))          # an Apptainer image has no /.hpcrun
    tools = os.path.join(root, "opt/tools/bin")
    os.makedirs(tools)
    with open(os.path.join(tools, "mytool"), "w") as f:
        f.write('#!/bin/sh\necho "mytool ran with $*"\n')
    os.chmod(os.path.join(tools, "mytool"), 0o755)
    siftools.apptainer_tree(root, runscript=RUNSCRIPT, env={"90-environment.sh": ENV90, "91-environment.sh": ENV91},
                            labels=LABELS, helpfile=HELP)
    attrs = {"labels": LABELS, "runscript": "#!/bin/sh\n\n" + RUNSCRIPT, "helpfile": HELP, "deffile": DEFFILE,
             "environment": {"/.singularity.d/env/90-environment.sh": ENV90,
                             "/.singularity.d/env/91-environment.sh": ENV91}}
    return siftools.apptainer_sif(os.path.join(sif_dir, "app.sif"), root, DEFFILE, attrs)


def hp(as_user, hpcrun_bin, args, env=None, **kw):
    return as_user([hpcrun_bin] + list(args), env=env, **kw)


def lines(r):
    return r.stdout.splitlines()


# ------------------------------------------------------------- the writer ---

def test_writer_rebuilds_reference_files(tmp_path):
    """siftools writes what the SIF reference tooling writes, byte for byte."""
    ref = open(os.path.join(REF, "one-group.sif"), "rb").read()
    out = siftools.write(str(tmp_path / "og.sif"), [
        siftools.partition(ref[32768:32772], fstype=siftools.FS_RAW, parttype=siftools.PART_SYSTEM, arch="386"),
        siftools.partition(ref[36864:36864 + 4096], arch="386")], launch=b"")
    assert open(out, "rb").read() == ref
    out = siftools.write(str(tmp_path / "j.sif"), [siftools.obj(siftools.GENERIC_JSON, b"{}", name="data.json")],
                         launch=b"")
    assert open(out, "rb").read() == open(os.path.join(REF, "one-object-generic-json.sif"), "rb").read()
    out = siftools.write(str(tmp_path / "e.sif"), [], launch=b"")
    assert open(out, "rb").read() == open(os.path.join(REF, "empty.sif"), "rb").read()


# ----------------------------------------------------------- item 8: run ---

def test_run_executes_the_runscript_with_args(as_user, hpcrun_bin, app_sif):
    r = hp(as_user, hpcrun_bin, ["run", app_sif, "a", "b c"])
    assert r.returncode == 0, r.stderr
    assert lines(r) == ["runscript args: a b c", "greeting=hello from env", "argc=2"]


def test_run_exit_status_is_the_runscripts(as_user, hpcrun_bin, app_sif):
    r = hp(as_user, hpcrun_bin, ["run", app_sif, "fail"])
    assert r.returncode == 3, r.stderr


def test_run_of_a_sif_without_runscript_is_127(as_user, hpcrun_bin, sif_dir):
    root = os.path.join(sif_dir, "norun-root")
    imagetools.make_busybox_root(root)
    shutil.rmtree(os.path.join(root, ".hpcrun"))
    siftools.apptainer_tree(root)
    img = siftools.apptainer_sif(os.path.join(sif_dir, "norun.sif"), root, "Bootstrap: scratch\n", {})
    r = hp(as_user, hpcrun_bin, ["run", img])
    assert r.returncode == errors.NOTFOUND
    assert r.stderr.strip() == "hpcrun: error: image has no runscript (%s)" % img


# ---------------------------------------------------- item 9: %environment ---

def test_environment_applies_to_exec_in_glob_order(as_user, hpcrun_bin, app_sif):
    r = hp(as_user, hpcrun_bin, [app_sif, "sh", "-c", 'echo "$GREETING|$ORDER|$PATH"'])
    assert r.returncode == 0, r.stderr
    greeting, order, path = r.stdout.strip().split("|")
    assert (greeting, order) == ("hello from env", "90,91")
    assert path.split(":")[0] == "/opt/tools/bin"


def test_program_on_the_environments_path_is_found(as_user, hpcrun_bin, app_sif):
    r = hp(as_user, hpcrun_bin, [app_sif, "mytool", "x", "y z"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "mytool ran with x y z\n"


def test_missing_command_is_127_one_line(as_user, hpcrun_bin, app_sif):
    r = hp(as_user, hpcrun_bin, [app_sif, "no-such-tool"])
    assert r.returncode == errors.NOTFOUND
    assert r.stderr.strip() == "hpcrun: error: command not found in the image (no-such-tool)"


def test_shell_gets_the_environment(as_user, hpcrun_bin, app_sif):
    r = hp(as_user, hpcrun_bin, ["shell", app_sif], input='echo "$GREETING"; mytool s\n')
    assert r.returncode == 0, r.stderr
    assert lines(r) == ["hello from env", "mytool ran with s"]


def test_env_scripts_run_in_the_container_not_in_hpcrun(as_user, hpcrun_bin, app_sif):
    """The env scripts are sourced by the image's /bin/sh, in the process
    that then becomes the program (exec in place: the same PID)."""
    r = hp(as_user, hpcrun_bin, [app_sif, "sh", "-c", 'echo "$SOURCED_IN"; echo "$$"'])
    assert r.returncode == 0, r.stderr
    sourced, pid = lines(r)
    assert sourced == "%s:/bin/busybox" % pid


# ------------------------------------------- item 11: env and bind variables ---

def test_apptainerenv_overrides_the_image_and_hpcrun_env_wins(as_user, hpcrun_bin, app_sif):
    show = 'echo "$OVERRIDE|$ONLY_S|$BOTH|$H|${APPTAINERENV_OVERRIDE-unset}|${SINGULARITYENV_ONLY_S-unset}"'
    r = hp(as_user, hpcrun_bin, [app_sif, "sh", "-c", show],
           env={"APPTAINERENV_OVERRIDE": "user", "SINGULARITYENV_ONLY_S": "s",
                "SINGULARITYENV_BOTH": "sing", "APPTAINERENV_BOTH": "app",
                "APPTAINERENV_H": "app", "HPCRUN_ENV_H": "hpcrun"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "user|s|app|hpcrun|unset|unset"
    r = hp(as_user, hpcrun_bin, ["--env", "OVERRIDE=cli", app_sif, "sh", "-c", 'echo "$OVERRIDE"'],
           env={"APPTAINERENV_OVERRIDE": "user", "HPCRUN_ENV_OVERRIDE": "hpcrun"})
    assert r.stdout.strip() == "cli", r.stderr


def test_user_values_never_show_in_argv(as_user, hpcrun_bin, app_sif):
    """Any user may read a process's argv (ps); the values the shell sets
    again after the env scripts travel in its environment, and leave no trace."""
    r = hp(as_user, hpcrun_bin, [app_sif, "sh", "-c", 'echo "$SOURCED_ARGV"; echo "$TOKEN"; env'],
           env={"APPTAINERENV_TOKEN": "s3cr3t-value"})
    assert r.returncode == 0, r.stderr
    out = lines(r)
    assert "-c" in out[0].split() and "TOKEN" in out[0].split()      # the env scripts' shell: names only
    assert "s3cr3t" not in out[0]
    assert out[1] == "s3cr3t-value"
    assert not [x for x in out[2:] if x.startswith(("_HPCRUN_ENV_", "_hpcrun_", "APPTAINERENV_"))]


def test_path_extended_by_the_user_extends_the_environments_path(as_user, hpcrun_bin, app_sif):
    """APPTAINERENV_PREPEND_PATH / _APPEND_PATH and --env 'PATH=/x:$PATH' keep what
    %environment put on PATH; a literal PATH replaces it."""
    default = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    show = [app_sif, "sh", "-c", 'echo "$PATH"; mytool ok']
    r = hp(as_user, hpcrun_bin, show, env={"APPTAINERENV_PREPEND_PATH": "/pre", "APPTAINERENV_APPEND_PATH": "/post"})
    assert lines(r) == ["/pre:/opt/tools/bin:%s:/post" % default, "mytool ran with ok"], r.stderr
    r = hp(as_user, hpcrun_bin, ["--env", "PATH=/x:$PATH"] + show)
    assert lines(r) == ["/x:/opt/tools/bin:%s" % default, "mytool ran with ok"], r.stderr
    r = hp(as_user, hpcrun_bin, ["--env", "PATH=/bin", app_sif, "sh", "-c", 'echo "$PATH"; env'])
    assert lines(r)[0] == "/bin", r.stderr
    assert not [x for x in lines(r) if x.startswith(("_HPCRUN", "PREPEND_PATH", "APPEND_PATH"))]


def test_container_and_name_variables(as_user, hpcrun_bin, app_sif):
    r = hp(as_user, hpcrun_bin, [app_sif, "sh", "-c",
                                 'echo "$APPTAINER_CONTAINER|$SINGULARITY_CONTAINER|$APPTAINER_NAME|$SINGULARITY_NAME"'])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "%s|%s|app.sif|app.sif" % (app_sif, app_sif)


def test_apptainer_bind_and_singularity_bind(as_user, hpcrun_bin, app_sif, sif_dir, test_user):
    data = tempfile.mkdtemp(prefix="bind-", dir=sif_dir)
    os.chmod(data, 0o755)
    with open(os.path.join(data, "f"), "w") as f:
        f.write("bound\n")
    os.chmod(os.path.join(data, "f"), 0o644)
    r = hp(as_user, hpcrun_bin, [app_sif, "cat", "/data/f"], env={"APPTAINER_BIND": "%s:/data:ro" % data})
    assert (r.returncode, r.stdout) == (0, "bound\n"), r.stderr
    r = hp(as_user, hpcrun_bin, [app_sif, "sh", "-c", "echo x > /sdata/g"],
           env={"SINGULARITY_BIND": "%s:/sdata:ro" % data})
    assert r.returncode != 0 and not os.path.exists(os.path.join(data, "g"))     # :ro holds
    r = hp(as_user, hpcrun_bin, [app_sif, "cat", "/sdata/f"], env={"SINGULARITY_BIND": "%s:/sdata" % data})
    assert r.stdout == "bound\n", r.stderr


def test_bind_variable_precedence_in_the_plan(as_user, hpcrun_bin, app_sif, sif_dir):
    """APPTAINER_BIND wins over SINGULARITY_BIND (Apptainer's rule); HPCRUN_BIND
    and -B come after it, so they win for the same destination."""
    a, b, c, d = (tempfile.mkdtemp(prefix="b%d-" % i, dir=sif_dir) for i in range(4))
    for x in (a, b, c, d):
        os.chmod(x, 0o755)
    r = hp(as_user, hpcrun_bin, ["--dry-run", "-B", "%s:/four" % d, app_sif, "true"],
           env={"APPTAINER_BIND": "%s:/one,%s:/two" % (a, a), "SINGULARITY_BIND": "%s:/zero" % b,
                "HPCRUN_BIND": "%s:/two,%s:/four" % (c, c)})
    assert r.returncode == 0, r.stderr
    binds = {x["dst"]: x["src"] for x in json.loads(r.stdout)["binds"] if x["why"] == "user"}
    assert binds == {"/one": a, "/two": c, "/four": d}


def test_malformed_apptainer_bind_is_64(as_user, hpcrun_bin, app_sif):
    r = hp(as_user, hpcrun_bin, [app_sif, "true"], env={"APPTAINER_BIND": "/tmp:/x:nosuid:extra"})
    assert r.returncode == errors.USAGE
    assert r.stderr.startswith("hpcrun: error: malformed bind spec") and "Traceback" not in r.stderr


# ------------------------------------------------ item 10: inspect, run-help ---

def test_inspect_shows_the_sif_metadata_without_mounting(as_user, hpcrun_bin, app_sif):
    r = hp(as_user, hpcrun_bin, ["inspect", "--json", app_sif])
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["labels"] == LABELS
    a = d["apptainer"]
    assert a["deffile"] == DEFFILE and a["helpfile"] == HELP and a["runscript"].endswith(RUNSCRIPT)
    assert a["environment"]["/.singularity.d/env/90-environment.sh"] == ENV90
    assert "note" not in d
    r = hp(as_user, hpcrun_bin, ["inspect", app_sif])
    assert r.returncode == 0, r.stderr
    assert "  Author = hpcrun-tests" in r.stdout and "  | %runscript" in r.stdout
    assert "  |     This container greets." in r.stdout


def test_run_help(as_user, hpcrun_bin, app_sif):
    r = hp(as_user, hpcrun_bin, ["run-help", app_sif])
    assert (r.returncode, r.stdout) == (0, HELP), r.stderr
    r = hp(as_user, hpcrun_bin, ["run-help", os.path.join(REF, "one-group.sif")])
    assert (r.returncode, r.stdout) == (0, "No help sections were defined for this image\n"), r.stderr
    r = hp(as_user, hpcrun_bin, ["run-help"])
    assert r.returncode == errors.USAGE and r.stderr.startswith("hpcrun: error:")


def test_inspect_of_corrupt_metadata_is_65(as_user, hpcrun_bin, sif_dir):
    ref = open(os.path.join(REF, "one-group.sif"), "rb").read()
    img = siftools.write(os.path.join(sif_dir, "badmeta.sif"), [
        siftools.obj(siftools.GENERIC_JSON, b"{not json", name="inspect-metadata.json"),
        siftools.partition(ref[36864:36864 + 4096])])
    r = hp(as_user, hpcrun_bin, ["inspect", img])
    assert r.returncode == errors.DATA
    assert r.stderr.startswith("hpcrun: error: corrupt SIF: inspect-metadata.json") and "Traceback" not in r.stderr


def test_inspect_of_reference_sifs(as_user, hpcrun_bin):
    for name in ("one-group.sif", "two-groups.sif", "one-group-signed-pgp.sif", "one-group-signed-dsse.sif"):
        r = hp(as_user, hpcrun_bin, ["inspect", "--json", os.path.join(REF, name)])
        assert r.returncode == 0, (name, r.stderr)
        assert json.loads(r.stdout)["apptainer"] == {}


# ------------------------------------------------ item 12: run-singularity ---

def test_sif_runs_as_a_program_without_apptainer(as_user, app_sif):
    """`./app.sif a b`: the kernel runs `/usr/bin/env run-singularity ./app.sif a b`."""
    bindir = os.path.dirname(sys.executable)
    assert os.access(os.path.join(bindir, "run-singularity"), os.X_OK)
    r = as_user(["./app.sif", "a", "b"], cwd=os.path.dirname(app_sif), env={"PATH": bindir + ":/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert lines(r) == ["runscript args: a b", "greeting=hello from env", "argc=2"]


def test_run_singularity_hands_over_to_a_real_apptainer(as_user, app_sif, sif_dir):
    """Where an `apptainer` is on PATH, run-singularity never runs the image
    itself.  (Apptainer is not installed here: a stand-in records the call.)"""
    fake = tempfile.mkdtemp(prefix="apptainer-", dir=sif_dir)
    os.chmod(fake, 0o755)
    with open(os.path.join(fake, "apptainer"), "w") as f:
        f.write('#!/bin/sh\necho "apptainer $*"\n')
    os.chmod(os.path.join(fake, "apptainer"), 0o755)
    bindir = os.path.dirname(sys.executable)
    r = as_user(["./app.sif", "a"], cwd=os.path.dirname(app_sif),
                env={"PATH": "%s:%s:/usr/bin:/bin" % (bindir, fake)})
    assert (r.returncode, r.stdout) == (0, "apptainer run ./app.sif a\n"), r.stderr


def test_env_scripts_without_a_shell_in_the_image(as_user, hpcrun_bin, sif_dir):
    """Apptainer sources env scripts with a shell built into its runtime; hpcrun
    runs no image code in its own process, so without /bin/sh it says so and runs
    the program without them."""
    root = os.path.join(sif_dir, "nosh-root")
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy2(imagetools.BUSYBOX, os.path.join(root, "bin/busybox"))
    os.symlink("busybox", os.path.join(root, "bin/echo"))
    siftools.apptainer_tree(root, env={"90-environment.sh": ENV90})
    img = siftools.apptainer_sif(os.path.join(sif_dir, "nosh.sif"), root, "Bootstrap: scratch\n", {})
    r = hp(as_user, hpcrun_bin, [img, "echo", "hi"])
    assert (r.returncode, r.stdout) == (0, "hi\n"), r.stderr
    assert r.stderr.startswith("hpcrun: warning: the image has no /bin/sh to source its environment scripts")


def test_run_as_root(hpcrun_bin, app_sif):
    """Root: no user namespace, the kernel's loop mount; the same behaviour."""
    if os.getuid() != 0:
        pytest.skip("needs root")
    r = subprocess.run([hpcrun_bin, "run", app_sif, "r"], capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "HOME": "/root", "APPTAINERENV_GREETING": "root's"})
    assert r.returncode == 0, r.stderr
    assert lines(r) == ["runscript args: r", "greeting=root's", "argc=1"]


def test_run_singularity_errors(as_user, sif_dir):
    bindir = os.path.dirname(sys.executable)
    env = {"PATH": bindir + ":/usr/bin:/bin"}
    r = as_user(["run-singularity"], env=env)
    assert r.returncode == errors.USAGE and r.stderr.startswith("usage: run-singularity")
    r = as_user(["run-singularity", os.path.join(sif_dir, "no-such.sif")], env=env)
    assert r.returncode == errors.NOINPUT
    assert r.stderr.strip().startswith("hpcrun: error: image not found") and "Traceback" not in r.stderr


def test_host_wiring_stays_in_front_of_the_environments_library_path(hpcrun_bin, sif_dir):
    """--nv's host libraries (launch.env) stay first on LD_LIBRARY_PATH even when
    %environment sets it outright, so the host driver wins (fake driver of test_gpu)."""
    if os.getuid() != 0:
        pytest.skip("needs root (HPCRUN_CONF with GPU wiring is site configuration)")
    from test_gpu import NVLIB, build_driver, _site_conf
    d = os.path.join(sif_dir, "nv-driver")
    values = build_driver(d)
    conf = _site_conf(os.path.join(sif_dir, "nv.conf"), values)
    root = os.path.join(sif_dir, "nv-root")
    imagetools.make_busybox_root(root)
    imagetools.add_host_program(root, "/bin/true")           # glibc, for the driver's glibc check
    shutil.rmtree(os.path.join(root, ".hpcrun"))
    siftools.apptainer_tree(root, env={"90-environment.sh": "export LD_LIBRARY_PATH=/opt/img/lib\n"})
    img = siftools.apptainer_sif(os.path.join(sif_dir, "nv.sif"), root, "Bootstrap: scratch\n", {})
    r = subprocess.run([hpcrun_bin, "--nv", img, "sh", "-c", 'echo "$LD_LIBRARY_PATH"'], capture_output=True,
                       text=True, timeout=120, cwd="/",
                       env={"PATH": "/usr/bin:/bin", "HOME": "/root", "HPCRUN_CONF": conf, "HPCRUN_LINGER": "0"})
    assert r.returncode == 0, r.stderr
    parts = r.stdout.strip().split(":")
    assert parts[0] == NVLIB and "/opt/img/lib" in parts, r.stdout


# ------------------------------------------------- Apptainer's PGP signatures ---

def test_pgp_body_is_what_apptainer_signs(tmp_path):
    """siftools.pgp_body (what test_sign.py signs with gpg) is byte for byte the
    body Apptainer's tooling signed in one-group-signed-pgp.sif, and hpcrun's
    own reading of the file recomputes every digest that body lists."""
    from hpcrun import sif, sifsign
    ref = open(os.path.join(REF, "one-group.sif"), "rb").read()
    parts = [siftools.partition(ref[32768:32772], fstype=siftools.FS_RAW, parttype=siftools.PART_SYSTEM, arch="386"),
             siftools.partition(ref[36864:36864 + 4096], arch="386")]
    body = siftools.pgp_body(parts, launch=b"").encode()
    path = os.path.join(REF, "one-group-signed-pgp.sif")
    signed = open(path, "rb").read()
    assert b"\n\n" + body + b"\n-----BEGIN PGP SIGNATURE-----" in signed
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        descriptors = sif._descriptors(path, fd, size)
        assert sifsign.check_metadata(path, fd, size, descriptors, siftools.GROUP | 1, body) == [1, 2]
    finally:
        os.close(fd)
