"""One exception type for mistakes a user can fix.

The CLI prints a `ChipshiftError` as one line and exits with status 2; anything else is
a bug and keeps its traceback.
"""


class ChipshiftError(Exception):
    """A user-facing error: bad input, a missing file, an unavailable device."""


class ConfigError(ChipshiftError):
    """A config key or value is wrong; the message names the key, the value and what is allowed."""


class CheckpointError(ChipshiftError):
    """A checkpoint is missing, corrupt, truncated or of an unsupported kind."""


class DeviceError(ChipshiftError):
    """A device is unknown, absent, or its PyTorch plugin is not installed."""
