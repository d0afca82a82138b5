"""Errors that reach the user as one clear line, never a traceback."""


class SlimscopeError(Exception):
    """A problem the user can act on; its message is shown as-is, on one line."""


class ModelLoadError(SlimscopeError):
    """The file could not be read as a model."""


class UntrustedPickleError(ModelLoadError):
    """The file is a pickle that would run code; the user must explicitly trust it."""


class NeedsModuleError(SlimscopeError):
    """The operation needs a runnable module, and the loaded file has only weights."""


class PlanError(SlimscopeError):
    """A compression plan names an unknown layer or asks for something impossible."""


def one_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, for errors shown on one line."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


class FormatError(ModelLoadError):
    """A file's own description of its contents is impossible or unsafe to follow
    (a negative shape, data past the end, a path outside the model's folder, a zip bomb)."""
