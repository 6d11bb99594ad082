"""The token cache trusts none of its files: meta.json's fields, lengths.npy and text.jsonl
against the SHA-256 meta.json recorded, the ArrayRecord file's size, and each record's byte
length against its row of lengths. Each kind of damage is one line naming the cache folder and
the fix (delete it; it is built again), also when it surfaces in the prefetch thread."""

import hashlib
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from transformer.data import batching
from transformer.data.batching import Layout
from transformer.data.stream import translation_stream
from transformer.data.token_cache import (
  LENGTHS_FILENAME,
  META_FILENAME,
  TEXT_FILENAME,
  build_cache,
  open_cache,
)
from transformer.errors import UserError

SHARD = "ids-00000.array_record"


def encode(texts: list[str]) -> list[list[int]]:
  return [[int(x) for x in text.split()] for text in texts]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  rng = np.random.default_rng(0)
  words = lambda: " ".join(map(str, rng.integers(5, 400, rng.integers(1, 20))))
  text = [(words(), words()) for _ in range(2000)]
  directory = tmp_path_factory.mktemp("built") / "cache"
  build_cache(
    directory, [text[:1000], text[1000:]], encode, vocab_size=500, built_from={}, keep_text=True
  )
  return directory, text


@pytest.fixture
def cache_dir(built, tmp_path):
  copy = tmp_path / "cache"
  shutil.copytree(built[0], copy)
  return copy


def edit_json(path, change):
  values = json.loads(path.read_text())
  change(values)
  path.write_text(json.dumps(values))


def shifted_lengths(directory):
  lengths = np.load(directory / LENGTHS_FILENAME)
  lengths[:, 0] += 1  # every source one piece longer: pairs cut at the wrong places
  np.save(directory / LENGTHS_FILENAME, lengths)


def cut_text(directory):
  lines = (directory / TEXT_FILENAME).read_text().splitlines(keepends=True)
  (directory / TEXT_FILENAME).write_text("".join(lines[:-3]))


def halve(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
  "damage, message",
  [
    (lambda d: (d / META_FILENAME).write_text("{"), "meta.json is not valid JSON"),
    (lambda d: (d / META_FILENAME).write_text("[]"), "meta.json holds a list"),
    (lambda d: edit_json(d / META_FILENAME, lambda m: m.pop("pairs")), "has no int 'pairs'"),
    (lambda d: edit_json(d / META_FILENAME, lambda m: m.update(pairs="x")), "no int 'pairs'"),
    (lambda d: edit_json(d / META_FILENAME, lambda m: m.update(dtype="int8")), "dtype 'int8'"),
    (
      lambda d: edit_json(d / META_FILENAME, lambda m: m.update(shards=["../../x.array_record"])),
      "names shards",
    ),
    (lambda d: edit_json(d / META_FILENAME, lambda m: m.update(format=2)), "is of format 2"),
    (shifted_lengths, "lengths.npy differs from the SHA-256 in meta.json"),
    (lambda d: (d / LENGTHS_FILENAME).unlink(), "lengths.npy: No such file"),
    (lambda d: halve(d / SHARD), f"{SHARD} is"),
    (lambda d: (d / SHARD).unlink(), f"{SHARD} is missing"),
  ],
)
def test_a_damaged_cache_is_refused_when_opened(cache_dir, damage, message):
  damage(cache_dir)
  with pytest.raises(UserError, match=re.escape(message)) as refused:
    open_cache(cache_dir)
  assert str(cache_dir) in str(refused.value) and "delete that folder" in str(refused.value)


@pytest.mark.parametrize(
  "damage, message",
  [
    (cut_text, "text.jsonl differs from the SHA-256"),
    (lambda d: (d / TEXT_FILENAME).unlink(), "text.jsonl: No such file"),
  ],
)
def test_damaged_text_is_refused_when_read(cache_dir, damage, message):
  damage(cache_dir)
  cache = open_cache(cache_dir)
  with pytest.raises(UserError, match=re.escape(message)):
    cache.text()


def test_an_intact_cache_reads_back_its_pairs_and_text(built):
  directory, text = built
  cache = open_cache(directory)
  assert cache.text() == text
  for i, (source, target) in zip([0, 999, 1000, 1999], cache.read([0, 999, 1000, 1999])):
    assert [source.tolist(), target.tolist()] == encode(list(text[i]))


def test_records_of_another_length_than_their_row_are_refused(cache_dir, built):
  """A cache whose lengths.npy was rebuilt consistently with meta.json (hash rewritten) but
  does not describe the records: the first read names the record."""
  shifted_lengths(cache_dir)
  data = (cache_dir / LENGTHS_FILENAME).read_bytes()
  edit_json(
    cache_dir / META_FILENAME, lambda m: m.update(lengths_sha256=hashlib.sha256(data).hexdigest())
  )
  cache = open_cache(cache_dir)
  with pytest.raises(UserError, match=r"record 0 holds \d+ bytes, its lengths say \d+"):
    cache.read([0])


def flip_middle(path):
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 3, len(data) // 3 + 64):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def test_a_single_flipped_bit_is_refused_or_changes_nothing(cache_dir, built):
  """One bit flipped anywhere in the records file (every 1,499th byte tried): the reader's
  chunk hashes refuse it as damage, or it fell in padding and every pair reads back unchanged;
  never a pair silently different."""
  directory, _ = built
  want = open_cache(directory).read(range(2000))
  intact = (cache_dir / SHARD).read_bytes()
  outcomes = []
  for at in range(0, len(intact), 1499):
    data = bytearray(intact)
    data[at] ^= 1 << (at % 8)
    (cache_dir / SHARD).write_bytes(bytes(data))
    try:
      got = open_cache(cache_dir).read(range(2000))
    except UserError as error:
      outcomes.append(str(error))
      continue
    same = all(
      np.array_equal(a, c) and np.array_equal(b, d)
      for (a, b), (c, d) in zip(got, want, strict=True)
    )
    outcomes.append("unchanged" if same else f"byte {at}: pairs read back different")
  refused = [o for o in outcomes if "is damaged" in o]
  assert len(refused) + outcomes.count("unchanged") == len(outcomes), set(outcomes)
  assert refused and "unchanged" in outcomes  # both kinds of place were hit


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_damage_found_by_the_prefetch_thread_arrives_as_one_line(cache_dir, damage):
  """The records are damaged after the cache was opened (a disk error, a file removed under a
  running job): the stream's background thread hits it, and the training loop gets the same
  one-line error, not a RuntimeError."""
  cache = open_cache(cache_dir)
  usable, _ = batching.usable_pairs(cache.lengths, 32, truncate=False)
  layout = Layout.of(max_len=32, packing=False, tokens_per_batch=512, multiple=1, buckets=(32,))
  if damage == "flip":
    flip_middle(cache_dir / SHARD)
  else:
    (cache_dir / SHARD).unlink()
  stream = translation_stream(cache, usable, layout, seed=0, prefetch=2)

  def read_all():
    for _ in range(500):
      next(stream)

  try:
    with pytest.raises(UserError, match=r"token cache .* is damaged .*delete that folder"):
      read_all()
  finally:
    stream.close()


def test_a_build_beside_another_commands_build_keeps_it(tmp_path):
  """Two commands building one cache at once: each leaves the other's temporary folder alone
  (a dead builder's is removed), and the cache is whole."""
  directory = tmp_path / "cache"
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    live = tmp_path / f"cache.tmp-{sleeper.pid}"
    live.mkdir()
    (live / "ids-00000.array_record").write_bytes(b"half written")
    dead = subprocess.run(
      [sys.executable, "-c", "import os; print(os.getpid())"],
      check=True,
      capture_output=True,
      text=True,
    )
    stale = tmp_path / f"cache.tmp-{dead.stdout.strip()}"
    stale.mkdir()
    build_cache(directory, [[("5 6", "7 8")]], encode, vocab_size=500, built_from={})
    assert (live / "ids-00000.array_record").read_bytes() == b"half written"
    assert not stale.exists()
    assert len(open_cache(directory)) == 1
  finally:
    sleeper.kill()
    sleeper.wait()


def test_a_cache_folder_without_its_meta_json_is_built_again(built, tmp_path):
  """A folder without meta.json is no cache (meta.json is written last): building the cache
  replaces it (the rename onto it failed and was taken for another command's finished build)."""
  directory = tmp_path / "cache"
  shutil.copytree(built[0], directory)
  (directory / META_FILENAME).unlink()
  build_cache(directory, [[("5 6", "7 8")]], encode, vocab_size=500, built_from={})
  assert len(open_cache(directory)) == 1
