"""What a run says about itself: plain log lines when its output goes to a file, the metrics in
metrics.jsonl, environment.json kept across starts, and a profile of chosen steps."""

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from transformer.train import report

pytestmark = pytest.mark.slow  # training runs in subprocesses

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(
  r"^\d\d:\d\d:\d\d step (\d+)/(\d+)  loss [\d.]+  lr [\d.e+-]+  [\d,]+ ms/step  "
  r"[\d,]+ tok/s  MFU [\d.]+%  data wait [\d.]+%"
)


def train(workdir: Path, steps: int, *extra: str) -> str:
  """train.py with stdout and stderr going to files (not a terminal); returns stderr."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  with open(workdir.parent / "out.txt", "w") as out, open(workdir.parent / "err.txt", "w") as err:
    code = subprocess.call(
      [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        "smoke",
        "--workdir",
        str(workdir),
        f"--config.num_train_steps={steps}",
        "--config.decode.bleu_at_end=False",
        *extra,
      ],
      stdout=out,
      stderr=err,
      env=env,
      cwd=ROOT,
      timeout=600,
    )
  text = (workdir.parent / "err.txt").read_text()
  assert code == 0, text[-3000:]
  return text


def test_a_redirected_run_logs_plain_lines_and_records_its_environment_and_a_profile(tmp_path):
  workdir = tmp_path / "run"
  log = train(workdir, 6, "--config.log_every_steps=1", "--config.profile_steps=2,3")
  assert "\r" not in log
  steps = [int(m[1]) for m in (LINE.match(line) for line in log.splitlines()) if m]
  assert steps == [1, 2, 3, 4, 5, 6], log[-3000:]
  assert "model: translation" in log and "devices: " in log and "MFU against" in log

  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
  for key in (
    "train/step_time_s",
    "train/tokens_per_second",
    "train/mfu",
    "train/data_wait_fraction",
    "train/learning_rate",
  ):
    assert all(key in r for r in logged), key

  environment = json.loads((workdir / "environment.json").read_text())
  assert len(environment) == 1
  record = environment[0]
  assert record["versions"]["jax"] and record["process_count"] == 1
  assert record["device_count"] == 8 and record["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert "--workdir" in record["command"] and record["git_commit"]

  planes = list((workdir / "profile").rglob("*.xplane.pb"))  # TensorBoard's profile plugin
  assert planes and planes[0].stat().st_size > 0
  (perfetto,) = (workdir / "profile").rglob("perfetto_trace.json.gz")  # ui.perfetto.dev
  assert json.loads(gzip.decompress(perfetto.read_bytes()))["traceEvents"]

  train(workdir, 8)  # a resumed run adds its start to the history
  environment = json.loads((workdir / "environment.json").read_text())
  assert len(environment) == 2 and environment[0] == record


def test_kept_peaks_that_are_not_positive_finite_numbers_are_ignored(tmp_path):
  """peaks.json edited or damaged: a string, a bool, NaN, infinity or a negative rate is not a
  peak to divide by; the good entries stay."""
  good = {"flop_per_s": 3.0e10, "measured": "2026-01-01T00:00:00"}
  values = {
    "good": good,
    "string": {"flop_per_s": "fast", "measured": "x"},
    "bool": {"flop_per_s": True, "measured": "x"},
    "nan": {"flop_per_s": float("nan"), "measured": "x"},
    "inf": {"flop_per_s": float("inf"), "measured": "x"},
    "negative": {"flop_per_s": -1.0, "measured": "x"},
    "flat": 5.0,
  }
  path = tmp_path / "peaks.json"
  path.write_text(json.dumps(values), encoding="utf-8")
  assert report._read_peaks(path) == {"good": good}
  for damaged in (b"{", b"\xff\xfe", b"[1, 2]"):
    path.write_bytes(damaged)
    assert report._read_peaks(path) == {}


def curve_run(tmp_path: Path, lines: list[str]) -> Path:
  from transformer.config import Config, write_config

  write_config(tmp_path, Config())
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines), encoding="utf-8")
  return tmp_path


def test_a_curve_from_a_metrics_file_cut_mid_line(tmp_path, capsys):
  """A run killed while writing its metrics leaves half a line: the points before it stand."""
  from benchmarks.time_to_bleu import run_curve

  point = lambda step: json.dumps({"step": step, "eval/bleu_greedy": step / 10, "eval/loss": 3.0})
  workdir = curve_run(tmp_path, [point(5), point(10), point(15)[:17]])
  assert [p["step"] for p in run_curve(workdir)["points"]] == [5, 10]
  assert "line 3 is cut short; left out" in capsys.readouterr().err


def test_a_curve_from_a_damaged_metrics_file_or_a_missing_run(tmp_path):
  from benchmarks.time_to_bleu import run_curve
  from transformer.errors import UserError

  workdir = curve_run(tmp_path, ['{"step": 5, "eval/bleu_greedy": 1.0}', "garbage", "{}", ""])
  with pytest.raises(UserError, match=r"metrics\.jsonl line 2 is not a JSON record"):
    run_curve(workdir)
  result = subprocess.run(
    [sys.executable, "-m", "benchmarks.time_to_bleu", "--name", "x", str(tmp_path / "absent")]
    + ["--out", str(tmp_path / "out")],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
  missing = tmp_path / "absent" / "metrics.jsonl"
  assert lines[0] == f"error: {missing} is missing: give the folder of a training run"
