"""The one line between a user's mistake and a bug.

`UserError` is what the person running a command can fix: a bad config value, a missing or
damaged file, a run directory of another model, input text that cannot be read. The commands
print its message as one line (`error: ...`) and exit 2. Any other exception is a bug of the
package and keeps its traceback.
"""


class UserError(ValueError):
  """A problem the user can fix; its message names the problem and the fix."""


class MissingFile(UserError, FileNotFoundError):
  """A file or directory the command needs is not there."""
