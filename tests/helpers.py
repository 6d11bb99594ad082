"""What several test files check the same way."""

from transformer.cli import run_cli


def one_line_error(capsys, main, *, quiet_stdout: bool = False) -> str:
  """Runs `main` as the commands do and returns its error line: exit 2 and a single `error:`
  line on stderr (argparse's own errors exit from inside `main`); with `quiet_stdout`, nothing
  on stdout either."""
  try:
    code = run_cli(main)
  except SystemExit as exit:
    code = exit.code
  out, err = capsys.readouterr()
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
  if quiet_stdout:
    assert out == "", out
  return lines[0]
