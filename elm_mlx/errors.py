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
