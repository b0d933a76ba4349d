"""Test beds for scheduler integration: a real Slurm on loopback (cluster.py), `make demo-slurm` (demo.py)."""
