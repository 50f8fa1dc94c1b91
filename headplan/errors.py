"""Errors that mean "the user's input is wrong": the CLI prints one line and exits 2."""


class HeadplanError(Exception):
    """Bad input (missing file, malformed plan, impossible budget...). Message is one clear line."""


class PlanError(HeadplanError):
    """A plan file that does not validate; the message names the offending field."""


class ProfileError(HeadplanError):
    """A profile file that is missing, tampered or does not fit the request."""
