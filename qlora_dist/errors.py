"""The one error type users see: every problem of a run's input, each a line naming its file, key or
value. It imports nothing, so every module (and the CLI) can raise and catch it without import circles."""


class ConfigError(ValueError):
    """All problems found at one point (a config, a preflight, a file), reported together: exit 2, one line
    each, no traceback. A traceback is kept for bugs."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
