"""The one exception type that means "the user's input is at fault".

Stages and the CLI print a UserError as one `error: ...` line and exit 2; any other exception is
a bug and keeps its traceback. It subclasses ValueError so that pydantic validators and callers
that catch ValueError still see it.
"""


class UserError(ValueError):
    """Bad params, a missing or damaged input, a refused operation; the message names the key,
    file or value at fault."""


class ExactnessError(UserError):
    """A gate refusing a measured difference: a speculative output that left plain greedy (our
    decoder's or a serving engine's), or replayed tau that left decoded tau. The one line says
    which runs differ and where; the gates are params (eval.exactness_gate, serve.exactness_gate)."""
