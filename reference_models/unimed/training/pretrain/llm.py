"""The tiny LLaMA trained as a causal LM on the synthetic text, with the fixed word-level tokenizer."""

from __future__ import annotations

import torch
from torch import nn

from cmoe.reference_models.unimed.data.synthetic import VOCABULARY, SyntheticConfig, generate
from cmoe.reference_models.unimed.prompts import build_prompt, split_at_image
from cmoe.reference_models.unimed.tasks import get_task
from cmoe.reference_models.unimed.training.pretrain.config import LLM_CONFIG, PretrainConfig, schedule


def build_tokenizer():
    """The fixed word-level tokenizer of the pretrained tiny LLM: every word the synthetic generator and the
    prompt template can emit (`VOCABULARY`), so no recipe text maps to ``<unk>``."""
    from cmoe.reference_models.unimed.model.tokenizer import build_word_tokenizer

    return build_word_tokenizer([" ".join(VOCABULARY)])


def lm_texts(config: PretrainConfig) -> list[str]:
    """The language-model corpus: each synthetic entry's prompt with the image part left out, its answer and
    ``</s>`` (every task, QA included), from scenes apart from the recipe's."""
    samples = generate(SyntheticConfig(num_images=config.llm_images, image_size=config.image_size,
                                       seed=config.data_seed + 1, qa_questions=config.llm_images // 4))
    texts = []
    for sample in samples:
        prompt = build_prompt(get_task(sample.task), sample.fields, answer=sample.answer)
        pieces = split_at_image(prompt.prompt)
        text = prompt.prompt if pieces is None else "".join(pieces).replace("<Img></Img>", "<Img> </Img>")
        texts.append(f"{text} {prompt.answer}")
    return texts


def train_llm(config: PretrainConfig, tokenizer, log=print) -> tuple[nn.Module, list[float]]:
    """The tiny LLaMA trained as a causal LM on `lm_texts` (loss on every token), and its loss per step."""
    from transformers import AutoConfig, AutoModelForCausalLM

    texts = lm_texts(config)
    ids = [[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids] for text in texts]
    options = {k: v for k, v in LLM_CONFIG.items() if k != "model_type"}
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        LLM_CONFIG["model_type"], vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **options))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.llm_lr, weight_decay=0.01)
    scheduler = schedule(optimizer, config.llm_steps)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    losses = []
    for step in range(config.llm_steps):
        rows = [ids[i] for i in torch.randint(len(ids), (config.llm_batch,), generator=generator).tolist()]
        length = max(map(len, rows))
        input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (length - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
        labels = input_ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, config.llm_steps // 10) == 0:
            log(f"llm step {step + 1}/{config.llm_steps}: loss {losses[-1]:.4f}")
    return model.eval(), losses
