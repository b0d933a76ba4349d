"""The PBS emulation behaves like PBS where hooks can tell (shared/reference/pbs.md).

Each pitfall of the reference is shown here on a small hook of its own; the
hpcrun hook's side of the same pitfalls is in test_pbs_hook.py.
"""
import os
import pwd
import textwrap

import pytest

from pbs_emulation import harness, server
from pbs_emulation.fixtures import *  # noqa: F401,F403


def run_src(tmp_path, source, event="queuejob", **kw):
    hook = tmp_path / "hook.py"
    hook.write_text(textwrap.dedent(source))
    os.chmod(hook, 0o644)
    kw.setdefault("config", None)
    return harness.run_hook(event, hook=str(hook), **kw)


def queued(resources=None, variables="PBS_O_WORKDIR=/tmp"):
    return {"id": "", "attrs": {"Resource_List": resources or {}, "Variable_List": variables}}


def logged(result):
    return [m for _, m in result.log]


# --- accept / reject ------------------------------------------------------------
def test_bare_except_swallows_reject_but_the_decision_stands(tmp_path):
    r = run_src(tmp_path, """
        import pbs
        e = pbs.event()
        try:
            e.reject("no container for you")
        except:
            pass
        pbs.logmsg(pbs.LOG_DEBUG, "still running after reject")
        e.accept()
    """, job=queued())
    assert r.rejected and r.reject_msg == "no container for you"
    assert "still running after reject" in logged(r)
    assert r.user_message == "qsub: no container for you"


def test_event_is_frozen_after_accept(tmp_path):
    r = run_src(tmp_path, """
        import pbs
        e = pbs.event()
        try:
            e.accept()
        except SystemExit:
            pass
        try:
            e.job.Resource_List["ncpus"] = 4
        except AssertionError as err:
            pbs.logmsg(pbs.LOG_DEBUG, "frozen: %s" % err)
    """, job=queued())
    assert r.accepted
    assert any(m.startswith("frozen: Not permitted to modify") for m in logged(r))
    assert "ncpus" not in r.job["Resource_List"]


def test_falling_off_the_end_accepts_and_exit_code_does_not_decide(tmp_path):
    assert run_src(tmp_path, "x = 1\n", job=queued()).accepted
    r = run_src(tmp_path, "import pbs\npbs.event().accept(7)\n", job=queued())
    assert r.accepted


def test_exception_and_alarm_messages(tmp_path):
    r = run_src(tmp_path, "raise ValueError('oops')\n", job=queued(), hook_name="h1")
    assert r.rejected
    assert r.user_message == ("qsub: request rejected as filter hook 'h1' encountered an "
                              "exception. Please inform Admin")
    r = run_src(tmp_path, """
        import time
        try:
            time.sleep(20)
        except Exception:
            pass
    """, job=queued(), hook_name="slow", alarm=1)
    assert r.alarm and r.rejected
    assert r.user_message == "qsub: request rejected as filter hook 'slow' got an alarm call. Please inform Admin"


def test_reject_message_is_cut(tmp_path):
    r = run_src(tmp_path, "import pbs\npbs.event().reject('x' * 5000)\n", job=queued())
    assert len(r.reject_msg) == 3171


def test_mom_reject_message_only_reaches_the_log(tmp_path):
    r = run_src(tmp_path, "import pbs\npbs.event().reject('bad node')\n", event="execjob_launch",
                job={"id": "1.s", "attrs": {}}, progname="/bin/sh", argv=[], env={"PBS_TASKNUM": "1"})
    assert r.rejected and r.user_message is None and r.mom_log_message == "bad node"


# --- isolation ------------------------------------------------------------------
def test_asserts_are_stripped(tmp_path):
    r = run_src(tmp_path, """
        import pbs
        assert False, "never seen"
        pbs.logmsg(pbs.LOG_DEBUG, "after assert; doc=%r" % (pbs.logmsg.__doc__,))
    """, job=queued())
    assert r.accepted and logged(r) == ["after assert; doc=None"]


@pytest.mark.parametrize("module", ["hpcrun", "pytest", "psutil"])
def test_only_the_stdlib_is_importable(tmp_path, module):
    r = run_src(tmp_path, "import %s\n" % module, job=queued())
    assert r.rejected and "ModuleNotFoundError" in r.exception


def test_fresh_namespace(tmp_path):
    r = run_src(tmp_path, """
        import pbs
        pbs.logmsg(pbs.LOG_DEBUG, "%s %s" % (__name__, sorted(k for k in globals() if k != "pbs")))
    """, job=queued())
    assert logged(r) == ["builtins ['__builtins__', '_pbs_v1', '__name__']"] or \
        logged(r) == ["builtins ['__builtins__', '__name__', '_pbs_v1']"]


def test_no_get_hook_config_file_and_config_named_cf(tmp_path):
    r = run_src(tmp_path, """
        import pbs
        pbs.logmsg(pbs.LOG_DEBUG, pbs.hook_config_filename)
        pbs.logmsg(pbs.LOG_DEBUG, open(pbs.hook_config_filename).read())
        pbs.get_hook_config_file()
    """, job=queued(), config='{"a": 1}', hook_name="myhook")
    assert logged(r)[0].endswith("/myhook.CF") and logged(r)[1] == '{"a": 1}'
    assert r.rejected and "AttributeError" in r.exception and "get_hook_config_file" in r.exception


# --- event, job, resources, env -----------------------------------------------------
def test_event_params(tmp_path):
    r = run_src(tmp_path, """
        import pbs
        e = pbs.event()
        out = [e.type == pbs.QUEUEJOB, pbs.HOOK_EVENT_QUEUEJOB, e.requestor, repr(e.job.id),
               hasattr(e, "job_o"), hasattr(e, "progname")]
        for attempt in ("e.job = None", "e.bogus = 1", "e.job.bogus = 1", "e.job.rerun()",
                        "e.job.Variable_List = {}", "e.job.Variable_List['PBS_O_WORKDIR'] = '/x'"):
            try:
                exec(attempt)
                out.append("ok")
            except Exception as err:
                out.append("%s: %s" % (type(err).__name__, err))
        pbs.logmsg(pbs.LOG_DEBUG, repr(out))
    """, job=queued(), requestor="alice")
    out = eval(logged(r)[0])
    assert out[:6] == [True, 1, "alice", "''", False, False]
    assert out[6] == "BadAttributeValueError: event attribute 'job' is readonly"
    assert out[7].startswith("UnsetAttributeNameError")
    assert out[8] == "UnsetAttributeNameError: job attribute 'bogus' not found"
    assert out[9] == "NotImplementedError: rerun(): only for mom hooks"
    assert out[10] == "BadAttributeValueError: attribute 'Variable_List' cannot be directly set."
    assert out[11] == "BadAttributeValueError: env variable 'PBS_O_WORKDIR' is readonly"


def test_unset_resource_is_none_but_in_is_true(tmp_path):
    r = run_src(tmp_path, """
        import pbs
        R = pbs.event().job.Resource_List
        pbs.logmsg(pbs.LOG_DEBUG, repr([R["container_image"], "container_image" in R, R.keys(),
                                        R["NCPUS"], R.ncpus]))
        try:
            R["undefined_thing"] = "x"
        except pbs.UnsetResourceNameError:
            pbs.logmsg(pbs.LOG_DEBUG, "undefined refused")
    """, job=queued({"ncpus": "2"}))
    assert eval(logged(r)[0]) == [None, True, ["ncpus"], "2", "2"]
    assert logged(r)[1] == "undefined refused"


def test_mom_hook_may_set_undefined_resource(tmp_path):
    r = run_src(tmp_path, """
        import pbs
        pbs.event().job.Resource_List["site_thing"] = "x"
    """, event="execjob_begin", job={"id": "1.s", "attrs": {"Resource_List": {}}})
    assert r.accepted and r.job["Resource_List"] == {"site_thing": "x"}


def test_env_serialisation_escapes_commas(tmp_path):
    r = run_src(tmp_path, """
        import pbs
        e = pbs.event()
        e.env["NEW"] = "a,b"
        e.env["PBS_JOBID"] = "generic env: writable"
    """, event="execjob_launch", job={"id": "1.s", "attrs": {}}, progname="/bin/sh", argv=[],
        env="PATH=/bin,LIST=x\\,y,PBS_TASKNUM=1,PBS_JOBID=1.s")
    assert r.env_str == "PATH=/bin,LIST=x\\,y,PBS_TASKNUM=1,PBS_JOBID=generic env: writable,NEW=a\\,b"
    assert r.env() == {"PATH": "/bin", "LIST": "x,y", "PBS_TASKNUM": "1",
                       "PBS_JOBID": "generic env: writable", "NEW": "a,b"}


def test_plain_dict_assigned_to_env_breaks_the_job_environment(tmp_path):
    r = run_src(tmp_path, """
        import pbs
        e = pbs.event()
        e.env = {"HPCRUN_IMAGE": "/x.img", "PATH": "/bin"}
    """, event="execjob_launch", job={"id": "1.s", "attrs": {}}, progname="/bin/sh", argv=[],
        env={"PATH": "/bin", "PBS_JOBCOOKIE": "c", "PBS_TASKNUM": "1"})
    env = r.env()
    assert "PATH" not in env and "PBS_JOBCOOKIE" not in env and "HPCRUN_IMAGE" not in env


def test_int_of_hex_tasknum_fails(tmp_path):
    r = run_src(tmp_path, """
        import pbs
        int(pbs.event().env["PBS_TASKNUM"])
    """, event="execjob_launch", job={"id": "1.s", "attrs": {}}, progname="/usr/bin/orted",
        argv=["/usr/bin/orted"], env={"PBS_TASKNUM": "%8.8X" % 10})
    assert r.rejected and "ValueError" in r.exception


# --- mom: how the job shell is started ----------------------------------------------
def test_job_shell_argv0_env_and_stdin(tmp_path, pbs_server, pbs_mom, test_user, pub_dir):
    pbs_server.hooks["h"] = {"event": ["execjob_launch"], "order": 1, "alarm": 30, "enabled": True,
                             "config": None, "script": textwrap.dedent("""
        import pbs
        e = pbs.event()
        e.env["FROM_HOOK"] = "1"
        e.argv = ["ignored-argv0", "-s", "first", "second"]
    """)}
    os.chown(pub_dir, test_user.pw_uid, test_user.pw_gid)
    r = submit_job(pbs_server, "#!/bin/sh\n#PBS -N shellcheck\n"
                   # the shell runs the script path it reads on stdin: its parent is the job shell
                   'echo "0=$0 hook=$FROM_HOOK task=$PBS_TASKNUM id=$(id -un)"\n'
                   "tr '\\0' ' ' </proc/$PPID/cmdline\n",
                   test_user, pub_dir)
    assert r.rc == 0, r.err
    run = pbs_mom.run_job(r.jobid)
    assert run.exit_status == 0, run.stderr
    shell = os.path.basename(test_user.pw_shell)
    assert run.argv == ["-" + shell, "-s", "first", "second"]
    line1, line2 = run.stdout.splitlines()
    assert line1 == "0=%s hook=1 task=1 id=%s" % (pbs_server.jobs[r.jobid]["script_path"],
                                                  test_user.pw_name)
    assert line2.split() == ["-" + shell, "-s", "first", "second"]


def test_relative_progname_is_not_searched_in_path(pbs_server, pbs_mom, test_user, pub_dir):
    pbs_server.hooks["h"] = {"event": ["execjob_launch"], "order": 1, "alarm": 30, "enabled": True,
                             "config": None,
                             "script": "import pbs\npbs.event().progname = 'sh'\n"}
    os.chown(pub_dir, test_user.pw_uid, test_user.pw_gid)
    r = submit_job(pbs_server, "echo hi\n", test_user, pub_dir)
    run = pbs_mom.run_job(r.jobid)
    assert run.exit_status is None and "No such file" in run.exec_error


def test_launch_hooks_cascade_in_order(pbs_server, pbs_mom, test_user, pub_dir):
    for name, order, src in (("second", 2, "e.env['ORDER'] = e.env['ORDER'] + ',second'"),
                             ("first", 1, "e.env['ORDER'] = 'first'")):
        pbs_server.hooks[name] = {"event": ["execjob_launch"], "order": order, "alarm": 30,
                                  "enabled": True, "config": None,
                                  "script": "import pbs\ne = pbs.event()\n" + src + "\n"}
    os.chown(pub_dir, test_user.pw_uid, test_user.pw_gid)
    r = submit_job(pbs_server, 'echo "order=$ORDER"\n', test_user, pub_dir)
    run = pbs_mom.run_job(r.jobid)
    assert "order=first,second" in run.stdout


def test_tm_task_argv_kept_and_tasknum_hex(pbs_server, pbs_mom, test_user, pub_dir):
    os.chown(pub_dir, test_user.pw_uid, test_user.pw_gid)
    r = submit_job(pbs_server, "true\n", test_user, pub_dir)
    run = pbs_mom.launch_tm_task(r.jobid, ["sh", "-c", 'echo "$0 $PBS_TASKNUM $SPAWNER"'],
                                 spawner_env={"SPAWNER": "mpiexec"}, tasknum=10)
    assert run.exit_status == 0 and run.stdout == "sh 0000000A mpiexec\n"


# --- qsub directives --------------------------------------------------------------------
def parse(script, args=(), env=None):
    return server.parse_submission(script, list(args), env or {})


def test_directives_stop_at_first_executable_line():
    script = ("#!/bin/sh\n: colon line\n\n   # comment\n#PBS -l ncpus=2\n  #PBS -N indented\n"
              "echo run\n#PBS -l mem=1gb\n")
    req = parse(script)
    assert req["resources"] == {"ncpus": "2"} and req["options"]["-N"] == "indented"


def test_directive_prefix_rules():
    assert parse("#PBS-l ncpus=3\n")["resources"] == {"ncpus": "3"}
    assert parse("#XX -l ncpus=4\n#PBS -l mem=1\n", ["-C", "#XX"])["resources"] == {"ncpus": "4"}
    assert parse("#YY -l ncpus=5\n", env={"PBS_DPREFIX": "#YY"})["resources"] == {"ncpus": "5"}
    assert parse("#PBS -l ncpus=6\n", ["-C", ""])["resources"] == {}


def test_directive_continuation_and_errors():
    assert parse("#PBS -l ncpus=2 \\\n -N cont\n")["options"]["-N"] == "cont"
    with pytest.raises(server.QsubError) as e:
        parse("#PBS --container=x\n")
    assert e.value.message == "qsub: directive error: --container=x"
    with pytest.raises(server.QsubError) as e:
        parse("#!/bin/sh\r\necho\r\n")
    assert e.value.message == "qsub: script contains cr, lf"
    with pytest.raises(server.QsubError) as e:
        parse("echo\n", ["--container=x"])
    assert e.value.rc == 2


def test_command_line_wins_per_resource_and_v_is_all_or_nothing():
    script = "#PBS -l ncpus=2,mem=1gb\n#PBS -v A=script,B=script\n#PBS -N s\n"
    req = parse(script, ["-l", "ncpus=8", "-N", "c"])
    assert req["resources"] == {"ncpus": "8", "mem": "1gb"} and req["options"]["-N"] == "c"
    assert req["variables"] == [("A", "script"), ("B", "script")]
    req = parse(script, ["-v", "C=cmd"])
    assert req["variables"] == [("C", "cmd")]      # the script's -v silently dropped


def test_qsub_unknown_resource(pbs_server, test_user, pub_dir):
    r = submit_job(pbs_server, "#PBS -l container_image=/x.img\ntrue\n", test_user, pub_dir)
    assert r.rc != 0 and r.err == "qsub: Unknown resource Resource_List.container_image\n"
    assert pbs_server.qmgr("create resource container_image type=string")[0] == 0
    r = submit_job(pbs_server, "#PBS -l container_image=/x.img\ntrue\n", test_user, pub_dir)
    assert r.rc == 0 and r.jobid in pbs_server.jobs
    assert pbs_server.jobs[r.jobid]["attrs"]["Resource_List"]["container_image"] == "/x.img"
    assert pwd.getpwnam(pbs_server.jobs[r.jobid]["attrs"]["euser"]).pw_uid == test_user.pw_uid
