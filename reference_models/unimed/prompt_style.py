"""How a run words its prompts and reads its answers: the original Uni-Med's way, point by point, or ours.

The original's run differs from a clean one in the text that goes in and comes out, not in the computation
(docs/unimed.md, "The original's run, word for word"). ``style: original`` reproduces every point; ``style: cmoe``
is our cleaner choice; any point can be set on its own over either style (``prompts.<point>`` in a config or
``--set``). The resolved settings are recorded in every checkpoint and evaluation table (`PromptStyle.record`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cmoe.errors import CMoEError, UnknownNameError

_CHOICES: dict[str, tuple[Any, ...]] = {
    "templates": ("pools", "fixed"),
    "space_before_inst": (True, False),
    "eval_bos": (2, 1),
    "cut_answers": (False, True),
    "pubmedqa_instruction": ("own", "medqa"),
    "text_processor": ("original", "cmoe"),
    "tokenizer": ("original", "as_loaded"),
    "resize": ("pillow10", "installed"),
}
"""Each point's values, the original's first."""


@dataclass(frozen=True)
class PromptStyle:
    """The resolved settings.

    - ``templates``: ``pools`` draws each training instruction from the original's pool of its dataset
      (`instructions.POOLS`), ``fixed`` always uses the one its evaluation asks with.
    - ``space_before_inst``: the original's training prompts of image tasks (and its report eval prompts) end
      ``"<instruction>  [/INST]"``: one more space, hence one more ``▁`` token.
    - ``eval_bos``: the original's eval prompts start with two BOS tokens (``<s>`` in the conversation role plus
      the tokenizer's own); ours with one.
    - ``cut_answers``: ours collapses whitespace and keeps 50 words of a generated answer; the original scores
      the whole text its ``generate`` returns.
    - ``pubmedqa_instruction``: PubMedQA's own instruction ("... using 'yes', 'no' or 'maybe'") or MedQA's.
    - ``text_processor``: ``original`` (``blip_caption_new``: runs of ≥ 2 whitespace collapsed, 50 words counted
      between spaces) or ``cmoe`` (all whitespace collapsed); see `text_processing`.
    - ``tokenizer``: ``original`` tokenises and decodes as transformers 4.30's slow SentencePiece
      ``LlamaTokenizer`` (`model.sentencepiece_llama`), where the tokenizer folder has a ``tokenizer.model``;
      ``as_loaded`` uses the tokenizer the folder loads as today.
    - ``resize``: ``pillow10`` resizes images as Pillow 10.0.1 (the original's pin) does, the width first
      (`data.images.resize_bicubic`); ``installed`` with one call to the installed Pillow.

    Not a point: the original's ``generate`` passes ``min_length=1``, but transformers 4.30 starts generating from
    ``input_ids = [[bos]]``, so the rule never fires and an end-of-sequence token may come first, as in ours.
    """

    style: str
    templates: str
    space_before_inst: bool
    eval_bos: int
    cut_answers: bool
    pubmedqa_instruction: str
    text_processor: str
    tokenizer: str
    resize: str

    def record(self) -> dict[str, Any]:
        """The settings as recorded in checkpoints and evaluation tables (``prompts: original`` and each point)."""
        return {"prompts": self.style, **{k: v for k, v in dataclasses.asdict(self).items() if k != "style"}}


PROMPT_STYLES: dict[str, PromptStyle] = {
    "original": PromptStyle("original", **{point: values[0] for point, values in _CHOICES.items()}),
    "cmoe": PromptStyle("cmoe", **{point: values[1] for point, values in _CHOICES.items()}),
}


def resolve_style(style: str, overrides: dict[str, Any] | None = None) -> PromptStyle:
    """Style `style` with `overrides` (point → value) applied; an unknown style, point or value names the known."""
    if style not in PROMPT_STYLES:
        raise UnknownNameError("prompt style", style, PROMPT_STYLES)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for point, value in overrides.items():
        if point not in _CHOICES:
            raise UnknownNameError("prompts setting", point, _CHOICES)
        if value not in _CHOICES[point] or isinstance(value, bool) != isinstance(_CHOICES[point][0], bool):
            raise CMoEError(f"prompts.{point}: expected one of {', '.join(map(repr, _CHOICES[point]))} "
                            f"(the original's first), got {value!r}")
    base = PROMPT_STYLES[style]
    changed = {point: value for point, value in overrides.items() if getattr(base, point) != value}
    return dataclasses.replace(base, **overrides, style=style if not changed else f"{style}+custom")


def points() -> tuple[str, ...]:
    """The settings a style fixes, in the order docs/unimed.md lists them."""
    return tuple(_CHOICES)


def run_record(config: Any, tokenizer: Any = None) -> dict[str, Any]:
    """What a run reproduces of the original's, as checkpoints (``state.json``'s ``"original_run"``) and
    evaluation tables record it: the prompt settings (the tokenizer as actually loaded: ``original`` only where
    the folder has a SentencePiece model), the MIMIC-CXR annotation scored, and the LLM's weight precision."""
    record = config.prompts.resolved().record()
    if tokenizer is not None:
        record["tokenizer"] = getattr(tokenizer, "cmoe_setting", "as_loaded")
    for entry in getattr(config.data, "datasets", []):
        if entry.name == "mimic_cxr":
            options = entry.options
            record["mimic_cxr_eval_annotation"] = options.get("eval_annotation") or options.get(
                "annotation", "annotation.json")
    model = config.model
    record["llm_weights"] = model.dtype if model.llm_upcast is None else f"{model.dtype} loaded, {model.llm_upcast}"
    return record


def format_record(record: dict[str, Any]) -> str:
    """One line for a Markdown table's header: ``prompts: original (templates=pools, ...)``."""
    rest = ", ".join(f"{key}={value}" for key, value in record.items() if key != "prompts")
    return f"Run: prompts: {record.get('prompts')} ({rest})."
