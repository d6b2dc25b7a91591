"""The one exception of the data package: every file that is missing, corrupt or does not match, and every
bad ``data.*`` option, is a ``DataError`` whose message says what to do."""


class DataError(ValueError):
    """A data file is missing, corrupt or does not match; the message says what to do."""
