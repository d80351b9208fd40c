class ElmError(Exception):
    """A problem the user can fix: the message names the file, key, flag or
    value at fault and says what was expected. The CLI prints it without a
    traceback."""
