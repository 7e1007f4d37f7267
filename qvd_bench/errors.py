"""The exception types the command line answers in one line.

The CLI turns a ``UserError`` (the user's input is wrong) into a single line on stderr
and exit code 2, and a Ctrl-C (``KeyboardInterrupt``, ``Interrupted``) into one line and
exit code 130; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: an unknown name, an unreadable file, a value out of range.

    The message is one line that says what is wrong and what to do about it.
    """


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C that was handled: its message says what was saved and what a rerun of the
    same call resumes."""
