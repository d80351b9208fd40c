class ElmError(Exception):
    """A problem the user can fix: the message names the file, key, flag or
    value at fault and says what was expected. The CLI prints it without a
    traceback."""


class ArgumentError(ElmError):
    """A bad argument value, raised by the Python API under the argument's own
    name (`temp=-1: expected >= 0`). Front ends re-word it for their users: the
    CLI as the flag (`--temp -1: ...`), the server as the OpenAI parameter."""

    def __init__(self, name: str, value, want: str, flag: str | None = None):
        super().__init__(f"{name}={value!r}: expected {want}")
        self.name, self.value, self.want = name, value, want
        self.flag = flag or f"--{name.replace('_', '-')}"  # what the CLI calls it

    def as_flag(self) -> str:
        return f"{self.flag} {self.value}: expected {self.want}"


def check_max_tokens(max_tokens, minimum: int = 0) -> int:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < minimum:
        raise ArgumentError("max_tokens", max_tokens, f"an integer >= {minimum}")
    return max_tokens


def need_extra(module: str, extra: str, what: str):
    """Import an optional dependency, or say which extra brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ElmError(f"{what} needs {module}: pip install \"elm-mlx[{extra}]\"") from None
