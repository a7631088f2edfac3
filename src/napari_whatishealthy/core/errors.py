"""The project's own error type: every refusal of bad input is one of these, with a message."""


class WhatIsHealthyError(Exception):
    """Bad input or an impossible request; the message says what is wrong and what to do."""


class InputError(WhatIsHealthyError):
    """An input file or array cannot be used (names the file, the problem and the remedy)."""
