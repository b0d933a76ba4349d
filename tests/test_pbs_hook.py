"""plugins/pbs as files: what PBS's hook interpreter allows, and what install.sh
prints.  How the hooks behave is tested on a real PBS in test_pbs_e2e.py."""
import ast
import os
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK = os.path.join(REPO, "plugins", "pbs", "hpcrun_pbs_hook.py")
INSTALL = os.path.join(REPO, "plugins", "pbs", "install.sh")


def test_hook_source_is_self_contained():
    """PBS runs hooks isolated (no site-packages), at -OO, with __name__ == "builtins",
    and accept()/reject() raise SystemExit."""
    tree = ast.parse(open(HOOK).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
        assert not isinstance(node, ast.Assert), "asserts vanish under -OO"
        if isinstance(node, ast.ExceptHandler):
            assert node.type is not None, "a bare except swallows accept()/reject()"
            assert "BaseException" not in ast.dump(node.type) and "SystemExit" not in ast.dump(node.type)
        if isinstance(node, ast.Attribute):
            assert node.attr != "get_hook_config_file", "pbs.get_hook_config_file() does not exist"
        if isinstance(node, ast.Constant) and node.value == "__main__":
            pytest.fail("__name__ is 'builtins' in a PBS hook")
    assert imported - set(sys.stdlib_module_names) == {"pbs"}


def test_install_prints_a_resource_the_mom_receives():
    out = subprocess.run([INSTALL], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == "qmgr -c 'create resource container_image type=string,flag=m'"
    assert "qmgr -c 'set hook hpcrun_launch event=execjob_launch'" in lines
    out = subprocess.run([INSTALL, "--resource", "hpcrun_image"], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines()[0] == "qmgr -c 'create resource hpcrun_image type=string,flag=m'"


def test_install_quotes_the_files_it_imports(tmp_path):
    """An install tree under a path with blanks, quotes or non-ASCII: qmgr splits an
    unquoted file name at blanks (docs/pbs.md, Install)."""
    d = tmp_path / "hpcrun 0.1 'site'"
    shutil.copytree(os.path.dirname(INSTALL), d)
    out = subprocess.run([str(d / "install.sh")], capture_output=True, text=True, check=True).stdout
    line = [ln for ln in out.splitlines() if "hpcrun_submit application/x-python" in ln][0]
    assert shlex.split(line) == ["qmgr", "-c", 'import hook hpcrun_submit application/x-python default "%s"'
                                 % (d / "hpcrun_pbs_hook.py")], line
    for name in ('a"b', "données"):       # qmgr takes neither, quoted or not
        bad = tmp_path / name
        shutil.copytree(os.path.dirname(INSTALL), bad)
        p = subprocess.run([str(bad / "install.sh")], capture_output=True, text=True)
        assert p.returncode == 64 and p.stdout == "", p.stdout + p.stderr
        assert p.stderr.startswith("install.sh: error: qmgr cannot import") and name in p.stderr


def test_install_bad_usage():
    p = subprocess.run([INSTALL, "--bogus"], capture_output=True, text=True)
    assert p.returncode == 64 and p.stderr == "install.sh: error: unknown option (--bogus)\n"
    p = subprocess.run([INSTALL, "--config", "/nonexistent.json"], capture_output=True, text=True)
    assert p.returncode == 66 and p.stderr == "install.sh: error: file not readable (/nonexistent.json)\n"
