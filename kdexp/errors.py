"""The one exception type for mistakes a user can make in a config or on the command line."""


class ConfigError(ValueError):
    """A bad config value: the message names the key, the value, and what would be accepted.

    The CLI prints the message without a traceback and exits with status 2.
    """

    def __init__(self, key: str, value: object, accepted: str) -> None:
        self.key, self.value, self.accepted = key, value, accepted
        super().__init__(f"{key}={value!r}: {accepted}")
