"""``backend="auto"``: the fastest available backend per device and shape class, measured on first use.

Like cuDNN's benchmark mode: the first call of a shape class times every candidate backend on the real
inputs and keeps the fastest for the rest of the process (and, optionally, in a JSON file shared by later
processes). A shape class is (device, torch version, dtype, E, k, layer widths, bias, activation, tokens
rounded up to a power of two, training or not). Every backend computes the same function within its own
tested tolerance, so the choice changes speed, not results beyond that tolerance.

* ``CMOE_AUTO=table`` — no timing: today's hand-written rule (`cmoe.dispatch.table_backend`).
* ``CMOE_AUTO_CACHE=/path/auto.json`` (or ``configure_auto(cache_path=...)``) — load choices from, and write
  new ones to, that file (atomically: a temporary file in the same folder, then a rename).
* While ``torch.compile`` traces, nothing is timed and the table rule answers (pass an explicit backend to
  compile another one). While a CUDA graph is captured, nothing is timed either: a class measured before
  (warm up first) keeps its choice, else the table rule answers.

Each candidate is timed in 3 round-robin rounds (the minimum counts); candidates within 10 % of the fastest
are a near tie and get 6 more rounds before the choice, since a noisy CPU cannot separate them in 3. If the
table rule's backend then measures within 3 % of the fastest, it is kept: no measurement separates them, and
the same choice from run to run is worth more than a noise-picked one.

Candidates are the registered backends whose `Backend.auto_candidate` accepts the device, that are available
there and accept the inputs (`Backend.input_problem`); ``dense`` only where it does at most twice the routed
work (``E <= 2·k``), since elsewhere it computes every expert for every token.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cmoe.checkpointing import atomic_write
from cmoe.errors import CMoEError
from cmoe.experts import StackedExperts
from cmoe.registry import BACKENDS

ENV_MODE = "CMOE_AUTO"
ENV_CACHE = "CMOE_AUTO_CACHE"
MODES = ("measure", "table")
TIE_MARGIN = 0.10
"""Candidates within this fraction of the fastest after the first rounds are a near tie and get timed again."""
TIE_ROUNDS = 6
"""Extra round-robin rounds for a near tie: 3 rounds on a noisy CPU could not tell apart backends about 10 %
apart (benchmarks/RESULTS-cpu.md's `auto` table shows how far its picks are from the fastest)."""
TIE_KEEP = 0.03
"""After the extra rounds, the table rule's backend is kept when it is within this fraction of the fastest:
closer than a measurement can separate (a 2-core CPU's timings of one backend move between runs more than that:
benchmarks/RESULTS-cpu.md), so the choice follows the fixed rule and stays the same from run to run instead of
flipping with the noise."""
CACHE_FORMAT = 1

# (backend name, a zero-argument call running it once, device) -> milliseconds for that call.
Timer = Callable[[str, Callable[[], object], torch.device], float]


@dataclass(frozen=True)
class ShapeClass:
    """What a measured choice is valid for."""

    device: str
    dtype: str
    num_experts: int
    top_k: int
    widths: tuple[int, ...]
    bias: bool
    activation: str
    tokens_bucket: int
    training: bool

    @property
    def key(self) -> str:
        return (f"{self.device}|{self.dtype}|E{self.num_experts}|k{self.top_k}|"
                f"w{'x'.join(map(str, self.widths))}|{'bias' if self.bias else 'nobias'}|{self.activation}|"
                f"T<={self.tokens_bucket}|{'train' if self.training else 'infer'}")


@dataclass
class Choice:
    """The backend chosen for a shape class and why: the measured ms per candidate and the skipped ones."""

    backend: str
    times_ms: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    source: str = "measured"  # measured | disk | table
    kept_table: bool = False  # the table rule's backend, kept as it measured within TIE_KEEP of the fastest

    def explain(self) -> str:
        """One line: the choice, then each candidate's time (fastest first) and why others were left out."""
        if self.source == "table":
            return f"{self.backend} (table rule: CMOE_AUTO=table, or no candidate could be timed)"
        timed = ", ".join(f"{name} {ms:.3g} ms" for name, ms in sorted(self.times_ms.items(), key=lambda i: i[1]))
        why = "the table rule's backend, as fast as the fastest within the tie margin" if self.kept_table \
            else "fastest measured"
        text = f"{self.backend} ({why}{' earlier, read from the cache file' if self.source == 'disk' else ''}: {timed})"
        if self.skipped:
            text += "; not timed: " + "; ".join(f"{name}: {why}" for name, why in sorted(self.skipped.items()))
        return text


def tokens_bucket(tokens: int) -> int:
    """`tokens` rounded up to a power of two (1, 2, 4, ...)."""
    return 1 << max(tokens - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def _cuda_device_name(index: int) -> str:
    """The GPU's name, asked of the driver once per device (`choose` builds a shape class on every call)."""
    return torch.cuda.get_device_name(index)


def device_label(device: torch.device) -> str:
    """The device as a choice depends on it: the CUDA device's name or the CPU thread count, and torch's version."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = f"cuda:{_cuda_device_name(index)}"
    elif device.type == "cpu":
        name = f"cpu:{torch.get_num_threads()}threads"
    else:
        name = device.type
    return f"{name}|torch{torch.__version__}"


def is_training(x: torch.Tensor, experts: StackedExperts, weight: torch.Tensor) -> bool:
    """Whether this call will be differentiated: grad mode on and some input or expert weight needs a grad."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or any(p.requires_grad for p in experts.parameters()))


def shape_class(x: torch.Tensor, experts: StackedExperts, index: torch.Tensor, weight: torch.Tensor) -> ShapeClass:
    """The shape class of a flattened ``[T, in]`` call."""
    return ShapeClass(device=device_label(x.device), dtype=str(x.dtype).removeprefix("torch."),
                      num_experts=experts.num_experts, top_k=index.shape[-1], widths=tuple(experts.widths),
                      bias=experts.biases is not None, activation=experts.activation_name,
                      tokens_bucket=tokens_bucket(x.shape[0]), training=is_training(x, experts, weight))


def default_timer(name: str, call: Callable[[], object], device: torch.device) -> float:
    """Wall-clock ms of one call, the device synchronised before and after (CUDA events on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    call()
    return (time.perf_counter() - begin) * 1e3


def candidates(x: torch.Tensor, experts: StackedExperts, top_k: int) -> tuple[list[str], dict[str, str]]:
    """The backends auto may time for these inputs, and why the other candidates are left out."""
    names, skipped = [], {}
    for name in BACKENDS.names():
        backend = BACKENDS.get(name)
        if not backend.auto_candidate(x.device):  # loop, the CPU interpreter: never worth timing
            continue
        if not backend.is_available(x.device):
            skipped[name] = backend.unavailable_reason(x.device) or "not available on this device"
            continue
        problem = backend.input_problem(x, experts)
        if problem is not None:
            skipped[name] = problem
            continue
        if name == "dense" and experts.num_experts > 2 * top_k:
            skipped[name] = f"computes all {experts.num_experts} experts for every token (k = {top_k})"
            continue
        names.append(name)
    return names, skipped


def _training_call(fn: Callable, x: torch.Tensor, experts: StackedExperts, index: torch.Tensor,
                   weight: torch.Tensor) -> Callable[[], object]:
    """Forward + backward of one backend on detached copies; grads via `torch.autograd.grad`, so no ``.grad``
    of the real parameters is touched."""
    x_, w_ = x.detach().requires_grad_(), weight.detach().requires_grad_()
    params = [p for p in experts.parameters() if p.requires_grad]

    def call() -> object:
        with torch.enable_grad():
            out = fn(x_, experts, index, w_)
            return torch.autograd.grad(out, [x_, w_, *params], torch.ones_like(out), allow_unused=True)
    return call


def _inference_call(fn: Callable, x: torch.Tensor, experts: StackedExperts, index: torch.Tensor,
                    weight: torch.Tensor) -> Callable[[], object]:
    def call() -> object:
        with torch.no_grad():
            return fn(x, experts, index, weight)
    return call


class AutoSelector:
    """Measured choices per shape class, in memory and optionally in a JSON file."""

    def __init__(self, cache_path: str | os.PathLike | None = None, timer: Timer | None = None,
                 rounds: int = 3, mode: str | None = None, tie_margin: float = TIE_MARGIN,
                 tie_rounds: int = TIE_ROUNDS, tie_keep: float = TIE_KEEP):
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.timer = timer or default_timer
        self.rounds = rounds
        self.tie_margin, self.tie_rounds, self.tie_keep = tie_margin, tie_rounds, tie_keep
        self.mode = mode
        self.choices: dict[str, Choice] = {}
        self._disk_loaded = False

    def current_mode(self) -> str:
        mode = self.mode or os.environ.get(ENV_MODE, "measure").strip().lower() or "measure"
        if mode not in MODES:
            raise CMoEError(f"{ENV_MODE}: expected one of {', '.join(MODES)}, got {mode!r}; unset it to measure")
        return mode

    def _cache_file(self) -> Path | None:
        if self.cache_path is not None:
            return self.cache_path
        env = os.environ.get(ENV_CACHE, "").strip()
        return Path(env) if env else None

    def _load_disk(self) -> None:
        path = self._cache_file()
        self._disk_loaded = True
        for key, entry in read_cache_file(path).items() if path is not None else ():
            if key not in self.choices and entry.get("backend") in BACKENDS:
                self.choices[key] = Choice(entry["backend"], dict(entry.get("times_ms", {})),
                                           dict(entry.get("skipped", {})), source="disk",
                                           kept_table=bool(entry.get("kept_table", False)))

    def _save_disk(self, key: str, choice: Choice) -> None:
        path = self._cache_file()
        if path is not None:
            entry = asdict(choice)
            entry.pop("source")
            write_cache_entry(path, key, entry)

    def choose(self, x: torch.Tensor, experts: StackedExperts, index: torch.Tensor, weight: torch.Tensor,
               fallback: str) -> Choice:
        """The choice for this flattened call: cached, or measured now; `fallback` is the table rule's answer."""
        if torch.compiler.is_compiling() or self.current_mode() == "table":
            return Choice(fallback, source="table")
        key = shape_class(x, experts, index, weight).key
        if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # no timing inside a graph
            return self.choices.get(key, Choice(fallback, source="table"))
        if not self._disk_loaded:
            self._load_disk()
        if key in self.choices:
            return self.choices[key]
        choice = self.measure(x, experts, index, weight, fallback)
        self.choices[key] = choice
        if choice.source == "measured":
            self._save_disk(key, choice)
        return choice

    def measure(self, x: torch.Tensor, experts: StackedExperts, index: torch.Tensor, weight: torch.Tensor,
                fallback: str) -> Choice:
        """Time every candidate (one warm-up call, then `rounds` round-robin calls each; the minimum counts). The
        fastest wins, unless the table rule's backend (`fallback`) is within `tie_keep` of it (see `TIE_KEEP`)."""
        names, skipped = candidates(x, experts, index.shape[-1])
        make = _training_call if is_training(x, experts, weight) else _inference_call
        calls = {}
        for name in names:
            call = make(BACKENDS.get(name).fn, x, experts, index, weight)
            try:
                call()
            except Exception as exc:  # a candidate that cannot run these inputs is reported, not fatal
                skipped[name] = f"raised {type(exc).__name__}: {exc}"
                continue
            calls[name] = call
        if not calls:
            return Choice(fallback, skipped=skipped, source="table")
        times: dict[str, list[float]] = {name: [] for name in calls}
        self._rounds(calls, times, self.rounds, x.device)
        tied = near_ties({name: min(values) for name, values in times.items()}, self.tie_margin)
        if len(tied) > 1 and self.tie_rounds > 0:  # a near tie: time only the tied ones again, more often
            self._rounds({name: calls[name] for name in tied}, times, self.tie_rounds, x.device)
        best = {name: min(values) for name, values in times.items()}
        fastest = min(best, key=lambda name: (best[name], name))
        if fallback != fastest and fallback in best and best[fallback] <= best[fastest] * (1 + self.tie_keep):
            return Choice(fallback, best, skipped, kept_table=True)
        return Choice(fastest, best, skipped)

    def _rounds(self, calls: dict[str, Callable[[], object]], times: dict[str, list[float]], rounds: int,
                device: torch.device) -> None:
        """`rounds` round-robin passes over `calls`, alternating the order (so drift hurts no one backend)."""
        for round_ in range(rounds):
            for name in (list(calls) if round_ % 2 == 0 else list(calls)[::-1]):
                times[name].append(float(self.timer(name, calls[name], device)))


def near_ties(best: dict[str, float], margin: float) -> list[str]:
    """The candidates whose best time is within `margin` (a fraction) of the fastest one's."""
    if not best:
        return []
    fastest = min(best.values())
    return [name for name, value in best.items() if value <= fastest * (1 + margin)]


def read_cache_file(path: Path) -> dict[str, dict]:
    """The entries of a cache file, or none if it is missing, unreadable or of another format."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def write_cache_entry(path: Path, key: str, entry: dict) -> None:
    """Add one entry to the cache file, keeping the others, by writing a temporary file and renaming it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = read_cache_file(path)
    entries[key] = entry
    text = json.dumps({"format": CACHE_FORMAT, "entries": entries}, indent=1, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


_SELECTOR = AutoSelector()


def selector() -> AutoSelector:
    """The process-wide selector `moe_project` uses."""
    return _SELECTOR


def configure_auto(cache_path: str | os.PathLike | None = None, timer: Timer | None = None,
                   rounds: int = 3, mode: str | None = None, tie_margin: float = TIE_MARGIN,
                   tie_rounds: int = TIE_ROUNDS, tie_keep: float = TIE_KEEP) -> AutoSelector:
    """Replace the process-wide selector (forgetting its in-memory choices) and return it.

    Each candidate is timed `rounds` times (the minimum counts); candidates within `tie_margin` of the fastest
    are timed `tie_rounds` more times before the choice; the table rule's backend is kept within `tie_keep`.
    `cache_path` overrides ``CMOE_AUTO_CACHE``; `timer` replaces the wall-clock timer (tests pass a fake one);
    `mode` (``measure`` or ``table``) overrides ``CMOE_AUTO``.
    """
    global _SELECTOR
    _SELECTOR = AutoSelector(cache_path=cache_path, timer=timer, rounds=rounds, mode=mode, tie_margin=tie_margin,
                             tie_rounds=tie_rounds, tie_keep=tie_keep)
    return _SELECTOR


@contextmanager
def choices_recorded_in(path: str | os.PathLike, mode: str | None = None) -> Iterator[AutoSelector]:
    """Within the block, ``auto`` reads its choices from and records new ones in `path`.

    A training run keeps this file in its folder so that a resumed run (a new process) uses the backends the
    run started with: timing noise could otherwise pick another backend and break bit-exact resume. A cache
    the user set (``CMOE_AUTO_CACHE`` or `configure_auto`) is kept instead, and the mode and timer carry over.
    `mode` (``measure`` or ``table``), when given, overrides the current mode within the block.
    """
    global _SELECTOR
    previous = _SELECTOR
    if mode is not None and mode not in MODES:
        raise CMoEError(f"auto mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if previous._cache_file() is not None:
        saved, previous.mode = previous.mode, mode or previous.mode
        try:
            yield previous
        finally:
            previous.mode = saved
        return
    _SELECTOR = AutoSelector(cache_path=path, timer=previous.timer, rounds=previous.rounds,
                             mode=mode or previous.mode, tie_margin=previous.tie_margin,
                             tie_rounds=previous.tie_rounds, tie_keep=previous.tie_keep)
    try:
        yield _SELECTOR
    finally:
        _SELECTOR = previous


def auto_choices() -> dict[str, Choice]:
    """Every choice made (or loaded) so far in this process, by shape-class key."""
    return dict(_SELECTOR.choices)
