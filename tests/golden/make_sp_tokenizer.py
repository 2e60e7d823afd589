"""Train the tiny SentencePiece tokenizer that both sides of the original-run golden files share.

A LLaMA-style model (BPE, byte fallback, a dummy prefix, whitespace kept as is, digits split, ids 0/1/2 for
``<unk>``/``<s>``/``</s>``, no pad), 560 pieces, trained on the original's instruction templates and medical words
so that prompts tokenise into a mix of whole words, pieces and bytes. Deterministic (one thread, no sampling);
the committed ``tests/data/unimed_original_run/tokenizer.model`` came from it:

    python tests/golden/make_sp_tokenizer.py tests/data/unimed_original_run
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

CORPUS = """\
[INST] <Img><ImageHere></Img> [vqa] Based on the image, respond to this question with a short answer: [/INST]
[refer] give me the location of the liver. where is the lung ? from this image, tell me the location of
[refer] the location of the heart is could you tell me the location for the spleen ? where can I locate the
[identify] what object is in this location {<12><34><56><78>} identify the object present at this location
[identify] what is it in describe this object in this is the object in is
[caption] Describe the given chest x-ray image in detail. Take a look at this chest x-ray and describe the
findings and impression. Could you provide a detailed description of the given x-ray image? Describe the given
chest x-ray image as detailed as possible. What are the key findings in this chest x-ray image?
Describe this input image. Help captioning the image. What can be inflected from the scan? Can you give a caption
for this image? Can you provide a brief summary of the radiology image? Please write a report about the image?
Can you provide an analysis of this image? Can you explain what is shown in this image? What can be indicated
from the radiologic scans? What can you infer from this photograph?
[qa] If you are a doctor, please answer the following question briefly: which drug is best for this patient?
[qa] If you are a doctor, please answer the following question using 'yes', 'no' or 'maybe': yes no maybe
[cls] Which category does this CT image belong to: bladder, left femur, right femur, heart, left kidney,
right kidney, liver, left lung, right lung, pancreas, or spleen? Which category does this multi-source
dermatoscopic image of common pigmented skin lesions belong to: actinic keratoses and intraepithelial carcinoma,
basal cell carcinoma, benign keratosis-like lesions, dermatofibroma, melanoma, melanocytic nevi, or vascular lesions?
The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal. Mild cardiomegaly.
Is the liver healthy? Yes. What modality is this? MRI CT X-Ray. Which organ is abnormal? Brain tumor core.
A 45-year-old man presents with chest pain and shortness of breath for 2 days.
"""


def train(out_dir: Path) -> Path:
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4), model_writer=model, model_type="bpe", vocab_size=560,
        byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, shuffle_input_sentence=False,
        max_sentence_length=4096, minloglevel=2)
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    # Llama-2-7b-chat-hf's tokenizer_config.json and special_tokens_map.json: the special tokens are AddedToken
    # records with lstrip/rstrip false (a plain string would make transformers 4.30 strip the text around them).
    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False}

    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": added("<s>"),
              "clean_up_tokenization_spaces": False, "eos_token": added("</s>"), "legacy": False,
              "model_max_length": 1000000000000000019884624838656, "pad_token": None, "padding_side": "right",
              "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": added("<unk>")}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {name: {k: v for k, v in added(text).items() if k != "__type"}
               for name, text in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(train(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/unimed_original_run")))
