"""Docker/OCI images behave in hpcrun as they do in podman (issue 17 items 3, 4, 5, 7).

The images are OCI image layouts and docker archives written here with
tarfile, following the image-spec (index -> manifest -> config + layers, blobs
named by their sha256), with the host's busybox in them; where podman runs
on this machine the same image is run by podman too and the outputs compared.
"""
import gzip
import hashlib
import json
import os
import shutil
import subprocess

import pytest

import imagetools

from hpcrun import environment
from hpcrun.imagebuild import base

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def run(argv, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    return subprocess.run(argv, **kw)


def layer_tar(files):
    return imagetools.layer_tar(files, mtime=1700000000)


def busybox_layer(extra=None):
    with open("/bin/busybox", "rb") as f:
        files = {"bin": None, "bin/busybox": f.read()}
    for applet in ("sh", "cat", "pwd", "ls", "printf", "id"):
        files["bin/" + applet] = ("sym", "busybox")
    files.update(extra or {})
    return layer_tar(files)


def compress(data, how):
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return subprocess.run(["zstd", "-q", "-c"], input=data, stdout=subprocess.PIPE, check=True).stdout
    return data


class Layout:
    """An OCI image layout directory being written: blobs by digest, then index.json."""

    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.join(path, "blobs", "sha256"))
        with open(os.path.join(path, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)

    def blob(self, data, media_type, **extra):
        if not isinstance(data, bytes):
            data = json.dumps(data).encode()
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.path, "blobs", "sha256", digest), "wb") as f:
            f.write(data)
        return dict({"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}, **extra)

    def image(self, layers, config, arch, os_="linux", variant=None, compression="gzip"):
        """A manifest (its descriptor returned, with the platform): layers uncompressed tars."""
        suffix = {"gzip": "+gzip", "zstd": "+zstd", "none": ""}[compression]
        descs = [self.blob(compress(l, compression), "application/vnd.oci.image.layer.v1.tar" + suffix)
                 for l in layers]
        cfg = {"architecture": arch, "os": os_, "config": config,
               "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(l).hexdigest() for l in layers]}}
        if variant:
            cfg["variant"] = variant
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": self.blob(cfg, OCI_CONFIG), "layers": descs}
        platform = {"architecture": arch, "os": os_}
        if variant:
            platform["variant"] = variant
        return self.blob(manifest, OCI_MANIFEST, platform=platform)

    def index(self, manifests, nested=False):
        """index.json; nested: it points to one image index blob that lists the manifests (skopeo --all)."""
        if nested:
            manifests = [self.blob({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}, OCI_INDEX,
                                   annotations={"org.opencontainers.image.ref.name": "latest"})]
        with open(os.path.join(self.path, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}, f)
        return self.path


HOST = base.host_platform()
OTHER = ("linux", "arm64", "v8") if HOST[1] != "arm64" else ("linux", "amd64", "")


def build(hpcrun_bin, out, *args, env=None):
    return run([hpcrun_bin, "build", out] + list(args), env=env)


def one_error_line(r, code, text):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcrun: error: ") and text in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture
def tmpdir_env(tmp_path):
    """A private TMPDIR for one build: whatever the build leaves behind is there."""
    d = tmp_path / "tmp"
    d.mkdir()
    return dict(os.environ, TMPDIR=str(d)), d


# ---------------------------------------------------------------- item 3: Env is literal

LITERAL_ENV = ["PATH=/bin", "LIT=a$HOME-b", "BRACE=${USER:-x}", "QUOTED='q'", "DQ=\"d\"", "SPACED= s ",
               "EMPTY=", "PLAIN=p"]
LITERAL_SHOW = 'printf "%s|" "$LIT" "$BRACE" "$QUOTED" "$DQ" "$SPACED" "$EMPTY" "$PLAIN"'
LITERAL_WANT = "a$HOME-b|${USER:-x}|'q'|\"d\"| s ||p|"


def test_image_env_values_arrive_literally(hpcrun_bin, tmp_path):
    lay = Layout(str(tmp_path / "oci"))
    lay.index([lay.image([busybox_layer()], {"Env": LITERAL_ENV}, HOST[1], variant=HOST[2] or None)])
    out = str(tmp_path / "env.img")
    r = build(hpcrun_bin, out, "--from", lay.path)
    assert r.returncode == 0, r.stderr
    r = run([hpcrun_bin, "--cleanenv", out, "/bin/sh", "-c", LITERAL_SHOW])
    assert r.returncode == 0, r.stderr
    assert r.stdout == LITERAL_WANT
    # --env still expands against the image's values, as before.
    r = run([hpcrun_bin, "--cleanenv", "--env", "MORE=$LIT/x", out, "/bin/sh", "-c", 'printf %s "$MORE"'])
    assert r.stdout == "a$HOME-b/x", r.stderr


def test_env_file_single_quotes_are_literal(tmp_path):
    # /.hpcrun/env's forms: 'VALUE' literal (what imports write), "VALUE" and bare expand.
    path = tmp_path / "env"
    path.write_text("A='x$HOME-${B}'\nB=\"$HOME/d\"\nC=$HOME/c\nD='it's'\nE=''\n")
    env = {"HOME": "/h"}
    environment.apply_file(env, str(path))
    assert env == {"HOME": "/h", "A": "x$HOME-${B}", "B": "/h/d", "C": "/h/c", "D": "it's", "E": ""}


def test_env_literal_form_round_trips(tmp_path):
    values = ["plain", "a$HOME", "'q'", '"d"', " s ", "", "it's", "${X:-y}", "/usr/bin:$PATH"]
    path = tmp_path / "env"
    path.write_text("".join("V%d=%s\n" % (n, base.env_literal(v)) for n, v in enumerate(values)))
    env = {"HOME": "/h", "PATH": "/p"}
    environment.apply_file(env, str(path))
    assert [env["V%d" % n] for n in range(len(values))] == values


# ---------------------------------------------------------------- item 4: platform

def two_platform_layout(path, nested):
    """arm64 (or amd64 on an arm64 host) first, as the issue's index had it; each image says which it is."""
    lay = Layout(path)
    other = lay.image([busybox_layer({"etc": None, "etc/which": b"other\n"})], {"Env": ["PATH=/bin"]},
                      OTHER[1], variant=OTHER[2] or None)
    host = lay.image([busybox_layer({"etc": None, "etc/which": b"host\n"})], {"Env": ["PATH=/bin"]},
                     HOST[1], variant=HOST[2] or None)
    attestation = lay.image([layer_tar({"x": b""})], {}, "unknown", os_="unknown")
    return lay.index([other, host, attestation], nested=nested)


@pytest.mark.parametrize("nested", [False, True], ids=["index.json", "nested-index"])
def test_multiarch_index_takes_the_hosts_platform(hpcrun_bin, tmp_path, nested):
    src = two_platform_layout(str(tmp_path / "oci"), nested)
    out = str(tmp_path / "host.img")
    r = build(hpcrun_bin, out, "--from", src)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    r = run([hpcrun_bin, "--cleanenv", out, "/bin/cat", "/etc/which"])
    assert r.stdout == "host\n", r.stderr

    # --platform picks another (its programs may not run here: only a file is read,
    # through the host's busybox it was given).
    out2 = str(tmp_path / "other.img")
    r = build(hpcrun_bin, out2, "--from", src, "--platform", "/".join(p for p in OTHER if p))
    assert r.returncode == 0, r.stderr
    r = run([hpcrun_bin, "--cleanenv", out2, "/bin/cat", "/etc/which"])
    assert r.stdout == "other\n", r.stderr


def test_missing_platform_is_one_line_65(hpcrun_bin, tmp_path, tmpdir_env):
    env, tmp = tmpdir_env
    src = two_platform_layout(str(tmp_path / "oci"), nested=True)
    out = str(tmp_path / "none.img")
    r = build(hpcrun_bin, out, "--from", src, "--platform", "linux/s390x", env=env)
    one_error_line(r, 65, "no linux/s390x image in this index")
    assert "linux/%s" % HOST[1] in r.stderr and "unknown" not in r.stderr
    assert not os.path.exists(out) and os.listdir(str(tmp)) == []


@pytest.mark.parametrize("value", ["s390x", "linux/", "a/b/c/d", "linux//v8"])
def test_bad_platform_is_usage(hpcrun_bin, tmp_path, value):
    src = two_platform_layout(str(tmp_path / "oci"), nested=False)
    r = build(hpcrun_bin, str(tmp_path / "x.img"), "--from", src, "--platform", value)
    one_error_line(r, 64, "--platform is OS/ARCH")


def test_single_image_platform_checked(hpcrun_bin, tmp_path):
    lay = Layout(str(tmp_path / "oci"))
    lay.index([lay.image([busybox_layer()], {"Env": ["PATH=/bin"]}, OTHER[1], variant=OTHER[2] or None)])
    # Not the host's: built, with a warning (podman's behaviour).
    r = build(hpcrun_bin, str(tmp_path / "a.img"), "--from", lay.path)
    assert r.returncode == 0, r.stderr
    assert "hpcrun: warning: the image is for linux/%s" % OTHER[1] in r.stderr
    # --platform that does not match the one image: 65.
    out = str(tmp_path / "b.img")
    r = build(hpcrun_bin, out, "--from", lay.path, "--platform", "linux/s390x")
    one_error_line(r, 65, "the image is for %s, not linux/s390x" % "/".join(p for p in OTHER if p))
    assert not os.path.exists(out)


def test_platform_without_an_oci_base_is_usage(hpcrun_bin, tmp_path):
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", str(root / "bin" / "busybox"))
    r = build(hpcrun_bin, str(tmp_path / "x.img"), "--from", str(root), "--platform", "linux/amd64")
    one_error_line(r, 64, "--platform chooses among the images")


# ---------------------------------------------------------------- item 5: zstd layers

def zstd_layout(path, second_layer=None):
    lay = Layout(path)
    l2 = second_layer if second_layer is not None else layer_tar({"etc": None, "etc/z": b"zstd layer\n"})
    return lay, lay.index([lay.image([busybox_layer(), l2], {"Env": ["PATH=/bin"]}, HOST[1],
                                     variant=HOST[2] or None, compression="zstd")])


def test_zstd_layers(hpcrun_bin, tmp_path):
    # Big enough that zstd writes while the tar is still being read (the pipe fills).
    big = os.urandom(3 << 20)
    _, src = zstd_layout(str(tmp_path / "oci"), layer_tar({"etc": None, "etc/z": b"zstd layer\n", "big": big}))
    out = str(tmp_path / "z.img")
    r = build(hpcrun_bin, out, "--from", src)
    assert r.returncode == 0, r.stderr
    r = run([hpcrun_bin, "--cleanenv", out, "/bin/sh", "-c", "cat /etc/z; busybox sha256sum /big"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:3] == ["zstd", "layer", hashlib.sha256(big).hexdigest()]


def test_corrupt_zstd_layer_is_65(hpcrun_bin, tmp_path, tmpdir_env):
    env, tmp = tmpdir_env
    lay, src = zstd_layout(str(tmp_path / "oci"))
    manifest = json.load(open(os.path.join(src, "blobs", "sha256",
                                           json.load(open(os.path.join(src, "index.json")))["manifests"][0]
                                           ["digest"].split(":")[1])))
    layer = os.path.join(src, "blobs", "sha256", manifest["layers"][1]["digest"].split(":")[1])
    data = open(layer, "rb").read()
    with open(layer, "wb") as f:            # the frame cut short: zstd itself says what is wrong
        f.write(data[:len(data) // 2])
    out = str(tmp_path / "bad.img")
    r = build(hpcrun_bin, out, "--from", src, env=env)
    assert r.returncode == 65, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "layer 2" in r.stderr
    assert not os.path.exists(out) and os.listdir(str(tmp)) == []


def test_zstd_layer_without_the_zstd_program(hpcrun_bin, tmp_path, tmpdir_env):
    env, tmp = tmpdir_env
    _, src = zstd_layout(str(tmp_path / "oci"))
    env["PATH"] = str(tmp)                   # no zstd on it
    out = str(tmp_path / "z.img")
    r = build(hpcrun_bin, out, "--from", src, env=env)
    one_error_line(r, 69, "zstd layers need the zstd program")
    assert not os.path.exists(out) and os.listdir(str(tmp)) == []


# ---------------------------------------------------------------- item 7: WORKDIR and USER

def workdir_layout(path, workdir="/app", user="1000:1000"):
    lay = Layout(path)
    files = {"app": None, "app/data.txt": b"data in app\n"}
    config = {"Env": ["PATH=/bin"], "WorkingDir": workdir, "Entrypoint": ["/bin/sh", "-c"],
              "Cmd": ["cat data.txt; pwd"]}
    if user:
        config["User"] = user
    return lay.index([lay.image([busybox_layer(files)], config, HOST[1], variant=HOST[2] or None)])


def test_workdir_is_where_run_starts(hpcrun_bin, tmp_path):
    src = workdir_layout(str(tmp_path / "oci"))
    out = str(tmp_path / "wd.img")
    r = build(hpcrun_bin, out, "--from", src)
    assert r.returncode == 0, r.stderr
    # Said at build time and by inspect: USER is not switched to.
    assert "USER 1000:1000 is not switched to" in r.stderr
    r = run([hpcrun_bin, "inspect", out])
    assert "workdir:    /app" in r.stdout and "image USER: 1000:1000 (not switched to" in r.stdout, r.stdout
    r = run([hpcrun_bin, "run", "--cleanenv", out], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "data in app\n/app\n"
    # A command given in exec form runs where the caller is (the HPC way: ./prog in place).
    r = run([hpcrun_bin, "--cleanenv", out, "/bin/pwd"], cwd=str(tmp_path))
    assert r.stdout.strip() == os.path.realpath(str(tmp_path)), r.stderr
    # The user inside is the user outside.
    r = run([hpcrun_bin, "--cleanenv", out, "/bin/id", "-u"])
    assert r.stdout.strip() == str(os.getuid())


def test_workdir_missing_from_the_layers_is_made(hpcrun_bin, tmp_path):
    src = workdir_layout(str(tmp_path / "oci"), workdir="/work/new", user=None)
    out = str(tmp_path / "wd.img")
    r = build(hpcrun_bin, out, "--from", src)
    assert r.returncode == 0, r.stderr
    assert "USER" not in r.stderr
    r = run([hpcrun_bin, "run", "--cleanenv", out])
    assert r.stdout.splitlines()[-1] == "/work/new", r.stderr


# ---------------------------------------------------------------- side by side with podman

CONTAINERFILE = """FROM scratch
ADD busybox /bin/busybox
ADD data.txt /app/data.txt
ENV PATH=/bin LIT='a$HOME-b' BRACE='${USER:-x}' SPACED=' s '
WORKDIR /app
USER 1000:1000
ENTRYPOINT ["/bin/busybox", "sh", "-c"]
CMD ["cat data.txt; pwd; printf '%s|' \\"$LIT\\" \\"$BRACE\\" \\"$SPACED\\""]
"""


class Podman:
    """podman with its own storage in a temporary directory (vfs: nothing mounted),
    runc and cgroupfs as these machines need, no network, the rlimits lowered
    (runc may not raise them here)."""

    # As root, podman and skopeo keep a blob cache in /var/lib/containers whatever
    # --root says: each runs in its own mount namespace with a tmpfs on /var/lib,
    # so the host keeps none of it.
    PRIVATE = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs -o mode=755 tmpfs /var/lib && exec "$@"', "sh"]

    def __init__(self, d):
        self.d = d
        self.cmd = self.PRIVATE + ["podman", "--root", os.path.join(d, "root"), "--runroot", os.path.join(d, "run"),
                    "--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs",
                    "--events-backend", "file"]

    def __call__(self, *args, check=True):
        r = run(self.cmd + list(args), timeout=300)
        if check:
            assert r.returncode == 0, (args, r.stderr)
        return r

    def run(self, image, *args):
        r = self("run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit",
                 "nproc=1024:1024", image, *args)
        return r.stdout

    def build(self, tag, files, platform=None):
        ctx = os.path.join(self.d, "ctx-" + tag)
        os.makedirs(ctx)
        shutil.copy("/bin/busybox", os.path.join(ctx, "busybox"))
        for name, text in files.items():
            with open(os.path.join(ctx, name), "w") as f:
                f.write(text)
        self("build", "-q", "--no-cache", "-t", tag, *(["--platform", platform] if platform else []), ctx)


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    if not shutil.which("podman") or not shutil.which("skopeo") or not shutil.which("runc"):
        pytest.skip("podman, skopeo and runc are not installed (Debian: apt install podman skopeo runc)")
    if os.geteuid() != 0:
        pytest.skip("podman side by side runs as root here (its cache is kept off the host in a mount namespace)")
    d = str(tmp_path_factory.mktemp("podman"))
    p = Podman(d)
    yield p
    shutil.rmtree(d, ignore_errors=True)      # vfs: plain directories (no `system reset`: it touches shared networks)


def test_podman_image_runs_as_in_podman(hpcrun_bin, podman, tmp_path):
    podman.build("t1", {"Containerfile": CONTAINERFILE, "data.txt": "data in app\n"})
    want = podman.run("localhost/t1")
    assert want == "data in app\n/app\na$HOME-b|${USER:-x}| s |"
    sources = {"docker-archive": str(tmp_path / "t1.docker.tar"), "oci-archive": str(tmp_path / "t1.oci.tar")}
    for fmt, path in sources.items():
        podman("save", "-q", "--format", fmt, "-o", path, "localhost/t1")
    # The same image with zstd layers, as skopeo writes them.
    sources["oci-zstd"] = str(tmp_path / "t1.zstd")
    r = run(Podman.PRIVATE + ["skopeo", "copy", "-q", "--dest-compress-format", "zstd", "oci-archive:" + sources["oci-archive"],
             "oci:%s:latest" % sources["oci-zstd"]])
    assert r.returncode == 0, r.stderr
    for fmt, src in sources.items():
        out = str(tmp_path / (fmt + ".img"))
        r = build(hpcrun_bin, out, "--from", src)
        assert r.returncode == 0, (fmt, r.stderr)
        assert "USER 1000:1000 is not switched to" in r.stderr, fmt
        r = run([hpcrun_bin, "run", "--cleanenv", out], cwd=str(tmp_path))
        assert (r.returncode, r.stdout) == (0, want), (fmt, r.stderr)


def test_podman_multiarch_layout_takes_the_hosts_platform(hpcrun_bin, podman, tmp_path):
    files = {"Containerfile": 'FROM scratch\nADD busybox /bin/busybox\nADD which /which\n'
                              'ENTRYPOINT ["/bin/busybox", "cat", "/which"]\n'}
    podman("manifest", "create", "multi")
    for plat in (OTHER, HOST):                       # the other platform first, as in the issue
        name = "/".join(p for p in plat if p)
        podman.build("w-" + plat[1], dict(files, which=plat[1] + "\n"), platform=name)
        podman("manifest", "add", "multi", "containers-storage:localhost/w-" + plat[1])
    layout = str(tmp_path / "multi")
    podman("manifest", "push", "-q", "--all", "multi", "oci:" + layout)
    want = podman.run("oci:" + layout)
    assert want == HOST[1] + "\n"
    out = str(tmp_path / "multi.img")
    r = build(hpcrun_bin, out, "--from", layout)
    assert r.returncode == 0, r.stderr
    r = run([hpcrun_bin, "run", "--cleanenv", out])
    assert (r.returncode, r.stdout) == (0, want), r.stderr
    r = build(hpcrun_bin, out, "--from", layout, "--platform", "/".join(p for p in OTHER if p))
    assert r.returncode == 0, r.stderr
    r = run([hpcrun_bin, "--cleanenv", out, "/bin/busybox", "cat", "/which"])
    assert r.stdout == OTHER[1] + "\n", r.stderr


# ---------------------------------------------------------------- corrupt indexes

def test_layout_of_several_images_without_platform_is_65(hpcrun_bin, tmp_path, tmpdir_env):
    # Two tags in one layout (skopeo copy ... oci:DIR:a, then oci:DIR:b): podman asks which; so does hpcrun.
    env, tmp = tmpdir_env
    lay = Layout(str(tmp_path / "oci"))
    descs = []
    for ref in ("a", "b"):
        d = lay.image([busybox_layer()], {"Env": ["PATH=/bin"]}, HOST[1], variant=HOST[2] or None)
        del d["platform"]
        d["annotations"] = {"org.opencontainers.image.ref.name": ref}
        descs.append(d)
    lay.index(descs)
    out = str(tmp_path / "x.img")
    r = build(hpcrun_bin, out, "--from", lay.path, env=env)
    one_error_line(r, 65, "the layout holds 2 images (a, b)")
    assert not os.path.exists(out) and os.listdir(str(tmp)) == []


@pytest.mark.parametrize("bad", ["path-digest", "not-a-list", "not-an-object"])
def test_hostile_index_is_one_line_65(hpcrun_bin, tmp_path, bad):
    lay = Layout(str(tmp_path / "oci"))
    desc = lay.image([busybox_layer()], {"Env": ["PATH=/bin"]}, HOST[1], variant=HOST[2] or None)
    if bad == "path-digest":          # a digest is a blob's name, never a path to follow
        desc["digest"] = "sha256:../../../../etc/passwd"
        manifests = [desc, desc]
    elif bad == "not-a-list":
        manifests = {"x": desc}
    else:
        manifests = ["x", desc]
    lay.index(manifests)
    out = str(tmp_path / "x.img")
    r = build(hpcrun_bin, out, "--from", lay.path)
    assert r.returncode == 65, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not os.path.exists(out)


def test_workdir_missing_in_the_image_is_66_and_pwd_wins(hpcrun_bin, tmp_path):
    # An image.json workdir with no such directory (not what a build makes: a
    # hand-made or altered image): `hpcrun run` does not start elsewhere silently.
    from imagetools import make_busybox_root, make_image
    root = str(tmp_path / "root")
    make_busybox_root(root, runscript=["/bin/pwd"], extra_meta={"workdir": "/nope"})
    out = make_image(root, str(tmp_path / "wd.img"))
    r = run([hpcrun_bin, "run", "--cleanenv", out])
    one_error_line(r, 66, "working directory not found in the container")
    r = run([hpcrun_bin, "run", "--cleanenv", "--pwd", "/tmp", out])
    assert (r.returncode, r.stdout) == (0, "/tmp\n"), r.stderr
