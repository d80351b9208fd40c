"""ElmError, and how a message quotes what it did not expect: never whole.
A hostile file can hold a gigabyte where a name belongs; a message shows at
most a line of it."""

import reprlib

QUOTE_LIMIT = 80


class ElmError(Exception):
    """A problem the user can fix: the message names the file, key, flag or
    value at fault and says what was expected. The CLI prints it without a
    traceback."""


def quoted(value, limit: int = QUOTE_LIMIT) -> str:
    """repr(value), at most `limit` characters, built without ever repr-ing all of a huge value."""
    if isinstance(value, (bytes, bytearray)):
        text = repr(bytes(value[: limit // 2])) + (f"... ({len(value)} bytes)" if len(value) > limit else "")
    else:
        text = _SHORT.repr(value)
    return text if len(text) <= limit + 20 else text[:limit] + "..."


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = QUOTE_LIMIT
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6
_SHORT.maxlevel = 3


class ArgumentError(ElmError):
    """A bad argument value, raised by the Python API under the argument's own
    name (`temp=-1: expected >= 0`). Front ends re-word it for their users: the
    CLI as the flag (`--temp -1: ...`), the server as the OpenAI parameter."""

    def __init__(self, name: str, value, want: str, flag: str | None = None):
        super().__init__(f"{name}={quoted(value)}: expected {want}")
        self.name, self.value, self.want = name, value, want
        self.flag = flag or f"--{name.replace('_', '-')}"  # what the CLI calls it

    def as_flag(self) -> str:
        shown = self.value if len(str(self.value)) <= QUOTE_LIMIT else quoted(self.value)
        return f"{self.flag} {shown}: expected {self.want}"


def is_integer(v) -> bool:
    """An int that is not a bool (JSON and Python both let True pass for 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_max_tokens(max_tokens, minimum: int = 0) -> int:
    if not is_integer(max_tokens) or max_tokens < minimum:
        raise ArgumentError("max_tokens", max_tokens, f"an integer >= {minimum}")
    return max_tokens


def need_extra(module: str, extra: str, what: str):
    """Import an optional dependency, or say which extra brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ElmError(f"{what} needs {module}: pip install \"elm-mlx[{extra}]\"") from None
