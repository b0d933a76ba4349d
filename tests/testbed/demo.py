"""`make demo-slurm`: a two-node Slurm on loopback runs a job script whose
tasks execute inside an hpcrun image.

    #!/bin/sh
    #SBATCH -N2 --ntasks-per-node=2
    #SBATCH --container=demo.img
    srun ...

Needs root (it starts munged, slurmctld and slurmd), the built plugin
(`make plugins`) and a source checkout (the image is made with tests/imagetools.py).
Run as `python tests/testbed/demo.py` or, from tests/, `python -m testbed.demo`.
"""
import os
import shutil
import subprocess
import sys
import tempfile

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
if TESTS not in sys.path:   # the test bed is a plain directory beside the tests, not installed
    sys.path.insert(0, TESTS)

from testbed import slurm  # noqa: E402
from testbed.cluster import Cluster  # noqa: E402
PLUGIN = os.path.join(ROOT, "plugins", "slurm", "spank_hpcrun.so")
CLI_FILTER = os.path.join(ROOT, "plugins", "slurm", "cli_filter.lua")

SCRIPT = """#!/bin/sh
#SBATCH -N2 --ntasks-per-node=2
#SBATCH --container=demo.img
echo "batch script on the host: $(grep ^PRETTY_NAME /etc/os-release)"
srun -l sh -c 'echo "task $SLURM_PROCID on $SLURMD_NODENAME in: $(grep ^PRETTY_NAME /etc/os-release)"'
"""


def main():
    if os.getuid() != 0:
        sys.exit("demo-slurm: run as root (it starts munged, slurmctld and slurmd)")
    if not os.path.exists(PLUGIN):
        sys.exit("demo-slurm: %s missing: run `make plugins`" % PLUGIN)
    hpcrun = (os.environ.get("HPCRUN_SLURM_TEST_HPCRUN")     # another hpcrun install, same plugin
              or os.path.join(os.path.dirname(sys.executable), "hpcrun"))
    import imagetools

    work = tempfile.mkdtemp(prefix="hpcrun-demo-slurm-")
    try:
        os.chmod(work, 0o755)
        imagetools.make_busybox_root(os.path.join(work, "root"))
        imagetools.make_image(os.path.join(work, "root"), os.path.join(work, "demo.img"))
        with open(os.path.join(work, "job.sh"), "w") as f:
            f.write(SCRIPT)
        print("== job.sh ==\n" + SCRIPT)
        with Cluster(nodes=2, cpus=4, plugin=PLUGIN, plugin_args=["hpcrun=" + hpcrun],
                     cli_filter=CLI_FILTER, shared=[work]) as c:
            print("== cluster up: %s (slurm.py backend: %s) ==" % (
                " ".join("%s=%s" % kv for kv in sorted(c.node_states().items())), slurm.backend(c.env())))
            jid = slurm.submit(open(os.path.join(work, "job.sh")).read(), ["-o", "job.out"],
                               env=c.env(), cwd=work)
            info = slurm.wait(jid, timeout=180, env=c.env())
            print("== job %d: %s, exit code %s ==" % (jid, info["state"], info["exit_code"]))
            print(open(os.path.join(work, "job.out")).read())
            print("== a bad image is refused at submission ==")
            r = subprocess.run(["sbatch", "--container=nope.img", "--wrap=true"], env=c.env(), cwd=work,
                               capture_output=True, text=True)
            print("$ sbatch --container=nope.img ...  (exit %d)\n%s" % (r.returncode, r.stderr))
            return 0 if info["state"] == "COMPLETED" else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
