"""--nv without a GPU: a fake NVIDIA driver tree built here (stub libcuda.so.1 and
libnvidia-ml.so.1 compiled with gcc, registered in a private ld.so cache with
ldconfig -C, a fake nvidia-smi, device nodes made with mknod) proves discovery,
binds, library-path order and the glibc check."""
import os
import shutil
import subprocess

import pytest

import imagetools
from hpcrun import config, errors, gpu
from hpcrun.mpi import inject

NVLIB = "/.hpcrun/host/nv/lib"


def gcc(*args):
    subprocess.run(["gcc"] + list(args), check=True, capture_output=True)


def write(path, text, mode=None):
    with open(path, "w") as f:
        f.write(text)
    if mode:
        os.chmod(path, mode)
    return path


def build_driver(d, newer_glibc=False):
    """A fake driver 535.104.05 under d: lib/, bin/nvidia-smi, dev/nvidia0 (root only), ld.so.cache."""
    lib, bin_, dev = (os.path.join(d, x) for x in ("lib", "bin", "dev"))
    for x in (lib, bin_, dev):
        os.makedirs(x, exist_ok=True)
    src = write(os.path.join(d, "cuda.c"), 'const char *hpcrun_fake_driver(void) { return "host-driver"; }\n'
                                          'int cuDriverGetVersion(int *v) { *v = 12020; return 0; }\n')
    gcc("-shared", "-fPIC", "-o", os.path.join(lib, "libcuda.so.535.104.05"), "-Wl,-soname,libcuda.so.1", src)
    ml = write(os.path.join(d, "ml.c"), "int nvmlInit_v2(void) { return 0; }\n")
    extra = []
    if newer_glibc:
        # a "libc.so.6" defining GLIBC_2.99 to link against: the stub then needs a glibc nobody has
        fake = os.path.join(d, "fakec")
        os.makedirs(fake, exist_ok=True)
        c = write(os.path.join(d, "c.c"), "int fake_new_symbol(void) { return 0; }\n")
        v = write(os.path.join(d, "v.map"), "GLIBC_2.99 { global: fake_new_symbol; local: *; };\n")
        gcc("-shared", "-fPIC", "-nostdlib", "-o", os.path.join(fake, "libc.so.6"), "-Wl,-soname,libc.so.6",
            "-Wl,--version-script," + v, c)
        ml = write(os.path.join(d, "ml.c"), "extern int fake_new_symbol(void);\n"
                                            "int nvmlInit_v2(void) { return fake_new_symbol(); }\n")
        extra = [os.path.join(fake, "libc.so.6")]
    gcc("-shared", "-fPIC", "-o", os.path.join(lib, "libnvidia-ml.so.535.104.05"),
        "-Wl,-soname,libnvidia-ml.so.1", ml, *extra)
    write(os.path.join(bin_, "nvidia-smi"), "#!/bin/sh\necho 'NVIDIA-SMI 535.104.05 (fake)'\n", 0o755)
    conf = write(os.path.join(d, "ld.so.conf"), lib + "\n")
    cache = os.path.join(d, "ld.so.cache")
    subprocess.run(["ldconfig", "-C", cache, "-f", conf], check=True)
    if os.getuid() == 0:
        subprocess.run(["mknod", "-m", "666", os.path.join(dev, "nvidia0"), "c", "1", "3"], check=True)
        subprocess.run(["mknod", "-m", "666", os.path.join(dev, "nvidiactl"), "c", "1", "3"], check=True)
    return {"nv_ldcache": [cache], "nv_path": [bin_], "nv_devices": [os.path.join(dev, "nvidia*")]}


def cfg(values):
    return config.Config(values, [])


@pytest.fixture(scope="module")
def driver(shared_dir):
    d = os.path.join(shared_dir, "gpu-fake-driver")
    values = build_driver(d)
    values["dir"] = d
    return values


@pytest.fixture(scope="module")
def glibc_root(shared_dir):
    root = os.path.join(shared_dir, "gpu-glibc-root")
    imagetools.make_busybox_root(root)
    imagetools.add_host_program(root, "/bin/true")
    return root


def test_discovery_binds_and_order(driver, glibc_root):
    values = {k: v for k, v in driver.items() if k != "dir"}
    found = gpu.discover(cfg(values))
    assert set(found["libs"]) == {"libcuda.so.1", "libnvidia-ml.so.1"}
    assert found["source"] == "list"
    # an MPI host dir already on the path: the driver's directory goes in front of it
    plan = {"binds": [], "ld_library_path_prepend": ["/.hpcrun/host/lib"]}
    gpu.prepare(plan, glibc_root, cfg(values))
    binds = {b["dst"]: b for b in plan["binds"]}
    assert binds[NVLIB + "/libcuda.so.1"]["src"] == os.path.join(driver["dir"], "lib/libcuda.so.535.104.05")
    assert binds[NVLIB + "/libcuda.so.1"]["ro"]
    assert NVLIB + "/libnvidia-ml.so.1" in binds
    smi = os.path.join(driver["dir"], "bin/nvidia-smi")
    assert binds[smi]["src"] == smi
    if os.getuid() == 0:
        devs = [b for b in plan["binds"] if b["why"].startswith("GPU device")]
        assert sorted(os.path.basename(b["dst"]) for b in devs) == ["nvidia0", "nvidiactl"]
        assert not any(b["ro"] for b in devs)
    assert plan["ld_library_path_prepend"] == [NVLIB, "/.hpcrun/host/lib"]
    assert not any(b["dst"].endswith("/libc.so.6") for b in plan["binds"])
    assert any("2 driver libraries" in n and "535.104.05" in n for n in plan["notes"])
    assert gpu.driver_version(cfg(values)) == "535.104.05"


def test_same_path_under_a_host_bind_is_not_bound_twice(driver, glibc_root):
    values = {k: v for k, v in driver.items() if k != "dir"}
    plan = {"binds": [{"src": driver["dir"], "dst": driver["dir"], "ro": False, "why": "user"}]}
    gpu.prepare(plan, glibc_root, cfg(values))
    assert not any(b["why"].startswith(("GPU device", "GPU driver file")) for b in plan["binds"])
    assert any(b["dst"] == NVLIB + "/libcuda.so.1" for b in plan["binds"])


def test_driver_needing_newer_glibc_is_refused(tmp_path, glibc_root):
    values = build_driver(str(tmp_path), newer_glibc=True)
    with pytest.raises(errors.Error) as e:
        gpu.prepare({}, glibc_root, cfg(values))
    assert e.value.code == errors.MPI_ABI
    assert "GLIBC_2.99" in e.value.what and "glibc is %s" % inject.image_glibc(glibc_root) in e.value.what
    assert e.value.subject.endswith("libnvidia-ml.so.535.104.05")


def test_no_driver_warns_and_goes_on(tmp_path, glibc_root, capfd):
    empty = tmp_path / "ld.so.conf"
    empty.write_text(str(tmp_path) + "\n")
    cache = str(tmp_path / "ld.so.cache")
    subprocess.run(["ldconfig", "-C", cache, "-f", str(empty)], check=True)
    values = {"nv_ldcache": [cache], "nv_path": [str(tmp_path)], "nv_devices": [str(tmp_path / "nvidia*")]}
    plan = {}
    gpu.prepare(plan, glibc_root, cfg(values))
    err = capfd.readouterr().err
    assert err.count("hpcrun: warning: --nv: no NVIDIA driver") == 1
    assert not plan.get("binds") and not plan.get("ld_library_path_prepend")
    assert gpu.driver_version(cfg(values)) is None


def test_enabled_sources():
    off = cfg({})
    assert not gpu.enabled(False, {}, off)
    assert gpu.enabled(True, {}, off)
    assert gpu.enabled(False, {"HPCRUN_NV": "1"}, off)
    assert gpu.enabled(False, {}, cfg({"nv": ["always"]}))


def test_admin_extra_entries(driver, glibc_root, tmp_path):
    tool = tmp_path / "nvidia-extra-tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    icd = tmp_path / "nvidia_icd.json"
    icd.write_text("{}")
    values = {k: v for k, v in driver.items() if k != "dir"}
    values["nv_extra"] = ["nvidia-extra-tool, %s /etc/vulkan/icd.d/nvidia_icd.json" % icd]
    values["nv_path"] = [driver["nv_path"][0] + ":" + str(tmp_path)]
    plan = {}
    gpu.prepare(plan, glibc_root, cfg(values))
    binds = {b["dst"]: b["src"] for b in plan["binds"]}
    assert binds["/etc/vulkan/icd.d/nvidia_icd.json"] == str(icd)
    assert binds[str(tool)] == str(tool)


# ------------------------------------------------------- inside a real image ---

PROBE_C = r"""#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
/* probe LIB SYMBOL: dlopen the driver library as a CUDA/ROCm runtime would, call SYMBOL. */
int main(int argc, char **argv) {
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) { printf("dlopen failed: %s\n", dlerror()); return 1; }
    Dl_info info;
    const char *(*f)(void) = (const char *(*)(void))dlsym(h, argv[2]);
    if (!f) { printf("dlsym failed\n"); return 1; }
    dladdr((void *)f, &info);
    printf("%s from %s\n", f(), info.dli_fname);
    return 0;
}
"""


@pytest.fixture(scope="module")
def gpu_image(shared_dir, glibc_root):
    """busybox + glibc + a probe program, and a stale libcuda.so.1 of the image's own
    (it must lose to the host's driver)."""
    d = os.path.join(shared_dir, "gpu-image")
    os.makedirs(d, exist_ok=True)
    probe = os.path.join(d, "probe")
    gcc("-o", probe, write(os.path.join(d, "probe.c"), PROBE_C), "-ldl")
    root = os.path.join(d, "root")
    shutil.copytree(glibc_root, root, symlinks=True, dirs_exist_ok=True)
    imagetools.add_host_program(root, probe)
    os.makedirs(os.path.join(root, "app"), exist_ok=True)
    shutil.copy2(probe, os.path.join(root, "app/probe"))
    stale = write(os.path.join(d, "stale.c"), 'const char *hpcrun_fake_driver(void) { return "stale-image-copy"; }\n')
    gcc("-shared", "-fPIC", "-o", os.path.join(root, "usr/lib/x86_64-linux-gnu/libcuda.so.1"),
        "-Wl,-soname,libcuda.so.1", stale)
    return imagetools.make_image(root, os.path.join(d, "gpu.img"))


def _site_conf(path, values):
    with open(path, "w") as f:
        for k, v in values.items():
            if k != "dir":
                f.write("%s = %s\n" % (k, ", ".join(v)))
    os.chmod(path, 0o644)
    return path


@pytest.mark.parametrize("who", ["root", "user"])
def test_nv_inside_a_real_image(who, driver, gpu_image, hpcrun_bin, as_user, shared_dir, request):
    conf = _site_conf(os.path.join(shared_dir, "gpu-nv.conf"), driver)
    # tools and device nodes are bound at their host paths (/usr/bin/nvidia-smi, /dev/nvidia0 on a real node)
    dev = os.path.join(driver["dir"], "dev")
    script = ("/app/probe libcuda.so.1 hpcrun_fake_driver; %s/bin/nvidia-smi; echo LD=$LD_LIBRARY_PATH; "
              "ls %s/nvidia0 %s/nvidiactl 2>&1" % (driver["dir"], dev, dev))
    argv = [hpcrun_bin, "--nv", gpu_image, "sh", "-c", script]
    env = {"HPCRUN_CONF": conf, "HPCRUN_LINGER": "0", "CUDA_VISIBLE_DEVICES": "0"}
    if who == "root":
        r = subprocess.run(argv, env=dict(os.environ, **env), capture_output=True, text=True, timeout=120, cwd="/")
    else:
        # GPU wiring is site configuration: a user's HPCRUN_CONF cannot set it
        with open(conf) as f:
            site = request.getfixturevalue("site_config")(f.read())
        del env["HPCRUN_CONF"]
        r = as_user(["env"] + ["%s=%s" % kv for kv in env.items()] + argv, cwd="/", prefix=site)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    # the host's driver wins over the image's stale copy: its directory comes first on the path
    assert lines[0] == "host-driver from %s/libcuda.so.1" % NVLIB
    assert lines[1] == "NVIDIA-SMI 535.104.05 (fake)"
    assert lines[2].startswith("LD=" + NVLIB)
    if who == "root":        # mknod'ed as root only
        assert lines[3:] == [dev + "/nvidia0", dev + "/nvidiactl"]


def test_nv_without_a_driver_warns_once_and_runs(gpu_image, hpcrun_bin, tmp_path):
    conf = _site_conf(str(tmp_path / "nodriver.conf"), {"nv_ldcache": [str(tmp_path / "none.cache")],
                                                        "nv_path": [str(tmp_path)]})
    r = subprocess.run([hpcrun_bin, "--nv", gpu_image, "/app/probe", "libcuda.so.1", "hpcrun_fake_driver"],
                       env=dict(os.environ, HPCRUN_CONF=conf, HPCRUN_LINGER="0"), capture_output=True, text=True,
                       timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("stale-image-copy")           # the job still runs, on what the image has
    assert r.stderr.count("hpcrun: warning: --nv: no NVIDIA driver") == 1


def test_rocm_inside_a_real_image(gpu_image, hpcrun_bin, tmp_path):
    """--rocm takes the same data-driven path: hsa runtime and rocm-smi from a fake tree, /dev/kfd."""
    lib, bin_ = tmp_path / "lib", tmp_path / "bin"
    lib.mkdir()
    bin_.mkdir()
    src = write(str(tmp_path / "hsa.c"), 'const char *hpcrun_fake_driver(void) { return "host-rocm"; }\n')
    gcc("-shared", "-fPIC", "-o", str(lib / "libhsa-runtime64.so.1.11.0"), "-Wl,-soname,libhsa-runtime64.so.1", src)
    os.symlink("libhsa-runtime64.so.1.11.0", str(lib / "libhsa-runtime64.so"))
    write(str(bin_ / "rocm-smi"), "#!/bin/sh\necho 'ROCm SMI (fake)'\n", 0o755)
    cache = str(tmp_path / "ld.so.cache")
    subprocess.run(["ldconfig", "-C", cache, "-f", write(str(tmp_path / "ld.so.conf"), str(lib) + "\n")], check=True)
    kfd = str(tmp_path / "kfd")
    subprocess.run(["mknod", "-m", "666", kfd, "c", "1", "3"], check=True)
    conf = _site_conf(str(tmp_path / "rocm.conf"), {"rocm_ldcache": [cache], "rocm_path": [str(bin_)],
                                                    "rocm_devices": [kfd]})
    r = subprocess.run([hpcrun_bin, "--rocm", gpu_image, "sh", "-c",
                        "/app/probe libhsa-runtime64.so.1 hpcrun_fake_driver; %s/rocm-smi; test -c %s && echo dev" % (bin_, kfd)],
                       env=dict(os.environ, HPCRUN_CONF=conf, HPCRUN_LINGER="0"), capture_output=True, text=True,
                       timeout=120, cwd="/")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["host-rocm from /.hpcrun/host/rocm/lib/libhsa-runtime64.so.1",
                                     "ROCm SMI (fake)", "dev"]
