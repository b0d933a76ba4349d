"""An emulation of the parts of PBS that the hpcrun PBS hook meets.

pylib/pbs/   the `pbs` module hooks import (the only non-stdlib module they see)
runner.py    pbs_python: runs a hook file isolated (-I -S -OO), with an alarm
harness.py   run_hook(): one event through one hook, outcome as PBS reads it
server.py    qmgr (resources, hooks), qsub (directive parsing), qalter
mom.py       execjob_launch and the real start of the job shell / TM tasks
"""
