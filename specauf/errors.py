"""The one exception type that means "the user's input is at fault".

Stages and the CLI print a UserError as one `error: ...` line and exit 2; any other exception is
a bug and keeps its traceback. It subclasses ValueError so that pydantic validators and callers
that catch ValueError still see it.
"""


class UserError(ValueError):
    """Bad params, a missing or damaged input, a refused operation; the message names the key,
    file or value at fault."""
