"""The one exception type a user sees as a one-line message (the CLI prints it and exits 2)."""


class UserError(Exception):
    """Bad input: unknown model, wrong file, out-of-range number, a plan that does not fit the model."""
