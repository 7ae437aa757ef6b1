"""User-facing error type: the CLI prints it as one line and exits 2."""


class SpecError(ValueError):
    """A mistake in user input (job file, data file, URI, address). Message names the key, file or line."""
