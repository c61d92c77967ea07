"""The base of every error ovis-batch raises about its user's input (a setting, a manifest, a model
folder, an output folder, an image): its message says what was wrong and what to do, so the command
line prints the message alone instead of a traceback. Programming errors are not UsageErrors."""


class UsageError(Exception):
    """Something the user can fix; the message names the value or file and the fix."""
