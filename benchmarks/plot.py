"""PNG plots from the benchmark JSONs: benchmarks/results/<name>_<device>.json -> same name .png.

python -m benchmarks.plot [files...]     (default: every JSON under benchmarks/results/)
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the file-only backend

from benchmarks.common import RESULTS_DIR
from benchmarks.common import human as common_human

STYLE = {
  "xla": ("tab:blue", "o"),
  "blockwise": ("tab:green", "s"),
  "cudnn": ("tab:purple", "D"),
  "blockwise_causal": ("tab:olive", "P"),
  "cudnn_causal": ("tab:pink", "d"),
  "lstm": ("tab:red", "^"),
  "gru": ("tab:orange", "v"),
  "lstm_autodiff": ("tab:brown", "x"),
  "lstm_cudnn": ("black", "*"),
}
LABEL = {
  "xla": "attention (xla)",
  "blockwise": "attention (blockwise)",
  "blockwise_causal": "causal attention (blockwise)",
  "cudnn": "attention (cudnn)",
  "cudnn_causal": "causal attention (cudnn)",
  "lstm": "LSTM",
  "gru": "GRU",
  "lstm_autodiff": "LSTM, scan autodiff",
  "lstm_cudnn": "LSTM (cuDNN)",
}


def _title(record: dict, what: str) -> str:
  env = record["environment"]
  return (
    f"{what}\n{env['device_kind']} ({env['cpu_cores']} cores), jax {env['jax']}"
    if env["platform"] == "cpu"
    else f"{what}\n{env['device_kind']}, jax {env['jax']}"
  )


def plot_attention_vs_rnn(path: Path) -> Path:
  """Log-log tokens/s vs T per batch size: fwd+bwd solid, forward dotted, and a dashed vertical
  line where an attention layer's fwd+bwd crosses the fastest recurrent layer measured there."""
  record = json.loads(Path(path).read_text(encoding="utf-8"))
  results = record["results"]
  marks_all = record.get("crossovers_vs_strongest")
  if marks_all is None:  # a record written before that field existed
    from benchmarks import attention_vs_rnn

    marks_all = attention_vs_rnn.summary(results)["crossovers_vs_strongest"]
  batches = sorted({r["batch"] for r in results})
  legend_in = 2.8  # inches kept free on the right for the legend
  fig, axes = plt.subplots(
    1, len(batches), figsize=(6.2 * len(batches) + legend_in, 5.2), squeeze=False
  )
  for ax, batch in zip(axes[0], batches):
    for layer, (color, marker) in STYLE.items():
      rows = sorted(
        (r for r in results if r["layer"] == layer and r["batch"] == batch),
        key=lambda r: r["length"],
      )
      if not rows:
        continue
      lengths = [r["length"] for r in rows]
      ax.plot(
        lengths,
        [r["forward_backward"]["tokens_per_s"] for r in rows],
        color=color,
        marker=marker,
        label=f"{LABEL[layer]} fwd+bwd",
      )
      forward = [r for r in rows if "forward" in r]
      ax.plot(
        [r["length"] for r in forward],
        [r["forward"]["tokens_per_s"] for r in forward],
        color=color,
        marker=marker,
        linestyle=":",
        alpha=0.45,
        markersize=3,
        label=f"{LABEL[layer]} fwd",
      )
    # Crossovers against the fastest recurrent layer measured at each length (from the data).
    marks = [c for c in marks_all if c["batch"] == batch]
    for index, cross in enumerate(sorted(marks, key=lambda c: c["length"])):
      color = STYLE[cross["layer"]][0]
      strongest = " / ".join(LABEL[name] for name in dict.fromkeys(cross["strongest_at"]))
      ax.axvline(cross["length"], color=color, linestyle="--", linewidth=1)
      # Staggered heights keep neighbouring labels apart.
      ax.annotate(
        f"{cross['layer']} = {strongest}\nat T~{cross['length']}",
        (cross["length"], 0.04 + 0.1 * index),
        xycoords=("data", "axes fraction"),
        color=color,
        fontsize=8,
        xytext=(4, 0),
        textcoords="offset points",
        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
      )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"B = {batch}")
    ax.grid(True, which="both", alpha=0.25)
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize=8, loc="center right")
  fig.suptitle(
    _title(
      record,
      f"One layer, D={record['d_model']}, {record['num_heads']} heads: "
      "throughput vs length\nsolid fwd+bwd, dotted fwd; "
      "dashed: crossover with the fastest recurrent layer",
    ),
    fontsize=10,
  )
  fig.tight_layout(rect=(0, 0, 1 - legend_in / fig.get_figwidth(), 1))
  return _save(fig, path)


def plot_train_mfu(path: Path) -> Path:
  record = json.loads(Path(path).read_text(encoding="utf-8"))
  rows = record["results"]
  dtype = record.get("mfu_peak_dtype", "float32")
  mfu = lambda r: r.get("mfu", r["mfu_vs_f32_matmul"])
  fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4.2))
  names = [f"{r['config']}, B={r['batch']}\n{r['parameters'] / 1e6:.3g}M params" for r in rows]
  bars = ax.bar(names, [100 * mfu(r) for r in rows], color="tab:blue")
  for bar, r in zip(bars, rows):
    ax.annotate(
      f"{100 * mfu(r):.0f}%\n{common_human(r['tokens_per_s'])} tok/s",
      (bar.get_x() + bar.get_width() / 2, bar.get_height()),
      ha="center",
      va="bottom",
      fontsize=8,
    )
  target = 60 if dtype == "float32" else 45
  ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"{target}% target")
  peak = record["matmul_peaks"][dtype]["flop_per_s"]
  ax.set_ylabel(f"MFU (% of measured {dtype} matmul, {peak / 1e12:.3g} TFLOP/s)")
  ax.set_ylim(0, 105)
  ax.legend(fontsize=8)
  b, t = rows[0]["batch"], rows[0]["target_length"]
  batches = "" if len({r["batch"] for r in rows}) > 1 else f"B={b}, "
  ax.set_title(
    _title(record, f"Train step MFU, {batches}S=T={t}, Adam, dropout, {dtype}"), fontsize=9
  )
  fig.tight_layout()
  return _save(fig, path)


def _grouped_bars(
  path: Path,
  rows: list[dict],
  group: str,
  series: str,
  value: str,
  ylabel: str,
  title: str,
  log: bool,
) -> Path:
  record = json.loads(Path(path).read_text(encoding="utf-8"))
  groups = sorted({r[group] for r in rows}, key=str)
  names = list(dict.fromkeys(r[series] for r in rows))
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    values = [
      next((r[value] for r in rows if r[group] == g and r[series] == name), 0) for g in groups
    ]
    xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(groups))]
    bars = ax.bar(xs, values, width, label=name)
    for bar, v in zip(bars, values):
      ax.annotate(
        f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7
      )
  ax.set_xticks(range(len(groups)), [f"{group} = {g}" for g in groups])
  if log:
    ax.set_yscale("log")
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=8)
  ax.set_title(_title(record, title), fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def plot_decode_speed(path: Path) -> Path:
  record = json.loads(Path(path).read_text(encoding="utf-8"))
  return _grouped_bars(
    path,
    record["results"],
    "batch",
    "decoder",
    "tokens_per_s",
    "generated tokens / s",
    f"Decoding, {record['results'][0]['max_length']} tokens per sentence, small config",
    log=True,
  )


def plot_decode_vs_ctranslate2(path: Path) -> Path:
  record = json.loads(Path(path).read_text())
  rows = [
    {"mode": mode, "system": system, "cpu_s": entry[f"{system}_cpu_s"]}
    for mode, entry in record["summary"].items()
    for system in ("project", "ctranslate2")
    if f"{system}_cpu_s" in entry
  ]
  return _grouped_bars(
    path,
    rows,
    "mode",
    "system",
    "cpu_s",
    "process CPU seconds (median of rounds)",
    f"{record['split']}, {record['sentences']} sentences, same weights; the project on "
    f"{record.get('project_threads', 'all cores')} thread(s)",
    log=False,
  )


def plot_model_level(path: Path) -> Path:
  record = json.loads(Path(path).read_text(encoding="utf-8"))
  rows = [{**r, "label": f"{r['model']} ({r['parameters'] / 1e6:.1f}M)"} for r in record["results"]]
  return _grouped_bars(
    path,
    rows,
    "batch",
    "label",
    "target_tokens_per_s",
    "target tokens / s (train step)",
    "Train step, Multi30k-shaped batches, equal parameter count",
    log=False,
  )


def plot_quality_vs_time(path: Path) -> Path:
  """Validation BLEU (left) and NLL (right) against training seconds, one line per model."""
  record = json.loads(Path(path).read_text(encoding="utf-8"))
  fig, (bleu_ax, nll_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
  # Runs appended with --append may outnumber the colours: they repeat.
  lstm_colours = itertools.cycle(["tab:red", "tab:orange", "tab:brown", "tab:pink"])
  for run in record["results"]:
    seconds = [p["train_s"] for p in run["curve"]]
    lstm = run["model"] != "transformer"
    lr = f", lr {run['optimizer']['peak_learning_rate']:g}" if lstm and "optimizer" in run else ""
    label = (
      f"{run['model']}{lr} ({run['parameters'] / 1e6:.2f}M, "
      f"{run['target_tokens_per_s']:,.0f} target tok/s)"
    )
    colour = next(lstm_colours) if lstm else "tab:green"
    bleu_ax.plot(seconds, [p["bleu"] for p in run["curve"]], "o-", color=colour, label=label)
    nll_ax.plot(seconds, [p["validation_nll"] for p in run["curve"]], "o-", color=colour)
  bleu_ax.set(xlabel="training time (s)", ylabel="validation BLEU (greedy, sacreBLEU)")
  nll_ax.set(xlabel="training time (s)", ylabel="validation NLL per token")
  for ax in (bleu_ax, nll_ax):
    ax.grid(alpha=0.3)
  bleu_ax.legend(fontsize=8)
  fig.suptitle(
    _title(
      record,
      f"Multi30k en-de, same wall-clock budget ({record['budget_s']:.0f} s of training each)",
    ),
    fontsize=10,
  )
  fig.tight_layout()
  return _save(fig, path)


def plot_time_to_bleu(path: Path) -> Path:
  """Greedy validation BLEU (left) and validation loss (right) against wall-clock minutes since
  each run's process started, one line per run; the legend gives its final test BLEU."""
  record = json.loads(Path(path).read_text(encoding="utf-8"))
  fig, (bleu_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
  for label, run in record["runs"].items():
    minutes = [p["elapsed_s"] / 60 for p in run["points"]]
    tests = ", ".join(f"{k} {v:.1f}" for k, v in run["test_bleu"].items())
    name = f"{label} (test BLEU, beam: {tests})" if tests else label
    bleu_ax.plot(minutes, [p["validation_bleu_greedy"] for p in run["points"]], "o-", label=name)
    loss_ax.plot(minutes, [p["validation_loss"] for p in run["points"]], "o-")
  bleu_ax.set(xlabel="minutes since the run started", ylabel="validation BLEU (greedy, sacreBLEU)")
  loss_ax.set(xlabel="minutes since the run started", ylabel="validation loss (label-smoothed)")
  for ax in (bleu_ax, loss_ax):
    ax.grid(alpha=0.3)
  bleu_ax.legend(fontsize=7, loc="upper left")
  fig.suptitle(_title(record, f"BLEU against time: {record['name']}"), fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def plot_input_pipeline(path: Path) -> Path:
  """Against corpus size: seconds to the first training batch and peak RSS of a first and a
  second start (left, middle), and the stream's real target tokens/s per batching (right)."""
  record = json.loads(Path(path).read_text(encoding="utf-8"))
  rows = record["results"]
  pairs = [row["pairs"] for row in rows]
  fig, (time_ax, rss_ax, read_ax) = plt.subplots(1, 3, figsize=(14, 4.2))
  for key, label in (("first_start", "first start"), ("second_start", "second start")):
    time_ax.plot(pairs, [row[key]["first_batch_s"] for row in rows], "o-", label=label)
    rss_ax.plot(pairs, [row[key]["peak_rss_bytes"] / 2**30 for row in rows], "o-", label=label)
  rss_ax.plot(
    pairs,
    [row["pipeline_start"]["peak_rss_bytes"] / 2**30 for row in rows],
    "o-",
    label="the stream alone",
  )
  for i, read in enumerate(rows[0]["reads"]):
    name = "packing" if read["packing"] else "length buckets"
    read_ax.plot(
      pairs,
      [row["reads"][i]["real_target_tokens_per_s"] / 1e6 for row in rows],
      "o-",
      label=f"{name}, {read['tokens_per_batch']:,} tokens a batch",
    )
  time_ax.set(ylabel="seconds to the first training batch")
  rss_ax.set(ylabel="peak RSS of the process (GiB)", ylim=(0, None))
  read_ax.set(ylabel="real target tokens/s (millions), one process", ylim=(0, None))
  for ax in (time_ax, rss_ax, read_ax):
    ax.set(xscale="log", xlabel="training pairs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(_title(record, "input pipeline against corpus size"), fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def _verdict(verdict: dict) -> str:
  if not verdict.get("steps", True):
    return "not evaluated yet"
  return "within 1%" if verdict["holds"] else "outside 1%"


def plot_numerics(path: Path) -> Path:
  """Validation loss against step of the baseline and each variant (left; training loss thin),
  and each variant's validation loss relative to the baseline's with the +-1% band (right)."""
  record = json.loads(Path(path).read_text())
  fig, (loss_ax, ratio_ax) = plt.subplots(1, 2, figsize=(11, 4))
  colors = {"baseline": "black", "bf16_logits": "tab:blue", "rbg": "tab:orange"}
  for name, curve in record["eval_loss"].items():
    steps = sorted(int(s) for s in curve)
    color = colors.get(name)
    loss_ax.plot(steps, [curve[str(s)] for s in steps], "o-", color=color, label=name)
    train = record["train_loss"].get(name, {})
    train_steps = sorted(int(s) for s in train)
    loss_ax.plot(
      train_steps, [train[str(s)] for s in train_steps], "-", lw=0.7, alpha=0.5, color=color
    )
  for name, verdict in record["variants"].items():
    ratio_ax.plot(
      verdict.get("steps", record["steps"]),
      [100 * (r - 1) for r in verdict["ratios"]],
      "o-",
      color=colors.get(name),
      label=f"{name} ({_verdict(verdict)})",
    )
  tolerance = 100 * record["tolerance"]
  ratio_ax.axhspan(-tolerance, tolerance, color="tab:green", alpha=0.12, label="+-1%")
  ratio_ax.axhline(0, color="black", lw=0.7)
  loss_ax.set(xlabel="step", ylabel="validation loss (dots), training loss (thin)")
  ratio_ax.set(xlabel="step", ylabel="validation loss vs baseline (%)")
  reached = record["steps_reached_by_all"]
  for ax in (loss_ax, ratio_ax):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  what = "bfloat16 logits and rbg dropout vs float32 logits + threefry, GPU recipe's model"
  if not record["complete"]:
    what += f" (all runs to step {reached} of {record['planned_steps']})"
  fig.suptitle(_title(record, what), fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


PLOTTERS = {
  "input_pipeline": plot_input_pipeline,
  "attention_vs_rnn": plot_attention_vs_rnn,
  "train_mfu": plot_train_mfu,
  "decode_speed": plot_decode_speed,
  "model_level": plot_model_level,
  "quality_vs_time": plot_quality_vs_time,
  "numerics_bf16_logits_rbg": plot_numerics,
  "decode_vs_ctranslate2": plot_decode_vs_ctranslate2,
}


def plot_file(path: Path) -> Path | None:
  benchmark = json.loads(Path(path).read_text(encoding="utf-8")).get("benchmark", "")
  plotter = PLOTTERS.get(benchmark)
  if benchmark.startswith("time_to_bleu_"):  # one file per named comparison
    plotter = plot_time_to_bleu
  if benchmark.startswith("decode_vs_ctranslate2_threads"):  # the project on N cores
    plotter = plot_decode_vs_ctranslate2
  return plotter(path) if plotter else None


def _save(fig, path: Path) -> Path:
  out = Path(path).with_suffix(".png")
  fig.savefig(out, dpi=110)
  plt.close(fig)
  print(f"wrote {out}")
  return out


def main(argv=None):
  paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
  for path in paths or sorted(RESULTS_DIR.glob("*.json")):
    plot_file(path)


if __name__ == "__main__":
  sys.exit(main())
