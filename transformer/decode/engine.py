"""Translating many sentences: a fixed set of slots, each holding one sentence's search, refilled
as searches settle (what serving engines call continuous batching).

A batch searched as one (`beam_search`) runs until its slowest sentence settles and computes every
row at every step. A sentence settles after its translation ends (with the exact stop rule at
alpha = 1, about twice its length), and the spread within a batch adds as much again. Here
each of `slots` rows holds one sentence's search at its own position (the decoder's cache is
addressed by position, see `MultiHeadAttention.init_cache`); whenever `refill` of them have
settled, wherever they are, the host reads their translations and puts the next sentences in
their place, longest first so that the short ones fill the end. A row is computed while its
sentence is searched (on test_2016 at beam 4, 89% of the row-steps are a search's own; waiting
for whole groups of 8 to settle, 73%), and a sentence's search is exactly `beam_search`'s with
K = 1: the translations are the same.

Three programs are compiled per (model, slots, source length, limit, beam, alpha): `init` (empty
slots), `refill` (encode the new sentences and write them into their slots) and `run` (steps
until enough slots have settled). `refill` encodes its sentences at their own length rounded up
to a power of two (`refill_width`), not the slots' (the longest sentence's): taken from the queue
longest first, the sentences of one refill are of similar lengths, and padding them all to the
longest made encoding a third of a greedy search's time (test_2016, one core); it is compiled once
per width. A list of at most `refill` sentences (one sentence at a time, as an interactive
`translate` is used) runs a fourth, `once`, the whole search in one call. The
source length is the longest sentence's rounded up to a power of two (`search_length`) and the
limit follows from it, so a list compiles each once, whatever its batches would have been, and
lists of similar sentences share them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transformer.data.tokenizer import BOS_ID, EOS_ID
from transformer.decode.batch import search_length
from transformer.decode.beam_search import (
  BeamState,
  final_beams,
  initial_state,
  search_step,
)
from transformer.decode.cache import split_memory
from transformer.decode.config import PAPER_SEARCH, DecodeConfig
from transformer.model.transformer import EncoderDecoder


@dataclasses.dataclass(frozen=True)
class Layout:
  """The static shape of a search: `slots` sentences at a time, sources of `source_length`,
  at most `max_new_tokens` target tokens, `refill` slots written at once."""

  slots: int
  refill: int
  source_length: int
  max_new_tokens: int
  beams: int
  alpha: float
  stop: str
  pad_id: int
  bos_id: int = BOS_ID
  eos_id: int = EOS_ID

  @property
  def groups(self) -> int:
    """Groups of consecutive slots, each attending over its own filled prefix of the cache
    (`attend_filled_prefix`): 32 rows (slots x beams) each. Fewer would read longer prefixes;
    more would compile and run more attention branches per step."""
    groups = max(1, self.slots * self.beams // 32)
    return groups if self.slots % groups == 0 else 1


class _Programs:
  """The jitted `init`, `refill`, `run` and `once` of one model graph and layout (`_programs`).

  The model's state comes in as its flat list of arrays (`treedef` rebuilds it): a call then
  passes a few hundred arrays without walking the module's structure, which costs more than a
  short search itself (one sentence at a time).
  """

  def __init__(self, graphdef: nnx.GraphDef, treedef, layout: Layout):
    self.layout = layout
    self.model_graphdef, self.treedef = graphdef, treedef
    # The graph of the model with its caches allocated, set when `init` or `once` is traced.
    self.cached_graphdef: nnx.GraphDef | None = None
    self.init = jax.jit(self._init)
    # The search and the memory are updated in place (donated): they are the largest arrays.
    self.refill = jax.jit(self._refill, donate_argnums=(0, 1))
    self.run = jax.jit(self._run, donate_argnums=(0,))
    self.once = jax.jit(self._once)

  def _model(self, leaves):
    model = nnx.merge(self.model_graphdef, jax.tree.unflatten(self.treedef, leaves))
    model.eval()
    return model

  def _allocate(self, model, src_ids_BS, groups: int, *, encode: bool = True):
    """The model's caches for the sources' rows (encoded): (graphdef, step, memory, params).
    `encode=False`: a memory of zeros, for slots that hold no sentence (nothing reads it)."""
    if encode:
      memory_BSD = model.encode(src_ids_BS)
    else:
      memory_BSD = jnp.zeros((*src_ids_BS.shape, model.config.d_model), model.config.dtype)
    model.init_cache(
      memory_BSD, src_ids_BS, self.layout.max_new_tokens, beams=self.layout.beams, groups=groups
    )
    return split_memory(model)

  def _start(self, limit_B, cache) -> BeamState:
    layout = self.layout
    return initial_state(
      limit_B,
      layout.beams,
      layout.max_new_tokens,
      cache,
      bos_id=layout.bos_id,
      pad_id=layout.pad_id,
    )

  def _init(self, leaves):
    """Every slot empty and settled (its source all PAD)."""
    layout = self.layout
    src_ids_BS = jnp.zeros((layout.slots, layout.source_length), jnp.int32)
    self.cached_graphdef, cache, memory, params = self._allocate(
      self._model(leaves), src_ids_BS, layout.groups, encode=False
    )
    search = self._start(jnp.ones((layout.slots,), jnp.int32), cache)
    return search._replace(settled_B=jnp.ones((layout.slots,), jnp.bool_)), memory, params

  def _refill(self, search: BeamState, memory, params, src_ids_QS, slot_Q, limit_Q):
    """Sentences src_ids_QS start their searches in slots slot_Q (a slot >= `slots` is none)."""
    assert self.cached_graphdef is not None, "init runs first"
    model = nnx.merge(self.cached_graphdef, search.cache, memory, params)
    _, cache_Q, memory_Q, _ = self._allocate(model, src_ids_QS, 1)
    fresh = self._start(limit_Q, cache_Q)
    put = lambda all_rows, new_rows: all_rows.at[slot_Q].set(new_rows, mode="drop")
    search = jax.tree.map(put, search, fresh)
    return search, jax.tree.map(lambda m, new: put(m, _padded_like(new, m)), memory, memory_Q)

  def _steps(self, search: BeamState, memory, params, min_settled):
    """Steps every slot until `min_settled` slots have settled (or all have)."""
    step = functools.partial(
      search_step,
      self.cached_graphdef,
      (memory, params),
      alpha=self.layout.alpha,
      eos_id=self.layout.eos_id,
      num_results=1,
      shared=True,
      pad_id=self.layout.pad_id,
      stop=self.layout.stop,
    )

    def going(search: BeamState):
      settled = jnp.sum(search.settled_B.astype(jnp.int32))
      return (settled < min_settled) & ~jnp.all(search.settled_B)

    return lax.while_loop(going, step, search)

  def _run(self, search: BeamState, memory, params, min_settled):
    """`_steps`; returns the search and each slot's best hypothesis [slots, T] (tokens after
    BOS), with which slots have settled."""
    assert self.cached_graphdef is not None, "init runs first"
    search = self._steps(search, memory, params, min_settled)
    tokens_BKT, _ = final_beams(search, self.layout.alpha, 1)
    return search, tokens_BKT[:, 0, 1:], search.settled_B

  def _once(self, leaves, src_ids_BS, limit_B):
    """The whole search of sentences that fill one group (slots = refill): the best hypothesis
    of each [slots, T], in one program (one sentence at a time runs this)."""
    self.cached_graphdef, cache, memory, params = self._allocate(
      self._model(leaves), src_ids_BS, self.layout.groups
    )
    search = self._steps(self._start(limit_B, cache), memory, params, self.layout.slots)
    tokens_BKT, _ = final_beams(search, self.layout.alpha, 1)
    return tokens_BKT[:, 0, 1:]


def refill_width(length: int, source_length: int) -> int:
  """The length sentences of at most `length` ids are encoded at when they fill slots of
  `source_length`: a power of two (at least 8), as `search_length` rounds."""
  return min(max(8, 1 << (length - 1).bit_length()), source_length)


def refill_widths(source_length: int) -> list[int]:
  """Every `refill_width` of slots of `source_length` (each a compilation of `refill`)."""
  return sorted({refill_width(n, source_length) for n in range(1, source_length + 1)})


def _padded_like(new_Q_, all_rows):
  """A memory entry of sources shorter than the slots' (keys, values [Q, N, S', H], the padding
  mask [Q, 1, 1, S']) padded to the slots' length with zeros: masked, as padding is."""
  widths = [(0, 0)] + [
    (0, a - n) for a, n in zip(all_rows.shape[1:], new_Q_.shape[1:], strict=True)
  ]
  return jnp.pad(new_Q_, widths)


@functools.lru_cache(maxsize=32)  # one per (model, layout): batch-1 use meets many lengths
def _programs(graphdef: nnx.GraphDef, treedef, layout: Layout) -> _Programs:
  return _Programs(graphdef, treedef, layout)


def _host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-process) array on this host."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _placed(x: np.ndarray, mesh: Mesh | None):
  """A host value every process holds alike, as a replicated global array."""
  if mesh is None or jax.process_count() == 1:
    return jnp.asarray(x)
  return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec()), x)


class Engine:
  """A model ready to search many times (a `Translator`'s): split once into its graph and its
  arrays, with the compiled programs of each layout it has met at hand. It holds the model's
  weights as they were when it was made.
  """

  def __init__(self, model: EncoderDecoder):
    self.config = model.config
    model = nnx.clone(model)
    if model.config.tie_output:
      # The output layer's table transposed once here, not in every program (`Embedding`).
      model.target_embed.init_cache(frozen=True)
    self.graphdef, state = nnx.split(model)
    self.leaves, self.treedef = jax.tree.flatten(state)
    self._by_layout: dict[Layout, _Programs] = {}

  def programs(self, layout: Layout) -> _Programs:
    if layout not in self._by_layout:  # the graph is hashed once per layout, not per call
      self._by_layout[layout] = _programs(self.graphdef, self.treedef, layout)
    return self._by_layout[layout]

  def layout(
    self, lengths: np.ndarray, settings: DecodeConfig, slots: int | None, refill: int | None
  ) -> Layout:
    """The layout a search of sources of `lengths` runs in (see `search`)."""
    config, beam_size = self.config, settings.beam_size
    # Default: 64 sentences at a time, refilled 8 at once, greedy too (test_2016, one process,
    # greedy: 1.94 against 2.14 CPU s for 128 refilled 16 on two threads, 1.92 against 2.22 on
    # one; 128 was the cheaper while refills encoded every sentence at the slots' length).
    slots = slots or 64
    refill = refill or slots // 8
    if lengths.min() < 1 or lengths.max() > config.max_len:
      raise ValueError(
        f"sources must have 1 to model.max_len={config.max_len} ids; got {lengths.min()} to "
        f"{lengths.max()}"
      )
    source_length = search_length(int(lengths.max()), config.max_len)
    max_new_tokens = min(source_length + settings.max_extra_tokens, config.max_len)
    refill = max(1, min(refill, len(lengths)))
    slots = refill * max(1, min(slots // refill, -(-len(lengths) // refill)))
    alpha = 0.0 if beam_size == 1 else float(settings.alpha)
    return Layout(
      slots, refill, source_length, max_new_tokens, beam_size, alpha, settings.stop, config.pad_id
    )

  def prepare(
    self,
    lengths: np.ndarray,
    settings: DecodeConfig = PAPER_SEARCH,
    *,
    slots: int | None = None,
    refill: int | None = None,
  ) -> None:
    """Compiles the programs a search of sources of `lengths` runs, by running them on empty
    slots (a few steps of nothing): a search started later, in any thread, finds them ready.
    One process only (a multi-process search places its inputs on a global mesh)."""
    layout = self.layout(np.asarray(lengths), settings, slots, refill)
    programs = self.programs(layout)
    # Arrays as a search passes them (`_placed`), so that it finds the same entries.
    empty_QS = jnp.zeros((layout.refill, layout.source_length), jnp.int32)
    ones_Q = jnp.ones(layout.refill, jnp.int32)
    if layout.slots == layout.refill:
      jax.block_until_ready(programs.once(self.leaves, empty_QS, ones_Q))
      return
    search, memory, params = programs.init(self.leaves)
    nowhere_Q = jnp.full(layout.refill, layout.slots, jnp.int32)  # every row dropped
    for width in refill_widths(layout.source_length):  # each width sentences are encoded at
      empty_QS = jnp.zeros((layout.refill, width), jnp.int32)
      search, memory = programs.refill(search, memory, params, empty_QS, nowhere_Q, ones_Q)
    jax.block_until_ready(programs.run(search, memory, params, layout.slots))

  def search(
    self,
    sources: Sequence[Sequence[int] | np.ndarray],
    settings: DecodeConfig = PAPER_SEARCH,
    *,
    slots: int | None = None,
    refill: int | None = None,
    mesh: Mesh | None = None,
  ) -> np.ndarray:
    """`search_all` with this engine's model."""
    config = self.config
    if not sources:
      return np.zeros((0, 1), np.int32)
    lengths = np.array([len(s) for s in sources])
    layout = self.layout(lengths, settings, slots, refill)
    slots, refill, source_length = layout.slots, layout.refill, layout.source_length
    max_new_tokens = layout.max_new_tokens
    programs = self.programs(layout)
    limits = np.minimum(lengths + settings.max_extra_tokens, max_new_tokens).astype(np.int32)
    if slots == refill:  # one group holds them all: no refills, one program
      src_BS = np.zeros((slots, source_length), np.int32)
      for row, ids in enumerate(sources):
        src_BS[row, : lengths[row]] = ids
      placed = (_placed(x, mesh) for x in (src_BS, limits))
      return _host(programs.once(self.leaves, *placed))
    search, memory, params = programs.init(self.leaves)
    queue = deque(np.argsort(-lengths, kind="stable").tolist())  # longest first
    occupant = np.full(slots, -1)
    results = np.full((len(sources), max_new_tokens), config.pad_id, np.int32)
    while True:
      # The free slots take the next sentences of the queue, `refill` at a time.
      while queue and np.sum(occupant < 0) >= min(refill, len(queue)):
        rows = np.flatnonzero(occupant < 0)[:refill]
        taken = [queue.popleft() for _ in rows[: len(queue)]]
        slot_Q = np.full(refill, slots, np.int32)  # slot `slots`: no sentence (dropped)
        # Encoded at their own length (the queue's order makes it the longest of similar
        # ones), written into the slots' memory padded to `source_length`.
        width = refill_width(int(lengths[taken].max()), source_length)
        src_QS = np.zeros((refill, width), np.int32)
        limit_Q = np.ones(refill, np.int32)
        for q, (row, i) in enumerate(zip(rows, taken, strict=False)):
          occupant[row], slot_Q[q], limit_Q[q] = i, row, limits[i]
          src_QS[q, : lengths[i]] = sources[i]
        search, memory = programs.refill(
          search, memory, params, *(_placed(x, mesh) for x in (src_QS, slot_Q, limit_Q))
        )
      if (occupant < 0).all():
        break
      # Run until `refill` more slots are free for the queue, or to the end of the last ones.
      min_settled = int(np.sum(occupant < 0)) + refill if queue else slots
      search, best_BT, settled_B = programs.run(search, memory, params, min_settled)
      settled_B, best_BT = _host(settled_B), _host(best_BT)
      for slot in np.flatnonzero(settled_B & (occupant >= 0)):
        results[occupant[slot]] = best_BT[slot]
        occupant[slot] = -1
    return results


def search_all(
  model: EncoderDecoder,
  sources: Sequence[Sequence[int] | np.ndarray],
  settings: DecodeConfig = PAPER_SEARCH,
  *,
  slots: int | None = None,
  refill: int | None = None,
  mesh: Mesh | None = None,
) -> np.ndarray:
  """The best translation [N, T] of every source (ids with EOS, no padding), in their order.

  `settings` are the search's (a run's decode block): beam_size 1 is greedy decoding (a W = 1
  search without length penalty is exactly greedy); `stop` is when a sentence's search ends
  ("heuristic" or "exact", see `beam_search`). Sentence i has at most
  len(sources[i]) + settings.max_extra_tokens target tokens, within the model's
  positions; each row holds its tokens (up to and including EOS), then PAD, T being the most any
  has. Every process must pass the same sources (translations are computed once, over the
  mesh's devices). `slots` sentences are searched at a time, `refill` of them replaced at once
  (default 64 and 8). Searching one model many times: `Engine(model).search`.
  """
  return Engine(model).search(sources, settings, slots=slots, refill=refill, mesh=mesh)
