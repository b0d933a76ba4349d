"""Test beds for scheduler integration, kept out of the launcher's package.

slurm.py submits and follows Slurm jobs, cluster.py runs a real Slurm on
loopback, demo.py is `make demo-slurm`; pbs.py builds and runs a real OpenPBS,
pbs_demo.py is `make demo-pbs`.  Tests, demos and benchmarks put tests/
on sys.path and import ``testbed.cluster``, ``testbed.slurm`` ...
"""
