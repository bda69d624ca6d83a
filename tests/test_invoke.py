"""How a worker reports a handler's exception back to the coordinator."""

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


def test_an_exception_that_cannot_be_rebuilt_travels_as_text_only():
    # pickle.dumps succeeds for this one; rebuilding it with its args does not.
    for exc in (NeedsTwoArgs(1, 2), HoldsALock("held")):
        try:
            raise exc
        except Exception as caught:
            out = error_tuple(caught)
        assert out[1] is None
        assert out[2] == type(exc).__name__
        assert str(exc) == out[3]
        assert type(exc).__name__ in out[4]


def test_a_handler_result_is_returned():
    assert invoke_captured(lambda d, c: (d, c), True, 3, "ctx") == ("ok", (3, "ctx"))
