"""The errors ovis-batch raises about its user's input and about a run that stopped, and the exit codes.

- `UsageError`: something the user can fix before any work starts (a setting, a manifest, a model folder,
  an output folder, an image); its message says what was wrong and what to do, so the command line prints
  the message alone instead of a traceback. Exit code 2.
- `JobFault`: a run that stopped part-way (disk full, store unreachable, Ctrl-C...): one line that says
  what failed, where, how many rows are committed and that a rerun resumes; the traceback is in a file.
  Exit code 3 (130 for Ctrl-C).
Programming errors are neither, and keep their tracebacks.
"""

EXIT_INCOMPLETE = 1  # the job ran to its end, but some rows are not committed: rerun to resume
EXIT_USAGE = 2  # refused before any work: the message says what to change
EXIT_FAULT = 3  # stopped part-way by a fault: committed rows are kept, a rerun resumes
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)


class UsageError(Exception):
    """Something the user can fix; the message names the value or file and the fix."""


class RunFailure(RuntimeError):
    """A failure during a run, already worded for the user (a stall, a lost cluster): a fault's line shows
    its message as it is."""


class JobFault(Exception):
    """A run that stopped part-way; `str()` is the one line to print, `exit_code` the process status."""

    def __init__(
        self, message: str, exit_code: int = EXIT_FAULT, *, traceback_file: str | None = None
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.traceback_file = traceback_file
