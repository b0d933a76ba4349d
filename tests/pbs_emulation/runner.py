"""Run one hook the way PBS does; the emulator's pbs_python.

Usage (under `python3 -I -S -OO`, as harness.py calls it):
    runner.py EVENT_JSON OUT_JSON HOOK_FILE ALARM_SECONDS

Like PBS: the hook file runs in a fresh namespace holding only __builtins__ and
_pbs_v1 (so __name__ == "builtins"); only the stdlib and the `pbs` module can
be imported; an alarm stops it after ALARM_SECONDS; the decision is the
accept/reject flag, not the SystemExit code; falling off the end accepts.
"""
import builtins
import json
import os
import signal
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "pylib"))
import pbs  # noqa: E402


class _Alarm(BaseException):
    """Raised by SIGALRM; a BaseException so `except Exception` cannot hide it."""


def _on_alarm(signum, frame):
    raise _Alarm()


def main():
    desc_path, out_path, hook_path, alarm = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with open(desc_path) as f:
        desc = json.load(f)
    pbs._load(desc)
    with open(hook_path) as f:
        code = compile(f.read(), hook_path, "exec")
    namespace = {"__builtins__": builtins, "_pbs_v1": None, "__name__": "builtins"}
    exception = None
    alarmed = False
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(alarm)
    try:
        exec(code, namespace)
    except SystemExit:
        pass
    except _Alarm:
        alarmed = True
    except BaseException:
        exception = traceback.format_exc()
    finally:
        signal.alarm(0)
    out = pbs._dump()
    out["exception"] = exception
    out["alarm"] = alarmed
    with open(out_path, "w") as f:
        json.dump(out, f)


main()
