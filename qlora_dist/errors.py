"""The one error type users see: every problem of a run's input, each a line naming its file, key or
value. It imports nothing, so every module (and the CLI) can raise and catch it without import circles."""


class ConfigError(ValueError):
    """All problems found at one point (a config, a preflight, a file), reported together: exit 2, one line
    each, no traceback. A traceback is kept for bugs."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class RunFault(RuntimeError):
    """A fault during a run that the run itself found and explained (too many non-finite steps, a disk
    full while saving, no intact checkpoint to resume): one line naming the step, file or folder, exit
    code 3, no traceback; what was written before it stays intact. Every rank that finds it says it
    (a fault may be one rank's), prefixed with the rank when there are several."""

    EXIT_CODE = 3
