"""A GGUF candidate run in-process by llama.cpp (llama-cpp-python's bindings over the llama.cpp that
`make install` builds): the same prompts, token ids and decoding rules as the torch generator, so every
metric of the evaluation means the same; only the forward passes are llama.cpp's.

The passes go through llama.cpp's batch API, the one `llama-server` schedules its slots with: one context holds
a key/value cache for each of `slots` sequences; a `llama_batch` carries any mix of prompt tokens and next
tokens of any of them, and one `llama_decode` runs it. `Slots` is that running batch; the serving engine drives
it as it drives torch's (sequences join, step and leave at any step), and evaluation scores and generates
through it.

The service's tokenizer is the candidate's Hugging Face tokenizer, as for every other candidate: token ids go
to llama.cpp as they are (the GGUF holds the same vocabulary in the same order).
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmops.generation.candidate import GenerationParams, Generator, Prompt
from llmops.generation.decode import Decoded, no_adapters
from llmops.gguf import GGUF_FILE, bindings, llama_cpp_dir

MAX_CONTEXT = 2048
"""Positions of each sequence's key/value cache: the model's own context or this, whichever is smaller."""
BATCH_TOKENS = 512
"""Tokens one `llama_decode` takes at most (llama.cpp's physical batch); longer prompts go in several."""
CACHE_PAD = 256
"""llama.cpp sizes each sequence's cache in multiples of this."""
PROMPT_CACHE_BYTES = 1 << 30
"""Host memory for caches saved from slots before another prompt takes them (llama-server's `--cache-ram`, whose
default is 8 GiB); the oldest saved goes first."""
SIMILAR = 0.1
"""A free cache is reused for a prompt when their common prefix is more than this share of the prompt
(llama-server's `--slot-prompt-similarity` default): a shared start token alone does not evict another cache."""
GENERATE_SLOTS = 8
"""Sequences evaluation decodes together."""
SPLIT_FACTOR = 5.0
"""A context that returns embeddings makes llama.cpp output every token of a batch, so the output layer runs over
every prompt token (`Slots` splits prompts for that). Prompts are fed apart, their last tokens with the step that
follows, once they have more than this many times (model parameters) / (vocabulary x width) tokens: where the
output layer's cost over them passes one more pass over the weights. Measured on 2 cores (q8_0, packaged
vocabulary): 0.26 ms a prompt token against a 9.5 ms pass for a 135M Llama (even at 37 tokens; the rule: 38),
0.41 against 30 for a Qwen2.5-0.5B shape (73; the rule: 66). With Qwen's own 152k vocabulary the rule says 18."""


@dataclass
class _Entry:
    """Tokens of one sequence to feed: `seq` its cache, `start` the position of the first, `outputs` which of
    them return logits (`last` or `all`)."""

    seq: int
    tokens: list[int]
    start: int
    outputs: str = "last"
    """`last`, `all`, or `none` (a prompt's start, fed apart: see `Slots`)."""
    hidden: bool = True
    """Its outputs' output-layer inputs are read where the context keeps them: a running row's next token needs
    none (reading each is a call into llama.cpp, which lets go of the GIL, and a copy)."""


class Slots:
    """One llama.cpp context with a key/value cache for each of `slots` sequences: the running batch.

    Rows are the running sequences in the order they joined; `admit` adds rows, `step` feeds one token to every
    row, `keep` lets the others leave (their caches stay for a later prompt that starts the same way: `_reuse`).
    `saved_bytes`: host memory for caches a slot gives up (`PromptCache`; 0 saves none).

    With `embeddings` (serving logs each prompt's embedding, the output layer's input at its last token) llama.cpp
    outputs every token of a batch, and the output layer runs over each prompt token: for a 135M Llama 18% more
    prefill, for a real vocabulary of 152k several times the layers' cost. A long enough prompt (`SPLIT_FACTOR`) is
    therefore fed in two: all but its last token with embeddings off and no output, then its last token with the
    running rows' step, embeddings on (llama-server turns a context's embeddings on and off by batch the same
    way).
    """

    def __init__(
        self, model: Any, slots: int, positions: int, threads: int, embeddings: bool = False, saved_bytes: int = 0
    ):
        llama_cpp = bindings()
        from llama_cpp import _internals

        self._llama_cpp = llama_cpp
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = slots * -(-positions // CACHE_PAD) * CACHE_PAD  # llama.cpp pads each sequence's cache
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = slots
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = False  # each sequence attends over its own cache only (llama-server with -np)
        params.embeddings = embeddings
        params.no_perf = True
        self.context = _internals.LlamaContext(model=model, params=params, verbose=False)
        self._embedding = embeddings
        """The context's embeddings switch as last set (`_feed`)."""
        self._pool = ThreadPool(threads)
        self._pool.attach(self.context.ctx)
        self._batch = _internals.LlamaBatch(n_tokens=BATCH_TOKENS, embd=0, n_seq_max=1, verbose=False)
        self.vocab = llama_cpp.llama_vocab_n_tokens(model.vocab)
        self.width = llama_cpp.llama_model_n_embd(model.model)
        self.split_from = SPLIT_FACTOR * llama_cpp.llama_model_n_params(model.model) / (self.vocab * self.width)
        """Prompt tokens in one admission from which prompts are fed apart (with `embeddings`; see the class)."""
        self.positions = positions
        self.embeddings = embeddings
        self._free = list(range(slots))
        """Sequences no row uses, least recently used first."""
        self._cached: list[list[int]] = [[] for _ in range(slots)]
        """The tokens each sequence's cache holds, from position 0 (a free one keeps its last prompt and answer)."""
        self._seqs: list[int] = []
        self._next: list[int] = []
        """Each row's next position."""
        self.reused = 0
        """Prompt tokens taken from a cache rather than computed, since the context was made."""
        self.saved = PromptCache(saved_bytes)
        """Caches of former prompts, saved to host memory when their slot went to another prompt."""

    def _feed(self, entries: list[_Entry], embeddings: bool | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Run the entries' tokens, as few `llama_decode` calls as fit; each entry's logits (k, vocab) and, when
        the context keeps them (`embeddings`, default the context's own), the output layer's inputs (k, width) at
        its output tokens."""
        keep = self.embeddings if embeddings is None else embeddings
        if keep != self._embedding:
            self._llama_cpp.llama_set_embeddings(self.context.ctx, keep)
            self._embedding = keep
        logits: list[list[np.ndarray]] = [[] for _ in entries]
        hidden: list[list[np.ndarray]] = [[] for _ in entries]
        batch = self._batch.batch
        # the entry of each output of the batch being filled, None for an output nobody asked for (a context that
        # keeps embeddings returns every token's: llama.cpp marks them all)
        pending: list[int | None] = []

        def run() -> None:
            if batch.n_tokens == 0:
                return
            code = self._llama_cpp.llama_decode(self.context.ctx, batch)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code} (its cache is full or the batch is invalid)")
            out = np.ctypeslib.as_array(self.context.get_logits(), shape=(len(pending), self.vocab))
            for index, entry in enumerate(pending):
                if entry is None:
                    continue
                logits[entry].append(out[index].copy())
                if keep and entries[entry].hidden:
                    row = self._llama_cpp.llama_get_embeddings_ith(self.context.ctx, index)
                    hidden[entry].append(np.ctypeslib.as_array(row, shape=(self.width,)).copy())
            batch.n_tokens = 0
            pending.clear()

        # in order of sequence: llama.cpp splits a batch over per-sequence caches into runs of consecutive
        # sequence ids, one graph computation (one pass over the weights) per run
        for number in sorted(range(len(entries)), key=lambda n: entries[n].seq):
            entry = entries[number]
            last = len(entry.tokens) - 1
            for offset, token in enumerate(entry.tokens):
                if batch.n_tokens == BATCH_TOKENS:
                    run()
                i = batch.n_tokens
                batch.token[i] = token
                batch.pos[i] = entry.start + offset
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = entry.seq
                wanted = entry.outputs == "all" or (entry.outputs == "last" and offset == last)
                batch.logits[i] = wanted or keep
                if wanted or keep:
                    pending.append(number if wanted else None)
                batch.n_tokens = i + 1
        run()
        empty_logits, empty_hidden = (np.zeros((0, n), dtype=np.float32) for n in (self.vocab, self.width))
        return [_rows(rows) if rows else empty_logits for rows in logits], [
            _rows(rows) if rows else empty_hidden for rows in hidden
        ]

    def admit(
        self, prompts: list[list[int]], adapters: list[str | None] | None = None
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """New rows for `prompts` (one prefill for all): their next-token logits (n, vocab) and, when the context
        keeps them, the prompts' embeddings (n, width)."""
        return self.step_and_admit([], prompts, adapters)

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token to every row (in row order); the next logits (rows, vocab)."""
        return self.step_and_admit(tokens, [])[0]

    def step_and_admit(
        self, tokens: list[int], prompts: list[list[int]], adapters: list[str | None] | None = None
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """One token to every row (no tokens: the rows wait) and `prompts` as new rows, in one batch (as
        llama-server fills its slots' batch): the next logits of the rows fed, the running ones first, and the new
        prompts' embeddings when kept."""
        no_adapters(adapters, "llama.cpp")
        if len(prompts) > len(self._free):
            raise RuntimeError(f"{len(prompts)} sequences asked for {len(self._free)} free llama.cpp slots")
        for ids in prompts:
            if not ids or len(ids) >= self.positions:
                raise ValueError(f"a prompt of {len(ids)} tokens does not fit a {self.positions}-position slot")
        seqs: list[int] = []
        kept: list[int] = []
        running = set(self._seqs)
        for ids in prompts:  # one at a time: each is placed beside the running ones and those placed before it
            seq, cached = self._reuse(ids, running)
            seqs.append(seq)
            kept.append(cached)
            running.add(seq)
        stepping = zip(self._seqs, tokens, self._next, strict=True) if tokens else ()  # none: admit only
        entries = [_Entry(seq, [token], at, hidden=False) for seq, token, at in stepping]
        joining = list(zip(seqs, prompts, kept, strict=True))
        apart = self.embeddings and sum(len(ids) - 1 - at for _, ids, at in joining) >= self.split_from
        starts = [_Entry(seq, ids[at:-1], at, "none") for seq, ids, at in joining if apart and len(ids) - 1 > at]
        entries += [
            _Entry(seq, ids[-1:], len(ids) - 1) if apart else _Entry(seq, ids[at:], at) for seq, ids, at in joining
        ]
        try:
            if starts:
                self._feed(starts, embeddings=False)
            logits, hidden = self._feed(entries)
        except Exception:  # what the caches hold is no longer known: the running rows' are emptied too
            for seq in self._seqs:
                self._llama_cpp.llama_memory_seq_rm(self.context.memory, seq, -1, -1)
                self._cached[seq] = []
            self._clear(seqs)
            raise
        for seq, token in zip(self._seqs, tokens, strict=False):
            self._cached[seq].append(token)
        for seq, ids in zip(seqs, prompts, strict=True):
            self._cached[seq] = list(ids)
        self.reused += sum(kept)
        self._next = [at + 1 if tokens else at for at in self._next] + [len(ids) for ids in prompts]
        self._seqs += seqs
        embeddings = np.concatenate(hidden[len(tokens) :]) if self.embeddings and prompts else None
        return torch.from_numpy(_rows(logits)), embeddings

    def full(self, row: int) -> bool:
        """Whether the row's cache has no room for another token."""
        return self._next[row] >= self.positions

    def keep(self, rows: list[int]) -> None:
        """Only `rows` stay, in that order; the others' slots are freed, their caches kept for a later prompt
        that starts the same way (`_reuse`)."""
        kept = set(rows)
        self._free += [seq for row, seq in enumerate(self._seqs) if row not in kept]
        self._seqs = [self._seqs[row] for row in rows]
        self._next = [self._next[row] for row in rows]

    def _reuse(self, ids: list[int], running: set[int]) -> tuple[int, int]:
        """The free sequence for a new prompt, and how many of its tokens that sequence's cache already holds.

        llama.cpp computes a batch over per-sequence caches as one pass over the weights per run of consecutive
        sequence ids, so the first rule keeps the running sequences' ids together: a free sequence next to two
        running ones before one next to one, before one next to none. Among those, as llama-server picks a slot:
        the cache with the longest common prefix with the prompt (a chat's next turn, a shared system prompt,
        the same question again) where that prefix is more than `SIMILAR` of the prompt, else the least recently
        used. The rest of that cache is removed; the prompt's last token is always computed (its logits start the
        answer). Only the running sequences' caches are in a step's attention (each has its own, `kv_unified`
        off), so what a free one keeps costs nothing until it is reused."""

        def rank(index: int) -> tuple[int, int, int]:
            seq = self._free[index]
            common = _common(self._cached[seq], ids)
            similar = common if common > SIMILAR * len(ids) else 0
            return ((seq - 1 in running) + (seq + 1 in running), similar, -index)

        ranks = [rank(index) for index in range(len(self._free))]
        best = max(range(len(ranks)), key=ranks.__getitem__)
        common = ranks[best][1]
        seq = self._free.pop(best)
        cached = self._cached[seq]
        if len(cached) > common:  # what the slot holds beyond the shared start is saved, not lost
            self.saved.put(cached, lambda: self._state(seq))
        restored = self.saved.best(ids, better_than=max(common, SIMILAR * len(ids)))
        if restored is not None:
            tokens, state = restored
            self._llama_cpp.llama_memory_seq_rm(self.context.memory, seq, -1, -1)
            loaded = self._llama_cpp.llama_state_seq_set_data(self.context.ctx, state, len(state), seq) == len(state)
            common, cached = (_common(tokens, ids), list(tokens)) if loaded else (0, [])
        kept = min(common, len(ids) - 1)
        self._llama_cpp.llama_memory_seq_rm(self.context.memory, seq, kept, -1)
        self._cached[seq] = cached[:kept]
        return seq, kept

    def _state(self, seq: int) -> ctypes.Array:
        """A copy of one sequence's cache in host memory (llama.cpp's own serialisation of it)."""
        size = self._llama_cpp.llama_state_seq_get_size(self.context.ctx, seq)
        state = (ctypes.c_uint8 * size)()
        self._llama_cpp.llama_state_seq_get_data(self.context.ctx, state, size, seq)
        return state

    def _clear(self, seqs: list[int]) -> None:
        """Empty these sequences' caches and free them."""
        for seq in seqs:
            self._llama_cpp.llama_memory_seq_rm(self.context.memory, seq, -1, -1)
            self._cached[seq] = []
            self._free.append(seq)

    def score(self, ids: list[int], adapter: str | None = None) -> torch.Tensor:
        """Logits at every position of one sequence (len(ids), vocab), computed whole in the least recently used
        free slot (what it held is saved first, as `_reuse` saves it). The slot keeps `ids` afterwards: a prompt
        scored before it is answered (prompt logprobs) then finds its cache."""
        no_adapters([adapter], "llama.cpp")
        seq = self._free.pop(0)
        if self._cached[seq]:
            self.saved.put(self._cached[seq], lambda: self._state(seq))
        self._llama_cpp.llama_memory_seq_rm(self.context.memory, seq, -1, -1)
        self._cached[seq] = []
        try:
            (logits,), _ = self._feed([_Entry(seq, ids, 0, "all")])
        except Exception:
            self._clear([seq])
            raise
        self._cached[seq] = list(ids)
        self._free.append(seq)
        return torch.from_numpy(logits)

    def close(self) -> None:
        self._batch.close()
        self.context.close()
        self._pool.close()


def _rows(arrays: list[np.ndarray]) -> np.ndarray:
    """Arrays of rows as one: the one itself when there is one (one sequence's step copies nothing more)."""
    if len(arrays) == 1:
        return arrays[0] if arrays[0].ndim == 2 else arrays[0][None]
    return np.stack(arrays) if arrays[0].ndim == 1 else np.concatenate(arrays)


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token sequences."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


class PromptCache:
    """Caches of former prompts (and the answers written after them) in host memory, as llama-server keeps them
    (`--cache-ram`): a slot's cache is saved before another prompt takes the slot, and a new prompt is started
    from the saved one that shares the longest prefix with it, if that is longer than what a free slot holds.
    A restored cache stays saved, so a short common start never costs a long cache (llama-server skips saved
    caches the new prompt would keep less than a quarter of; here nothing is lost by using them). Bounded in
    bytes, oldest out first."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self._entries: OrderedDict[tuple[int, ...], ctypes.Array] = OrderedDict()
        self.bytes = 0

    def put(self, tokens: Sequence[int], state: Callable[[], ctypes.Array]) -> None:
        key = tuple(tokens)
        if self.limit <= 0 or key in self._entries:
            return
        self._entries[key] = data = state()
        self.bytes += len(data)
        while self.bytes > self.limit and self._entries:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= len(dropped)

    def best(self, ids: Sequence[int], better_than: float) -> tuple[tuple[int, ...], ctypes.Array] | None:
        """The saved cache sharing the longest prefix with `ids`, if that prefix is longer than `better_than`;
        it moves to the newest end."""
        found, longest = None, better_than
        for tokens in self._entries:
            common = _common(tokens, ids)
            if common > longest:
                found, longest = tokens, common
        if found is None:
            return None
        self._entries.move_to_end(found)
        return found, self._entries[found]

    def __len__(self) -> int:
        return len(self._entries)


class ThreadPool:
    """A ggml CPU thread pool that lives as long as its context (llama.cpp's defaults, as llama-server attaches
    one). Without it ggml starts and joins its threads on every `llama_decode`: a 135M Llama at one sequence
    decoded 89 tokens/s that way on this project's 2 cores, 120 with a pool (OpenMP build). llama-cpp-python does
    not bind these calls (its `llama_attach_threadpool` is a TODO): they are called by ctypes from the built
    libraries."""

    PARAMS_BYTES = 1024
    """Room for `struct ggml_threadpool_params` (512 CPU-mask flags, then four small fields)."""

    def __init__(self, threads: int):
        libraries = llama_cpp_dir() / "build" / "bin"
        self._cpu = ctypes.CDLL(str(libraries / "libggml-cpu.so"))
        self._llama = ctypes.CDLL(str(libraries / "libllama.so"))
        base = ctypes.CDLL(str(libraries / "libggml-base.so"))
        params = ctypes.create_string_buffer(self.PARAMS_BYTES)
        base.ggml_threadpool_params_init(params, ctypes.c_int(threads))
        self._cpu.ggml_threadpool_new.restype = ctypes.c_void_p
        self._cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
        self._llama.llama_attach_threadpool.argtypes = [ctypes.c_void_p] * 3
        self._llama.llama_detach_threadpool.argtypes = [ctypes.c_void_p]
        self.pool = self._cpu.ggml_threadpool_new(params)
        if not self.pool:
            raise RuntimeError(f"ggml could not start a pool of {threads} threads")
        self._context: int | None = None

    def attach(self, context: Any) -> None:
        self._llama.llama_attach_threadpool(context, self.pool, self.pool)
        self._context = context

    def close(self) -> None:
        if self.pool:
            if self._context is not None:
                self._llama.llama_detach_threadpool(self._context)
            self._cpu.ggml_threadpool_free(self.pool)
            self.pool = None

    def __del__(self) -> None:  # after its context's own close: llama_free leaves an attached pool alone
        if getattr(self, "pool", None):
            self._cpu.ggml_threadpool_free(self.pool)


class LlamaCppGenerator(Generator):
    """A loaded GGUF candidate (`gguf-f16`, `gguf-q8_0`, `gguf-q4_k_m`)."""

    def _load_model(self) -> tuple[Any, torch.device]:
        model_file, positions = self._model_file(GGUF_FILE, "GGUF")
        self._positions = positions or MAX_CONTEXT
        llama_cpp = bindings()
        from llama_cpp import _internals

        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        try:
            model = _internals.LlamaModel(path_model=str(model_file), params=params, verbose=False)
        except ValueError as error:  # llama-cpp-python's words for a file llama.cpp could not load
            raise RuntimeError(f"llama.cpp could not load {model_file}: {error}") from error
        self._own: Slots | None = None
        self._embedder: Slots | None = None
        return model, torch.device("cpu")

    @property
    def context_length(self) -> int:
        return min(self._positions, MAX_CONTEXT)

    def running_batch(self, slots: int, embeddings: bool = False, positions: int | None = None) -> Slots:
        """A llama.cpp context of `slots` sequences (see `Slots`) of `positions` each (default and at most: the
        model's context), for the serving engine; caches of former prompts are saved to host memory, up to
        `PROMPT_CACHE_BYTES`."""
        return self._context(slots, embeddings, positions, PROMPT_CACHE_BYTES)

    def _context(self, slots: int, embeddings: bool = False, positions: int | None = None, saved: int = 0) -> Slots:
        positions = min(self.context_length, positions or self.context_length)
        return Slots(self.model, slots, positions, torch.get_num_threads(), embeddings, saved)

    def _slots(self) -> Slots:
        """Evaluation's own context (no prompt is asked twice there: nothing is saved to host memory)."""
        if self._own is None:
            self._own = self._context(GENERATE_SLOTS)
        return self._own

    def generate_ids(self, encoded: list[list[int]], params: GenerationParams) -> Decoded:
        """Up to `GENERATE_SLOTS` rows decoded together, each under the same rules as torch's decoding."""
        if self.task != "causal-lm":
            raise ValueError(f"llama.cpp runs decoders; this candidate is a {self.task} model")
        return self.generate_running(self._slots(), encoded, params, GENERATE_SLOTS)

    def prompt_embeddings(self, prompts: Sequence[Prompt], batch_size: int = 32) -> np.ndarray:
        """The output layer's input at each prompt's last token, as torch's `prompt_embeddings`."""
        if self._embedder is None:
            self._embedder = self._context(GENERATE_SLOTS, embeddings=True)
        embedder, vectors = self._embedder, []
        encoded = [self.encode(prompt) for prompt in prompts]
        for first in range(0, len(encoded), GENERATE_SLOTS):
            _, hidden = embedder.admit(encoded[first : first + GENERATE_SLOTS])
            embedder.keep([])
            assert hidden is not None
            vectors.append(hidden)
        return np.concatenate(vectors) if vectors else np.zeros((0, embedder.width), dtype=np.float32)

    def completion_logits(
        self, prompts: Sequence[Prompt], completions: Sequence[str], batch_size: int = 8
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.scored_one_at_a_time(self._slots().score, prompts, completions)
