"""How a worker reports a handler's exception back to the coordinator."""

import pickle
import subprocess
import sys
import threading

from pympx_queues.pipeline._invoke import error_tuple, invoke_captured


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


class HoldsALock(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


def _raise(exc):
    def handler(_data):
        raise exc
    return handler


def test_an_exception_that_rebuilds_travels_whole():
    out = invoke_captured(_raise(KeyError("k")), False, 1, None)
    assert out[0] == "err" and isinstance(out[1], KeyError)
    assert out[2] == "KeyError" and "k" in out[3] and "KeyError" in out[4]


def _survives_the_pipe(exc):
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return False
    return True


def test_an_exception_travels_whole_exactly_when_it_survives_the_pipe():
    # Plainly, the first cannot be rebuilt from its args and the second holds a lock.
    # (A library such as tblib may install its own exception pickling in this process;
    # then the first does survive, and must then be sent whole.)
    for exc in (NeedsTwoArgs(1, 2), HoldsALock("held"), ValueError("v")):
        try:
            raise exc
        except Exception as caught:
            out = error_tuple(caught)
        assert (out[1] is exc) == _survives_the_pipe(exc), exc
        assert out[2] == type(exc).__name__
        assert str(exc) == out[3]
        assert type(exc).__name__ in out[4]


def test_a_handler_result_is_returned():
    assert invoke_captured(lambda d, c: (d, c), True, 3, "ctx") == ("ok", (3, "ctx"))


def test_in_a_fresh_interpreter_unrebuildable_exceptions_travel_as_text():
    code = ("from tests.test_invoke import NeedsTwoArgs, HoldsALock, error_tuple\n"
            "for e in (NeedsTwoArgs(1, 2), HoldsALock('h')):\n"
            "    assert error_tuple(e)[1] is None, e\n"
            "assert error_tuple(KeyError('k'))[1] is not None\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
