"""The one exception type for mistakes a user can make with lorakit."""


class LoraError(ValueError):
    """A bad argument, config, model or adapter file.

    The message names the field or key, the bad value and how to fix it.
    """


def problems_error(what: str, problems: list[str]) -> LoraError:
    """One error that reports every problem found, not just the first."""
    lines = "\n".join(f"  - {p}" for p in problems)
    return LoraError(f"{what}: {len(problems)} problem(s)\n{lines}")
