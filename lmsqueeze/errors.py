"""The one exception type for mistakes a user can make; the CLI prints it as one line."""


class LmsqueezeError(ValueError):
    """Bad input from the user: the message names the bad value and what would be valid."""


class DataNotFound(LmsqueezeError):
    """A named data set is on none of the paths searched; a task that needs it cannot run here."""
