"""The one exception type that means "the user's input is wrong".

The CLI turns a ``UserError`` into a single line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: an unknown name, an unreadable file, a value out of range.

    The message is one line that says what is wrong and what to do about it.
    """
