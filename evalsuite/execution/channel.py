"""The one channel between the judge (trusted: runs the tests) and the candidate (model-written code,
in the sandbox): calls and their results as plain data, one JSON message per line.

Plain data is None, bool, int, float, complex, str, bytes, list, tuple, dict, set and frozenset,
nested, and those types themselves. Everything but lists is tagged, so the decoder builds exactly the Python type that was sent,
and a JSON object is never a value of its own: {"tuple": [...]}, {"set": [...]}, {"frozenset": [...]},
{"dict": [[key, value], ...]} (keys of any plain hashable type), {"complex": [re, im]}, {"bytes": hex},
and the builtin types themselves by name, {"type": "int"}.
The judge decodes what the candidate sends into fresh builtin objects: nothing of the candidate's
(no class, no __eq__, no reference) reaches the test code.

Standard library only: the judge and the candidate run it as source in their own interpreters.
"""

import json
import os
import select
import time

MAX_MESSAGE = 16 << 20  # bytes in one message: larger is a protocol failure, never read whole
MAX_INT_DIGITS = 100_000  # the judge parses no longer integers (int parsing is quadratic)


class ChannelError(Exception):
    """The other side sent something that is not a well-formed message, or sent nothing in time."""


def encode(obj, depth=0):
    """obj -> JSON-ready value; TypeError naming the first value that is not plain data. Subclasses
    of the plain types (a Counter, a namedtuple, an int subclass) are sent as their base type."""
    if depth > 100:
        raise TypeError("data nested deeper than 100 levels")
    if obj is None or obj is True or obj is False or type(obj) in (str, int, float):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, list):
        return [encode(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return {"tuple": [encode(v, depth + 1) for v in obj]}
    if isinstance(obj, dict):
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in obj.items()]}
    if isinstance(obj, frozenset):
        return {"frozenset": [encode(v, depth + 1) for v in obj]}
    if isinstance(obj, set):
        return {"set": [encode(v, depth + 1) for v in obj]}
    if isinstance(obj, complex):
        return {"complex": [obj.real, obj.imag]}
    if isinstance(obj, (bytes, bytearray)):
        return {"bytes": bytes(obj).hex()}
    if isinstance(obj, type) and TYPES.get(obj.__name__) is obj:
        return {"type": obj.__name__}
    raise TypeError(f"a value of type {type(obj).__name__} is not plain data")


_DECODERS = {"tuple": tuple, "set": set, "frozenset": frozenset}
# Builtin types travel by name (MBPP 533 passes int and str to the function).
TYPES = {t.__name__: t for t in (bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset)}


def decode(value):
    """JSON value -> plain Python data; ChannelError for anything not made by encode."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) is list:
        return [decode(v) for v in value]
    if type(value) is not dict or len(value) != 1:
        raise ChannelError("malformed value")
    (tag, body), = value.items()
    try:
        if tag in _DECODERS and type(body) is list:
            return _DECODERS[tag](decode(v) for v in body)
        if tag == "dict" and type(body) is list and all(type(p) is list and len(p) == 2 for p in body):
            return {decode(k): decode(v) for k, v in body}
        if tag == "complex" and type(body) is list and len(body) == 2 and all(type(x) is float for x in body):
            return complex(body[0], body[1])
        if tag == "bytes" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "type" and type(body) is str and body in TYPES:
            return TYPES[body]
    except (TypeError, ValueError) as e:  # an unhashable key or set member, bad hex
        raise ChannelError(f"malformed {tag}: {e}") from None
    raise ChannelError(f"malformed value (tag {tag[:40]!r})")


def dumps(message):
    # ensure_ascii: a lone surrogate in a string travels as an escape instead of failing to encode
    return json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


def write_message(fd, message):
    data = memoryview(dumps(message))
    while data:
        data = data[os.write(fd, data):]


class Reader:
    """Reads newline-framed messages from a file descriptor, never holding more than MAX_MESSAGE bytes
    and never waiting past a deadline (time.monotonic() seconds; None: wait as long as it takes)."""

    def __init__(self, fd):
        self.fd, self.buffer = fd, bytearray()

    def read(self, deadline=None):
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_MESSAGE:
                raise ChannelError(f"a message longer than {MAX_MESSAGE >> 20} MB")
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                    raise TimeoutError("no answer before the time limit")
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                raise EOFError("the other side closed the channel")
            self.buffer += chunk
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        if len(line) > MAX_MESSAGE:
            raise ChannelError(f"a message longer than {MAX_MESSAGE >> 20} MB")
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as e:  # bad JSON, an int past MAX_INT_DIGITS, deep nesting
            raise ChannelError(f"not a JSON message: {str(e)[:100]}") from None
        if type(message) is not dict:
            raise ChannelError("not a JSON object")
        return message
