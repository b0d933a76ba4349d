"""Images pinned at submission: `hpcrun --image-digest` and HPCRUN_IMAGE_DIGEST.

A job waits in the queue while its user rebuilds the image; it must run the
image that was submitted or fail at once, 65, with one line naming both
identities, before anything is mounted.  The Slurm and PBS plugins record the
identity at submission (tests/test_slurm.py, tests/test_pbs_e2e.py); here
the launcher's side, as the unprivileged test user, on real images.
"""
import json
import os
import shutil
import tempfile

import pytest

from checks import assert_one_error  # noqa: E402

import imagetools

SIF = "/work/shared/data/sif/one-group.sif"


@pytest.fixture
def work(shared_dir):
    d = tempfile.mkdtemp(prefix="pin-", dir=shared_dir)
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def build(root, out, marker):
    """(Re)build an hpcrun image of `root` whose /etc/build-marker says `marker`."""
    os.makedirs(os.path.join(root, "etc"), exist_ok=True)
    with open(os.path.join(root, "etc", "build-marker"), "w") as f:
        f.write(marker + "\n")
    return imagetools.make_image(root, out)


@pytest.fixture
def rebuilt(work, busybox_root):
    """An image path, its identity as first built, and a function that rebuilds it."""
    root = os.path.join(work, "root")
    shutil.copytree(busybox_root, root, symlinks=True)
    img = build(root, os.path.join(work, "app.img"), "first")
    return img, root


@pytest.fixture
def inspect_pin(as_user, hpcrun_bin):
    return lambda img: _inspect_pin(as_user, hpcrun_bin, img)


def _inspect_pin(as_user, hpcrun_bin, img):
    r = as_user([hpcrun_bin, "inspect", "--json", img])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["pin"]


def mounts_of(path):
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if path in line]


def test_the_pinned_image_runs(as_user, inspect_pin, hpcrun_bin, rebuilt):
    img, _ = rebuilt
    pin = inspect_pin(img)
    assert pin.startswith("sha256:") and len(pin) == 71
    r = as_user([hpcrun_bin, "--image-digest", pin, img, "cat", "/etc/build-marker"])
    assert (r.returncode, r.stdout) == (0, "first\n"), r.stderr
    r = as_user([hpcrun_bin, img, "cat", "/etc/build-marker"], env={"HPCRUN_IMAGE_DIGEST": pin})
    assert (r.returncode, r.stdout) == (0, "first\n"), r.stderr


def test_a_rebuilt_image_fails_naming_both_digests(as_user, inspect_pin, hpcrun_bin, rebuilt, work):
    img, root = rebuilt
    pinned = inspect_pin(img)
    build(root, img, "second")
    now = inspect_pin(img)
    assert now != pinned
    for argv, env in (([hpcrun_bin, "--image-digest", pinned, img, "cat", "/etc/build-marker"], None),
                      ([hpcrun_bin, img, "cat", "/etc/build-marker"], {"HPCRUN_IMAGE_DIGEST": pinned}),
                      ([hpcrun_bin, img, "true"], {"HPCRUN_IMAGE_DIGEST": pinned,
                                                   "HPCRUN_IMAGE_DIGEST_PATH": img})):
        r = as_user(argv, env=env)
        assert_one_error(r, 65, "not the one pinned at submission", "pinned " + pinned, "now " + now, img)
        assert r.stdout == ""
    # refused before anything was mounted or staged: nothing of this image anywhere
    assert mounts_of(work) == []
    assert keepers_of(img) == []


def keepers_of(path):
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/comm" % pid) as f:
                if f.read().strip() != "hpcrun-keeper":
                    continue
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                if path.encode() in f.read():
                    out.append(pid)
        except OSError:
            continue
    return out


def test_the_option_wins_over_the_environment(as_user, inspect_pin, hpcrun_bin, rebuilt):
    img, _ = rebuilt
    pin = inspect_pin(img)
    stale = "sha256:" + "0" * 64
    r = as_user([hpcrun_bin, "--image-digest", pin, img, "true"], env={"HPCRUN_IMAGE_DIGEST": stale})
    assert r.returncode == 0, r.stderr
    r = as_user([hpcrun_bin, "--image-digest", stale, img, "true"], env={"HPCRUN_IMAGE_DIGEST": pin})
    assert_one_error(r, 65, "pinned " + stale)


def test_the_environment_pin_is_for_the_image_it_names(as_user, inspect_pin, hpcrun_bin, rebuilt,
                                                        busybox_image):
    """A job pinned to its submitted image may still launch another image."""
    img, _ = rebuilt
    pin = inspect_pin(img)
    env = {"HPCRUN_IMAGE_DIGEST": pin, "HPCRUN_IMAGE_DIGEST_PATH": img}
    r = as_user([hpcrun_bin, busybox_image, "true"], env=env)
    assert r.returncode == 0, r.stderr
    r = as_user([hpcrun_bin, busybox_image, "true"], env={"HPCRUN_IMAGE_DIGEST": pin})
    assert_one_error(r, 65, "pinned " + pin, busybox_image)


@pytest.mark.parametrize("value", ["abc", "sha256:", "sha256:" + "A" * 64, "sha256:" + "0" * 63,
                                   "md5:" + "0" * 32, "sha256:" + "0" * 64 + "\n", "sif:00"])
def test_a_malformed_digest_is_a_usage_error(as_user, hpcrun_bin, busybox_image, value):
    r = as_user([hpcrun_bin, "--image-digest", value, busybox_image, "true"])
    assert_one_error(r, 64, "--image-digest must be sha256:")
    r = as_user([hpcrun_bin, busybox_image, "true"], env={"HPCRUN_IMAGE_DIGEST": value})
    assert_one_error(r, 64, "HPCRUN_IMAGE_DIGEST must be sha256:")


def test_an_empty_environment_value_pins_nothing(as_user, hpcrun_bin, busybox_image):
    r = as_user([hpcrun_bin, busybox_image, "true"], env={"HPCRUN_IMAGE_DIGEST": ""})
    assert r.returncode == 0, r.stderr


def test_plain_squashfs_is_pinned_by_its_superblock(as_user, inspect_pin, hpcrun_bin, work, busybox_root):
    root = os.path.join(work, "root")
    shutil.copytree(busybox_root, root, symlinks=True)
    sq = imagetools.mksquashfs(root, os.path.join(work, "app.sqfs"))
    pin = inspect_pin(sq)
    assert pin.startswith("squashfs:") and len(pin) == len("squashfs:") + 192
    r = as_user([hpcrun_bin, "--image-digest", pin, sq, "true"])
    assert r.returncode == 0, r.stderr
    with open(os.path.join(root, "new-file"), "w") as f:    # a rebuild with one more file
        f.write("x\n")
    imagetools.mksquashfs(root, sq)
    now = inspect_pin(sq)
    assert now != pin
    r = as_user([hpcrun_bin, "--image-digest", pin, sq, "true"])
    assert_one_error(r, 65, "pinned " + pin, "now " + now)


def test_sif_is_pinned_by_its_header(as_user, inspect_pin, hpcrun_bin, work):
    sif = os.path.join(work, "app.sif")
    shutil.copy(SIF, sif)
    os.chmod(sif, 0o644)
    pin = inspect_pin(sif)
    assert pin.startswith("sif:") and len(pin) == len("sif:") + 160
    r = as_user([hpcrun_bin, "--image-digest", pin, "--dry-run", sif, "true"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["image"]["pin"] == pin
    # another build has another ID (a UUID at byte 48 of the global header)
    with open(sif, "r+b") as f:
        f.seek(48)
        uid = f.read(16)
        f.seek(48)
        f.write(bytes(b ^ 0xFF for b in uid))
    r = as_user([hpcrun_bin, "--image-digest", pin, sif, "true"])
    assert_one_error(r, 65, "pinned " + pin, "now sif:")


def test_a_directory_image_has_nothing_to_pin(as_user, hpcrun_bin, busybox_root):
    r = as_user([hpcrun_bin, "--image-digest", "sha256:" + "0" * 64, busybox_root, "true"])
    assert_one_error(r, 65, "a directory image has no digest to pin")
