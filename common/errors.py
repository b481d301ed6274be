"""ConfigError, apart from config so that parsers config calls (the fencing plan)
can raise it without importing config."""


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key."""
