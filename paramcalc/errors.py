"""The one error type users see: a problem with what they asked for."""


class ParamcalcError(Exception):
    """Bad input (unknown model, invalid config, bad option).

    The message is a single line that says what is wrong and what would be right;
    the CLI prints it on stderr and exits with status 2.
    """
