"""One error family for edgedec. The CLI catches :class:`EdgedecError` once and prints one line.

Torch-free: the runtime raises these too.
"""


class EdgedecError(Exception):
    """Base of every error edgedec raises on purpose (bad input, not a bug)."""


class ConfigError(EdgedecError, ValueError):
    """An option or combination of options is invalid."""


class UnsupportedError(EdgedecError):
    """A model architecture, target or pass combination edgedec does not support."""


class ModelError(EdgedecError):
    """A model source is missing, corrupt, or not a model edgedec can read."""


class BundleError(EdgedecError):
    """A bundle is missing, corrupt, from an unknown format version, or fails validation."""


class GenerationError(EdgedecError, ValueError):
    """A generation request is invalid (empty prompt, prompt too long, bad sampling parameters)."""


class BudgetError(ConfigError):
    """A gate budget file is missing, unparsable, or states an unknown or malformed limit."""


class MeasurementError(EdgedecError):
    """A measurement could not be taken (a benchmark worker crashed, was killed, or returned nothing)."""


class UntrustedBundleError(BundleError):
    """A bundle carries native code (a compiled library) and neither the caller's opt-in nor a signature by
    a trusted key vouches for it; or a signature does not verify."""
