"""Golden files from the ORIGINAL Uni-Med code, run unchanged on tiny shared weights and tiny raw datasets.

Re-run (the venv takes about a minute to install, the run about ten seconds on 2 CPU cores)::

    git --git-dir=/work/.mirror/tsinghua-msiip+Uni-Med/repo archive 63b9dfb | tar -x -C /tmp/unimed-original
    bash tests/golden/original_venv.sh /tmp/unimed-orig-venv
    /tmp/unimed-orig-venv/bin/python tests/golden/make_original_run.py /tmp/unimed-original tests/data/unimed_original_run

The first argument is a work tree of tsinghua-msiip/Uni-Med at commit 63b9dfb0db31e61afcb381865225d69518377f3d
(checked: when the git mirror above exists, the script refuses a tree whose files' blob hashes differ from that
commit's), the second the output folder. Re-running reproduces every file byte for byte (checked: twice in the
same venv, and once in a venv freshly made by original_venv.sh; the run is single-threaded and seeded, and every
path stored in the checkpoint's config is relative to a scratch folder). Another torch build could change the
random initialisation or the last bits of float32 results; the versions used are in golden.json["versions"].

What it writes to OUT_DIR (reads ``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json``
there, made by tests/golden/make_sp_tokenizer.py):

- ``llm/``: a tiny Llama (LlamaConfig: vocab 560, hidden 64, intermediate 128, 2 layers, 4 heads, 512 positions,
  rms_norm_eps 1e-6, bos 1, eos 2, pad 0, untied), random init (seed 1234, initializer_range 0.3; EOS's
  lm_head row set to 1.1 x token 227's so that some greedy generations stop), saved by transformers 4.30 in
  float16 as safetensors, with the tokenizer files: a stand-in for Llama-2-7b-chat-hf.
- ``checkpoint_0.pth``: what the original's runner saves (``RunnerBase._save_checkpoint`` itself, run on a
  stand-in runner): the trainable parameters (connector, task tokens, router, LoRA) of a model built by
  ``train.py``'s path (``Config`` from ``train_configs/uni_med.yaml`` with ``--options`` overrides,
  ``setup_seeds``, ``tasks.setup_task``, ``task.build_model``), the LoRA B matrices re-drawn N(0, 0.02) so LoRA
  matters, the AdamW state dict from ``RunnerBase.optimizer``, ``cfg.to_dict()``, scaler None, epoch 0.
- ``golden.json`` and ``golden.safetensors``: the records (schema in ``golden.json["schema"]``).

Harness patches (the original's files are not edited; each is listed in golden.json["produced_by"]):

1. torchvision 0.28.0 (the only wheel there is) is a CUDA build whose C extension cannot load on CPU torch, and its
   ``_meta_registrations`` then fails at import on ``register_fake("torchvision::nms"/"qnms")``: the two operator
   schemas are declared (``torch.library``, no kernels) before torchvision is imported. No torchvision operator
   runs (the original uses ``transforms.Resize`` on PIL images, ``ToTensor`` and ``Normalize``).
2. EVA-CLIP-g cannot run here: ``uni_med.models.base_model.create_eva_vit_g`` is replaced by a stub vision
   encoder (image 32x32, 8x8 patches -> 16 tokens row-major; token = W @ mean_rgb(patch) + b, W [8, 3] and b [8]
   from seed 4321, stored in golden.json["vision_stub"]; a first, "CLS", token W @ mean_rgb(image) + b, which
   ``encode_img`` drops; ``num_features`` 8; its parameters are frozen by ``init_vision_encoder`` as EVA's are).
3. ``ln_vision`` is the identity: ``uni_med.models.base_model.LayerNorm`` (used only to build ``ln_vision``) is
   replaced by a factory returning ``nn.Identity()``.
4. ``init_model`` (uni_med/common/eval_utils.py) moves the model to ``cuda:0``: ``torch.nn.Module.to`` maps a
   CUDA device to CPU while it runs. Everything runs on CPU in float32 (``maybe_autocast`` is off on CPU).
5. ``random.choice`` is forced to ``pool[k]`` while a training ``__getitem__`` runs (every k is recorded).
6. The eval scripts build a model at import and run all datasets in module-level ``if '<name>' in args.dataset``
   blocks: each script is parsed with ``ast``; its top-level statements other than those blocks are executed as
   written (imports of metric packages that are not installed, pycocoevalcap and rouge in eval_caption.py, are
   skipped: they are only used by metrics), with ``sys.argv`` = ``[script, --cfg-path,
   eval_configs/uni_med_benchmark_evaluation.yaml, --dataset, <name>, --options, ...]``; then the statements of
   the dataset's block (eval_cls.py: of ``eval_2d``'s body, with its two arguments bound as the block binds them)
   are executed as written up to and including the ``for ... in tqdm(eval_dataloader)`` loop (the saving and
   metrics after it are not run). ``batch_size`` is the config's 40, so each test split is one batch.
6b. medmnist 3.0.1's ``__len__`` asserts the real release's split sizes (``INFO[flag]["n_samples"]``): those
   entries of its (global) INFO dict are set to the tiny files' sizes.
7. The training task name is the original's own expression (``re.search(r'\\[(.*?)\\]',
   samples['instruction_input'][0]).group(1)`` from ``BaseTask._train_inner_loop``), evaluated via ``ast``; the
   batch is ``torch.utils.data.default_collate`` of the items (the runner's loaders have no ``collater``).
8. Capture only: wrappers on the model instance's ``encode_img``, ``get_context_emb``, ``generate`` and on
   ``llm_model.generate``, forward hooks (with kwargs) on peft's ``LoraModel`` (training forward) and on the
   inner ``LlamaForCausalLM`` (generation steps). Token ids at
   embedding rows are recovered by exact comparison with the embedding matrix (-1: an image row, checked equal
   to ``encode_img``'s output).
9. Text-only (MedQA, PubMedQA): the original has no evaluation for them (no eval script reads their test files).
   "model.eval_text_only" runs the original ``UniMedBase.generate(None, texts)`` (its text branch) on prompts the
   HARNESS builds the way the eval scripts build theirs (the eval scripts' ``Conversation``, message = the
   training instruction with the pool's last template); flagged ``harness_built_prompt``.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

COMMIT = "63b9dfb0db31e61afcb381865225d69518377f3d"
MIRROR = "/work/.mirror/tsinghua-msiip+Uni-Med/repo"
LLM_SEED = 1234
LLM_INIT_RANGE = 0.3
# lm_head row of EOS (id 2) := 1.1 x the row of token 227, chosen after a run without it: 227 is the first
# greedy token of one eval sample (path_vqa's second) and appears later in ten others, so generation stops at the
# first step, in the middle, and not at all (100 tokens) across the eval batches.
EOS_ROW_FROM = 227
EOS_ROW_SCALE = 1.1
VISION_SEED = 4321
LORA_B_SEED = 2024
LORA_B_STD = 0.02
IMAGE_SIZE = 32
PATCH = 8
NUM_FEATURES = 8
TASK_TOKEN_C = 32
HERE = Path(__file__).resolve().parent
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
TEXT_DATASETS = ("medqa_en", "pubmedqa")
IMAGE_DATASETS = ("slakevqa_en", "path_vqa", "ref_slake", "invref_slake", "ref_sa_med", "invref_sa_med",
                  "medpix_single", "mimic_caption", "medmnist_2d_small")
TRAIN_DATASETS = TEXT_DATASETS + IMAGE_DATASETS
# eval set -> (script, the name its `if ... in args.dataset` block tests, training dataset it belongs to)
EVAL_SETS = {
    "slakevqa_en": ("eval_vqa.py", "slakevqa_en", "slakevqa_en"),
    "path_vqa": ("eval_vqa.py", "path_vqa", "path_vqa"),
    "ref_slake": ("eval_ref.py", "ref_slake", "ref_slake"),
    "ref_sa_med": ("eval_ref.py", "ref_sa_med", "ref_sa_med"),
    "invref_slake": ("eval_identify.py", "invref_slake", "invref_slake"),
    "invref_sa_med": ("eval_identify.py", "invref_sa_med", "invref_sa_med"),
    "mimic_caption": ("eval_caption.py", "mimic_caption", "mimic_caption"),
    "medpix_single": ("eval_caption.py", "medpix_single", "medpix_single"),
    "medmnist_2d_derma": ("eval_cls.py", "medmnist_2d_derma", "medmnist_2d_small"),
    "medmnist_2d_organs": ("eval_cls.py", "medmnist_2d_organs", "medmnist_2d_small"),
}
PACKAGES = ("torch", "torchvision", "transformers", "tokenizers", "sentencepiece", "safetensors", "peft",
            "accelerate", "numpy", "pillow", "pandas", "omegaconf", "jsonlines", "timm", "medmnist", "nltk",
            "huggingface-hub", "setuptools", "scikit-image", "opencv-python-headless", "decord", "webdataset",
            "wandb")

# ---------------------------------------------------------------------------------------------------------------
# Inputs of the text records

TEXT_PROCESSOR_INPUTS = [
    "", " ", "  ", "\n", "\n\n", "Is the liver healthy?", "Is the liver  healthy?", "Is the liver\thealthy?",
    "Is the liver\t\thealthy?", "Is the liver\nhealthy?", "Is the liver\n\nhealthy?", "  leading and trailing  ",
    " one leading", "trailing one ", "trailing newline\n", "trailing newlines\n\n", "\nleading newline",
    "trailing space then newline \n", "trailing newline then space\n ", "UPPER Case, Punctuation: (yes) #1! ~ok.",
    "a . b  ,  c", " ".join(f"w{i}" for i in range(60)), " ".join(f"w{i}" for i in range(50)) + "  ",
    "w0 w1\nw2 " + " ".join(f"w{i}" for i in range(3, 55)), "{<12><34><56><78>}", "Right  Lung", "肝脏  健康吗?",
    "tab\tinside\tonly", "mixed \t\n whitespace",
]
TOKENIZER_INPUTS = [
    "", " ", "  ", "a", " a", "  a", "a ", "a  ", "hello world", " hello world", "Hello World", "HELLO",
    "<s>", "</s>", "<unk>", "<s>[INST] <Img>", "<s>[INST] ", "[INST] <Img><ImageHere></Img> [vqa] x [/INST]",
    "[INST] [qa] x  [/INST]", "yes</s>", "yes </s>", "a </s> b", "a</s>b", "<s>a", " <s> a", "$$", "a$$b",
    "line one\nline two", "a\n\nb", "\n", "tab\there", "é ü 中文", "emoji 🙂", "digits 1234567890",
    "box {<12><34><56><78>}", "{<0><0><100><100>}", "If you are a doctor, please answer the following question "
    "briefly: which drug?", "[caption] Describe the given chest x-ray image in detail. ", "<Img>", "</Img>",
    "<ImageHere>", "Mild cardiomegaly</s>",
]
DECODE_INPUTS = [
    [], [0], [1], [2], [0, 1, 2], [1, 296, 262, 2], [0, 296, 262], [1, 0, 296, 262, 2, 0, 0],
    [296, 262, 2, 296, 262], [497], [497, 497], [497, 379, 326, 507, 502], [13], [264, 13, 516],
    [198, 172], [198], [231, 187, 176], [497, 39, 39], [290, 462, 523], [331, 290, 540, 462, 523],
    [558, 528, 548, 541, 324, 549, 542, 324, 543, 550, 324, 551, 552, 529, 559], [2, 2, 2],
    [1, 1, 290, 462, 523], [559, 3, 4, 5],
]


# ---------------------------------------------------------------------------------------------------------------
# Environment


def declare_torchvision_ops() -> None:
    """Harness patch 1: declare the two operator schemas torchvision's _meta_registrations registers fakes for."""
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018
        return
    except (AttributeError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    declare_torchvision_ops.library = library  # keep it alive


def check_checkout(checkout: Path) -> str:
    """The tree's files against the commit's, when git can tell; returns how it was checked."""
    mirror = Path(MIRROR)
    if not mirror.exists():
        return "not checked (no git mirror reachable)"
    listing = subprocess.run(["git", "--git-dir", str(mirror), "ls-tree", "-r", COMMIT], capture_output=True,
                             text=True, check=True).stdout
    differing = []
    for line in listing.splitlines():
        meta, path = line.split("\t", 1)
        sha = meta.split()[2]
        file = checkout / path
        if not file.is_file():
            differing.append(f"{path} (missing)")
            continue
        data = file.read_bytes()
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        if blob != sha:
            differing.append(path)
    if differing:
        raise SystemExit(f"{checkout} differs from {COMMIT}: {differing[:10]}")
    return f"every file of the commit's tree checked against the git mirror (blob hashes), {len(listing.splitlines())} files"


def versions() -> dict:
    result = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            result[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            result[name] = None
    return result


# ---------------------------------------------------------------------------------------------------------------
# Stubs (harness patches 2 and 3)


def make_vision_stub_params():
    import torch

    generator = torch.Generator().manual_seed(VISION_SEED)
    weight = torch.randn(NUM_FEATURES, 3, generator=generator)
    bias = torch.randn(NUM_FEATURES, generator=generator) * 0.5
    return weight, bias


def install_stubs() -> dict:
    import torch
    from torch import nn

    import uni_med.models.base_model as base_model

    weight, bias = make_vision_stub_params()

    class StubVisionEncoder(nn.Module):
        """Stands in for EVA-CLIP-g: [B, 3, 32, 32] -> [B, 1 + 16, 8]."""

        def __init__(self):
            super().__init__()
            self.num_features = NUM_FEATURES
            self.weight = nn.Parameter(weight.clone())
            self.bias = nn.Parameter(bias.clone())

        def forward(self, image):
            b, c, h, w = image.shape
            assert (h, w) == (IMAGE_SIZE, IMAGE_SIZE), image.shape
            cells = h // PATCH
            means = image.reshape(b, c, cells, PATCH, cells, PATCH).mean(dim=(3, 5))  # [B, 3, 4, 4]
            means = means.permute(0, 2, 3, 1).reshape(b, cells * cells, c)  # row-major patches
            cls = image.mean(dim=(2, 3))[:, None, :]
            tokens = torch.cat([cls, means], dim=1)
            return tokens @ self.weight.t() + self.bias

    def create_eva_vit_g(img_size=224, drop_path_rate=0.4, use_checkpoint=False, precision="fp16"):
        assert img_size == IMAGE_SIZE, img_size
        return StubVisionEncoder()

    def identity_layer_norm(*args, **kwargs):
        return nn.Identity()

    base_model.create_eva_vit_g = create_eva_vit_g
    base_model.LayerNorm = identity_layer_norm
    return {"image_size": IMAGE_SIZE, "patch": PATCH, "num_features": NUM_FEATURES,
            "weight": weight.tolist(), "bias": bias.tolist(), "seed": VISION_SEED,
            "tokens": "token t (t = 0..15, row-major over the 4x4 grid of 8x8 patches) = weight @ mean_rgb(patch t) "
                      "+ bias, on the vis processor's normalised pixels; the encoder returns [CLS, t0..t15] with "
                      "CLS = weight @ mean_rgb(image) + bias, which encode_img drops ([:, 1:, :])",
            "ln_vision": "identity (the original builds a fresh, frozen LayerNorm(num_features); replaced)",
            "resample": "projection, rate 4: view(bs, 16 / 4, 8 * 4): tokens 4j..4j+3 concatenated (one patch row)"}


def patch_medmnist_counts(data_module) -> dict:
    """Harness patch: medmnist 3.0.1's __len__ asserts the split sizes of the real release (INFO[flag]
    ["n_samples"]); the tiny files' sizes are written into that (global) dict."""
    from medmnist.info import INFO

    counts = {}
    for flag, (_, splits) in data_module.MEDMNIST.items():
        counts[flag] = {"release": dict(INFO[flag]["n_samples"]), "tiny": {k: len(v) for k, v in splits.items()}}
        INFO[flag]["n_samples"].update(counts[flag]["tiny"])
    return counts


@contextlib.contextmanager
def cuda_to_cpu():
    """Harness patch 4: Module.to('cuda:0') -> CPU while init_model runs."""
    import torch

    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        args = tuple("cpu" if (isinstance(a, str) and a.startswith("cuda")) or
                     (isinstance(a, torch.device) and a.type == "cuda") else a for a in args)
        if "device" in kwargs and str(kwargs["device"]).startswith("cuda"):
            kwargs["device"] = "cpu"
        return original(self, *args, **kwargs)

    torch.nn.Module.to = to
    try:
        yield
    finally:
        torch.nn.Module.to = original


@contextlib.contextmanager
def forced_choice(k: int | None, calls: list):
    """Harness patch 5: random.choice(seq) -> seq[k]."""
    original = random.choice

    def choice(seq):
        calls.append(len(seq))
        return seq[k]

    random.choice = choice
    try:
        yield
    finally:
        random.choice = original


# ---------------------------------------------------------------------------------------------------------------
# Tiny LLM


def make_llm(out_dir: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    llm_dir = out_dir / "llm"
    if llm_dir.exists():
        shutil.rmtree(llm_dir)
    config = LlamaConfig(vocab_size=560, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                         initializer_range=LLM_INIT_RANGE)
    torch.manual_seed(LLM_SEED)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # EOS's output row: a multiple of another token's, so that some generations stop
        model.lm_head.weight[config.eos_token_id] = EOS_ROW_SCALE * model.lm_head.weight[EOS_ROW_FROM]
    model = model.half()
    model.save_pretrained(llm_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(out_dir / name, llm_dir / name)
    return {"config": json.loads((llm_dir / "config.json").read_text()),
            "files": sorted(p.name for p in llm_dir.iterdir()), "seed": LLM_SEED,
            "init": f"LlamaForCausalLM(config) after torch.manual_seed({LLM_SEED}) (normal std initializer_range="
                    f"{LLM_INIT_RANGE}, RMSNorm weights 1), lm_head.weight[2] := {EOS_ROW_SCALE} * lm_head.weight[{EOS_ROW_FROM}] "
                    "(so that some greedy generations emit EOS), then .half() and "
                    "save_pretrained(safe_serialization=True)"}


# ---------------------------------------------------------------------------------------------------------------
# Config (the original's Config, with --options overrides)


def train_options() -> list[str]:
    options = ["model.image_size=32", f"model.task_token_c={TASK_TOKEN_C}", "model.llm_model_path=llm",
               "run.output_dir=output"]
    for name in IMAGE_DATASETS:
        options.append(f"datasets.{name}.vis_processor.train.image_size=32")
    options += [
        "datasets.medqa_en.build_info.ann_path=data/MedQA",
        "datasets.pubmedqa.build_info.ann_path=data/PubMedQA",
        "datasets.slakevqa_en.build_info.data_dir=data/Slake-VQA",
        "datasets.ref_slake.build_info.data_dir=data/Slake-VQA",
        "datasets.invref_slake.build_info.data_dir=data/Slake-VQA",
        "datasets.path_vqa.build_info.annotations.train.storage=[data/Path-VQA/qas/train_vqa.pkl]",
        "datasets.path_vqa.build_info.images.storage=data/Path-VQA/images",
        "datasets.ref_sa_med.build_info.image_dir=data/SA-Med2D-20M/images_small_train",
        "datasets.ref_sa_med.build_info.region_dir=data/SA-Med2D-20M/regions_small_train",
        "datasets.invref_sa_med.build_info.image_dir=data/SA-Med2D-20M/images_small_train",
        "datasets.invref_sa_med.build_info.region_dir=data/SA-Med2D-20M/regions_small_train",
        "datasets.medpix_single.build_info.annotations.train.storage=[data/MedPix/data_csv/MedPix_single_train.csv]",
        "datasets.medpix_single.build_info.images.storage=data/MedPix/MedPix/images",
        "datasets.mimic_caption.build_info.annotations.train.storage=[data/MIMIC_caption/annotation_small.json]",
        "datasets.mimic_caption.build_info.images.storage=data/MIMIC-CXR-JPG/2.0.0",
        "datasets.medmnist_2d_small.build_info.images.storage=data/MedMNIST",
    ]
    return options


def eval_options() -> list[str]:
    return [
        "model.image_size=32", f"model.task_token_c={TASK_TOKEN_C}", "model.llm_model_path=llm",
        "model.ckpt=checkpoint_0.pth", "datasets.slakevqa_en.vis_processor.train.image_size=32",
        "run.save_path=eval_output",
        "evaluation_datasets.slakevqa_en.eval_file_path=data/Slake-VQA",
        "evaluation_datasets.slakevqa_en.img_path=data/Slake-VQA/imgs",
        "evaluation_datasets.path_vqa.eval_file_path=data/Path-VQA/qas",
        "evaluation_datasets.path_vqa.img_path=data/Path-VQA/images",
        "evaluation_datasets.ref_slake.data_dir=data/Slake-VQA",
        "evaluation_datasets.invref_slake.data_dir=data/Slake-VQA",
        "evaluation_datasets.ref_sa_med.image_dir=data/SA-Med2D-20M/images_small_test",
        "evaluation_datasets.ref_sa_med.region_dir=data/SA-Med2D-20M/regions_small_test",
        "evaluation_datasets.invref_sa_med.image_dir=data/SA-Med2D-20M/images_small_test",
        "evaluation_datasets.invref_sa_med.region_dir=data/SA-Med2D-20M/regions_small_test",
        "evaluation_datasets.mimic_caption.eval_file_path=data/MIMIC_caption",
        "evaluation_datasets.mimic_caption.img_path=data/MIMIC-CXR-JPG/2.0.0",
        "evaluation_datasets.medpix_single.eval_file_path=data/MedPix/data_csv",
        "evaluation_datasets.medpix_single.img_path=data/MedPix/MedPix/images",
        "evaluation_datasets.medmnist_2d.data_dir=data/MedMNIST",
    ]


# ---------------------------------------------------------------------------------------------------------------
# ast helpers


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def run_statements(statements: list, filename: Path, namespace: dict) -> None:
    code = compile(ast.Module(body=list(statements), type_ignores=[]), str(filename), "exec")
    exec(code, namespace)  # noqa: S102 - the original's own statements


def lift_function(path: Path, name: str, namespace: dict, class_name: str | None = None):
    tree = parse(path)
    nodes = tree.body
    if class_name is not None:
        nodes = next(n for n in nodes if isinstance(n, ast.ClassDef) and n.name == class_name).body
    node = next(n for n in nodes if isinstance(n, ast.FunctionDef) and n.name == name)
    run_statements([node], path, namespace)
    return namespace[name]


def _dataset_block_name(node) -> str | None:
    """'x' for `if 'x' in args.dataset:`."""
    if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and isinstance(node.test.left, ast.Constant):
        comparator = node.test.comparators[0]
        if isinstance(comparator, ast.Attribute) and comparator.attr == "dataset":
            return node.test.left.value
    return None


def up_to_loop(statements: list) -> tuple[list, ast.For]:
    for index, node in enumerate(statements):
        if isinstance(node, ast.For) and "eval_dataloader" in ast.unparse(node.iter):
            return statements[: index + 1], node
    raise RuntimeError("no eval loop found")


# ---------------------------------------------------------------------------------------------------------------
# JSON helpers


def plain(value):
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def dump_json(value, indent: int = 0) -> str:
    """JSON with one key per line, but lists of scalars on one line (the id lists stay readable and small)."""
    pad = " " * (indent + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {dump_json(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            return json.dumps(value, ensure_ascii=False, allow_nan=False)
        items = [f"{pad}{dump_json(v, indent + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


# ---------------------------------------------------------------------------------------------------------------
# Capture


class Capture:
    """Wraps (never edits) the model's methods and hooks its inner LLM."""

    def __init__(self, model):
        self.model = model
        self.encode_calls = []
        self.context_calls = []
        self.llm_forward_calls = []
        self.llm_generate_calls = []
        self.generate_calls = []
        self.keep_forward = True
        # UniMedBase.forward -> PeftModelForCausalLM.forward -> LoraModel.__call__ (hook fires) -> LoraModel.forward
        # -> inner.forward (called directly: no hook); generate -> inner.generate -> inner.__call__ (hook fires).
        lora_model = model.llm_model.base_model
        inner = lora_model.model  # the original's modeling_llama.LlamaForCausalLM
        self.embedding = inner.model.embed_tokens.weight
        self.hooks = [lora_model.register_forward_hook(self._forward_hook, with_kwargs=True),
                      inner.register_forward_hook(self._forward_hook, with_kwargs=True)]

        encode_img = model.encode_img
        get_context_emb = model.get_context_emb
        generate = model.generate
        llm_generate = model.llm_model.generate

        def encode_img_wrapper(image, task):
            vision = model.visual_encoder(image)  # the stub is deterministic: recomputed for the record
            out = encode_img(image, task)
            self.encode_calls.append({"task": task, "vision": vision.detach().clone(), "embeds": out[0].detach().clone(),
                                      "routing": None if out[2] is None else out[2].detach().clone()})
            return out

        def get_context_emb_wrapper(prompt, img_list):
            out = get_context_emb(prompt, img_list)
            self.context_calls.append({"prompt": prompt, "embs": out.detach().clone(),
                                       "images": [i.detach().clone() for i in img_list]})
            return out

        def generate_wrapper(images, texts, **kwargs):
            answers = generate(images, texts, **kwargs)
            self.generate_calls.append({"texts": list(texts), "kwargs": dict(kwargs), "answers": list(answers)})
            return answers

        def llm_generate_wrapper(**kwargs):
            out = llm_generate(**kwargs)
            self.llm_generate_calls.append({"kwargs": kwargs, "output": out.detach().clone()})
            return out

        model.encode_img = encode_img_wrapper
        model.get_context_emb = get_context_emb_wrapper
        model.generate = generate_wrapper
        model.llm_model.generate = llm_generate_wrapper

    def _forward_hook(self, module, args, kwargs, output):
        if self.keep_forward:
            self.llm_forward_calls.append({
                "inputs_embeds": None if kwargs.get("inputs_embeds") is None else kwargs["inputs_embeds"].detach().clone(),
                "input_ids": None if kwargs.get("input_ids") is None else kwargs["input_ids"].detach().clone(),
                "attention_mask": None if kwargs.get("attention_mask") is None else kwargs["attention_mask"].detach().clone(),
                "labels": None if kwargs.get("labels") is None else kwargs["labels"].detach().clone(),
                "logits": output.logits.detach().clone(),
                "loss": None if output.loss is None else float(output.loss),
            })

    def remove(self):
        for hook in self.hooks:
            hook.remove()

    def reset(self):
        for calls in (self.encode_calls, self.context_calls, self.llm_forward_calls, self.llm_generate_calls,
                      self.generate_calls):
            calls.clear()

    def ids_of(self, rows, images=None):
        """Token id per embedding row (exact match with the embedding matrix), -1 for rows that match none; the -1
        rows are checked equal to `images` (a [n, hidden] tensor of the image rows, in order) when given."""
        import torch

        equal = (rows[:, None, :] == self.embedding[None, :, :]).all(-1)
        ids = []
        for row in equal:
            hits = torch.nonzero(row).flatten().tolist()
            if len(hits) > 1:
                raise RuntimeError(f"an embedding row matches several tokens: {hits}")
            ids.append(hits[0] if hits else -1)
        if images is not None:
            image_rows = rows[torch.tensor([i == -1 for i in ids])]
            if image_rows.shape != images.shape or not torch.equal(image_rows, images):
                raise RuntimeError("the rows that match no token are not the image embeddings")
        return ids


# ---------------------------------------------------------------------------------------------------------------
# Records


def text_processor_records(registry) -> list:
    processor = registry.get_processor_class("blip_caption_new").from_config(None)
    assert processor.max_words == 50 and processor.prompt == ""
    return [{"input": text, "output": processor(text)} for text in TEXT_PROCESSOR_INPUTS]


def tokenizer_records(tokenizer) -> dict:
    encode = []
    for text in TOKENIZER_INPUTS:
        plain_ids = tokenizer(text, add_special_tokens=False).input_ids
        special_ids = tokenizer(text, add_special_tokens=True).input_ids
        encode.append({"text": text, "ids": plain_ids, "ids_with_bos": special_ids,
                       "pieces": tokenizer.convert_ids_to_tokens(special_ids)})
    decode = []
    for ids in DECODE_INPUTS:
        decode.append({"ids": ids, "skip_special_tokens": tokenizer.decode(ids, skip_special_tokens=True),
                       "keep_special_tokens": tokenizer.decode(ids, skip_special_tokens=False)})
    return {
        "class": type(tokenizer).__module__ + "." + type(tokenizer).__name__,
        "built_as": "init_llm: LlamaTokenizer.from_pretrained(llm_model_path, use_fast=False, trust_remote_code=True);"
                    " pad_token = '$$'",
        "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "unk_token_id": tokenizer.unk_token_id, "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id, "all_special_ids": tokenizer.all_special_ids,
        "all_special_tokens": tokenizer.all_special_tokens, "padding_side": tokenizer.padding_side,
        "encode": encode, "decode": decode,
    }


def item_record(item: dict) -> dict:
    return {k: plain(v) for k, v in item.items() if k != "image"}


def dataset_train_records(name: str, dataset, tensors: dict) -> dict:
    pool = getattr(dataset, "instruction_pool", None)
    entries = []
    for index in range(len(dataset)):
        if pool is None:
            calls = []
            with forced_choice(None, calls):
                item = dataset[index]
            assert not calls, calls
            records = [dict(item_record(item), k=None)]
        else:
            records = []
            for k in range(len(pool)):
                calls = []
                with forced_choice(k, calls):
                    item = dataset[index]
                assert calls == [len(pool)], calls
                records.append(dict(item_record(item), k=k))
        if index == 0 and "image" in item:
            tensors[f"pixels/{name}/train/0"] = item["image"].contiguous()
        entries.append({"index": index, "templates": records})
    return {"class": type(dataset).__module__ + "." + type(dataset).__name__, "len": len(dataset),
            "pool": list(pool) if pool is not None else None,
            "pool_size": len(pool) if pool is not None else None, "entries": entries}


def eval_dataset_records(eval_set: str, data, loop: ast.For, tensors: dict) -> dict:
    import torch

    fields = [elt.id for elt in loop.target.elts]
    entries = []
    for index in range(len(data)):
        item = data[index]
        record = {}
        for field, value in zip(fields, item):
            if isinstance(value, torch.Tensor) and value.dim() == 3:
                if index == 0:
                    tensors[f"pixels/{eval_set}/eval/0"] = value.contiguous()
                record[field] = f"<image tensor {list(value.shape)}>"
            else:
                record[field] = plain(value)
        entries.append(record)
    return {"class": type(data).__module__ + "." + type(data).__name__, "len": len(data),
            "loop_variables": fields, "entries": entries}


def train_batch_record(name: str, model, dataset, capture: Capture, tensors: dict, task_expr) -> dict:
    import torch
    from torch.utils.data import default_collate

    pool = getattr(dataset, "instruction_pool", None)
    if name == "medmnist_2d_small":
        indices = [0, len(dataset.dataset.datasets[0])]  # one DermaMNIST and one OrganSMNIST item
    else:
        indices = list(range(min(2, len(dataset))))
    templates = [None if pool is None else ((len(pool) - 1) if i == 0 else 0) for i in indices]
    items = []
    for index, k in zip(indices, templates):
        calls = []
        with forced_choice(k, calls):
            items.append(dataset[index])
    samples = default_collate(items)
    task = eval(task_expr, {"re": re, "samples": samples})  # noqa: S307 - the original's expression
    samples.update({"epoch": 0, "num_iters_per_epoch": 1, "iters": 0, "task": task})
    capture.reset()
    with torch.no_grad():
        output = model(samples)
    assert len(capture.llm_forward_calls) == 1
    call = capture.llm_forward_calls[0]
    embeds, mask, labels, logits = call["inputs_embeds"], call["attention_mask"], call["labels"], call["logits"]
    image_rows = capture.encode_calls[0]["embeds"] if capture.encode_calls else None
    per_sample, logit_rows = [], []
    for b in range(embeds.shape[0]):
        real = mask[b].bool()
        assert bool(real[: int(real.sum())].all()), "real positions are not a prefix"
        n = int(real.sum())
        ids = capture.ids_of(embeds[b, :n], None if image_rows is None else image_rows[b])
        positions = [t for t in range(embeds.shape[1] - 1) if int(labels[b, t + 1]) != -100]
        logit_rows.append(logits[b, positions])
        per_sample.append({"index": indices[b], "k": templates[b], "instruction_input": samples["instruction_input"][b],
                           "answer": samples["answer"][b], "sequence": ids,
                           "targets": labels[b, :n].tolist(), "sequence_length_padded": int(embeds.shape[1]),
                           "logit_positions": positions})
    tensors[f"train/{name}/logits"] = torch.cat(logit_rows).float().contiguous()
    routing = output["routing_weights"]
    return {"indices": indices, "k": templates, "task": task, "samples": per_sample, "loss": float(output["loss"]),
            "loss_reduction": "mean over all non -100 targets of the batch (CrossEntropyLoss, reduction='mean')",
            "routing_weights_mean": None if routing is None else routing.tolist()}


def prefix_length(output, forward_calls: list, bos: int) -> int:
    """How many ids generate's output holds before the first generated one: transformers 4.30 starts
    inputs_embeds generation from input_ids = [[bos_token_id]] (the bos_token_id the original passes)."""
    start = int(output.shape[1]) - len(forward_calls)
    assert start == 1 and bool((output[:, 0] == bos).all()), (start, output[:, 0])
    return start


def step_margins(calls: list, batch: int, eos: int, min_length: int, start_len: int, outputs) -> list:
    """Per sample: the smallest top-1 minus top-2 gap of the next-token logits over the greedy steps up to and
    including the step that emits EOS (EOS excluded where min_length suppresses it), and its step."""
    import torch

    result = []
    for b in range(batch):
        best = None
        generated = outputs[b, start_len:].tolist()
        for step, call in enumerate(calls):
            if step >= len(generated):
                break
            scores = call["logits"][b, -1].clone()
            if start_len + step < min_length:
                scores[eos] = float("-inf")
            top = torch.topk(scores, 2).values
            gap = float(top[0] - top[1])
            assert int(torch.argmax(scores)) == generated[step], (b, step)
            if best is None or gap < best[0]:
                best = (gap, step)
            if generated[step] == eos:
                break
        result.append({"min_gap": best[0], "at_step": best[1]})
    return result


def eval_record(eval_set: str, capture: Capture, namespace: dict, tensors: dict) -> dict:
    import torch

    assert len(capture.generate_calls) == 1 and len(capture.llm_generate_calls) == 1, "expected one batch"
    generate_call = capture.generate_calls[0]
    llm_call = capture.llm_generate_calls[0]
    kwargs = llm_call["kwargs"]
    output = llm_call["output"]
    embeds, mask = kwargs["inputs_embeds"], kwargs["attention_mask"]
    assert len(capture.encode_calls) == 1
    encoded = capture.encode_calls[0]
    contexts, padded = [], []
    for b, call in enumerate(capture.context_calls):
        image = encoded["embeds"][b]
        contexts.append(capture.ids_of(call["embs"][0], image))
        n = call["embs"].shape[1]
        assert torch.equal(embeds[b, -n:], call["embs"][0]) and int(mask[b].sum()) == n
        assert bool((mask[b, -n:] == 1).all()), "not left-padded"
        padded.append(int(embeds.shape[1]) - n)
    forward_calls = [c for c in capture.llm_forward_calls]
    first = forward_calls[0]
    assert torch.equal(first["inputs_embeds"], embeds)
    config = capture.model.llm_model.base_model.model.generation_config
    start_len = prefix_length(output, forward_calls, capture.model.llm_tokenizer.bos_token_id)
    margins = step_margins(forward_calls, output.shape[0], capture.model.llm_tokenizer.eos_token_id,
                           int(kwargs["min_length"]), start_len, output)
    tensors[f"eval/{eval_set}/vision"] = encoded["vision"][0].contiguous()
    tensors[f"eval/{eval_set}/image_embeds"] = encoded["embeds"][0].contiguous()
    tensors[f"eval/{eval_set}/routing"] = encoded["routing"][0].contiguous()
    results = [plain(r) for r in namespace["uni_med_predict"]]
    return {
        "task": generate_call["kwargs"].get("task"),
        "model_generate_kwargs": plain(generate_call["kwargs"]),
        "prompts": generate_call["texts"],
        "contexts": contexts,
        "left_padding": padded,
        "llm_generate_kwargs": {k: plain(v) for k, v in kwargs.items() if k not in ("inputs_embeds", "attention_mask")},
        "output_ids": output.tolist(),
        "answers": generate_call["answers"],
        "results": results,
        "greedy_margins": margins,
        "routing_first_image_mean": encoded["routing"][0].mean(0).tolist(),
        "forward_steps": len(forward_calls),
        "output_prefix_length": start_len,
        "generation_config": plain(config.to_dict()),
    }


def text_only_record(name: str, model, dataset, capture: Capture, conv_temp) -> dict:
    """Harness-built prompts through the original UniMedBase.generate's text branch (images=None)."""
    pool = dataset.instruction_pool
    test_rows = []
    if name == "medqa_en":
        import jsonlines

        with jsonlines.open(os.path.join("data/MedQA", "questions", "US", "test.jsonl"), "r") as handle:
            for info in handle:
                test_rows.append((info["question"], info["answer"]))
    else:
        with open(os.path.join("data/PubMedQA", "test_set.json"), "r") as handle:
            for _, value in json.load(handle).items():
                test_rows.append((value["QUESTION"], value["final_decision"]))
    processor = dataset.text_processor
    instructions = [processor(pool[-1].format(question)) for question, _ in test_rows]
    texts = []
    for instruction in instructions:
        conv = conv_temp.copy()
        conv.append_message(conv.roles[0], instruction)
        conv.append_message(conv.roles[1], None)
        texts.append(conv.get_prompt())
    capture.reset()
    answers = model.generate(None, texts, max_new_tokens=100, do_sample=False)
    llm_call = capture.llm_generate_calls[0]
    kwargs, output = llm_call["kwargs"], llm_call["output"]
    embeds, mask = kwargs["inputs_embeds"], kwargs["attention_mask"]
    contexts, padded = [], []
    for b in range(embeds.shape[0]):
        n = int(mask[b].sum())
        assert bool((mask[b, -n:] == 1).all())
        contexts.append(capture.ids_of(embeds[b, -n:]))
        padded.append(int(embeds.shape[1]) - n)
    start_len = prefix_length(output, capture.llm_forward_calls, model.llm_tokenizer.bos_token_id)
    margins = step_margins(capture.llm_forward_calls, output.shape[0], model.llm_tokenizer.eos_token_id,
                           int(kwargs["min_length"]), start_len, output)
    return {"harness_built_prompt": True,
            "how": "instruction = text_processor(pool[-1].format(question)) (the training dataset's last template); "
                   "prompt = the eval scripts' Conversation (roles '<s>[INST] ', ' [/INST]') with that message; "
                   "model.generate(None, texts, max_new_tokens=100, do_sample=False) (UniMedBase.generate's "
                   "get_context_emb_without_image branch)",
            "test_rows": [{"question": q, "answer": a} for q, a in test_rows], "prompts": texts,
            "contexts": contexts, "left_padding": padded,
            "llm_generate_kwargs": {k: plain(v) for k, v in kwargs.items() if k not in ("inputs_embeds", "attention_mask")},
            "output_ids": output.tolist(), "answers": answers,
            "answers_lower_unk_strip": [a.lower().replace("<unk>", "").strip() for a in answers],
            "greedy_margins": margins, "output_prefix_length": start_len}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint


def save_checkpoint(model, cfg, out_dir: Path, runner_cls) -> dict:
    """RunnerBase._save_checkpoint and RunnerBase.optimizer, run on a stand-in runner."""
    runner = SimpleNamespace(_optimizer=None, model=model, config=cfg)
    with contextlib.redirect_stdout(io.StringIO()):  # RunnerBase.optimizer prints every trainable name
        optimizer = runner_cls.optimizer.fget(runner)
    runner = SimpleNamespace(model=model, optimizer=optimizer, config=cfg, scaler=None, output_dir=str(out_dir),
                             unwrap_dist_model=lambda m: m)
    runner_cls._save_checkpoint(runner, 0, is_best=False)
    return {"file": "checkpoint_0.pth", "saved_by": "RunnerBase._save_checkpoint(runner, 0, is_best=False)",
            "scaler": None, "optimizer": "RunnerBase.optimizer: AdamW, no step taken (empty state)"}


# ---------------------------------------------------------------------------------------------------------------


def main(checkout: Path, out_dir: Path) -> None:
    checkout = checkout.resolve()
    out_dir = out_dir.resolve()
    for name in TOKENIZER_FILES:
        if not (out_dir / name).is_file():
            raise SystemExit(f"{out_dir / name} is missing: run tests/golden/make_sp_tokenizer.py first")
    checkout_check = check_checkout(checkout)

    import numpy as np

    declare_torchvision_ops()
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    sys.path.insert(0, str(checkout))
    sys.path.insert(0, str(HERE))
    import original_run_data  # noqa: E402
    from safetensors.torch import save_file

    work = Path(tempfile.mkdtemp(prefix="unimed-original-run-"))
    previous_cwd = os.getcwd()
    os.chdir(work)
    try:
        original_run_data.write_datasets(Path("data"))
        llm_record = make_llm(out_dir)
        shutil.copytree(out_dir / "llm", work / "llm")

        import uni_med  # noqa: F401 - registers everything, as train.py's star imports do
        import uni_med.tasks as tasks
        from uni_med.common.config import Config
        from uni_med.common.registry import registry
        from uni_med.runners.runner_base import RunnerBase

        vision_stub = install_stubs()
        medmnist_counts = patch_medmnist_counts(original_run_data)
        tensors: dict = {}

        # ---- train.py's path: Config, setup_seeds, setup_task, build_datasets, build_model
        train_args = SimpleNamespace(cfg_path=str(checkout / "train_configs" / "uni_med.yaml"), options=train_options())
        cfg = Config(train_args)
        setup_seeds = lift_function(checkout / "train.py", "setup_seeds",
                                    {"random": random, "np": np, "torch": torch, "cudnn": torch.backends.cudnn,
                                     "get_rank": __import__("uni_med.common.dist_utils", fromlist=["get_rank"]).get_rank})
        setup_seeds(cfg)
        task = tasks.setup_task(cfg)
        datasets = task.build_datasets(cfg)
        model = task.build_model(cfg)
        model.eval()
        generator = torch.Generator().manual_seed(LORA_B_SEED)
        lora_b = [(n, p) for n, p in model.named_parameters() if ".lora_B." in n]
        with torch.no_grad():
            for _, param in lora_b:
                param.copy_(torch.randn(param.shape, generator=generator) * LORA_B_STD)
        trainable = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        checkpoint_record = save_checkpoint(model, cfg, out_dir, RunnerBase)
        shutil.copyfile(out_dir / "checkpoint_0.pth", work / "checkpoint_0.pth")
        saved = torch.load(out_dir / "checkpoint_0.pth", map_location="cpu", weights_only=True)
        checkpoint_record["model_keys"] = {k: list(v.shape) for k, v in saved["model"].items()}
        checkpoint_record["trainable_parameters"] = trainable
        checkpoint_record["lora_b"] = f"{len(lora_b)} lora_B matrices re-drawn: torch.randn(shape, generator=" \
                                      f"Generator().manual_seed({LORA_B_SEED})) * {LORA_B_STD}, in named_parameters order"

        # ---- records a and b
        text_records = text_processor_records(registry)
        token_records = tokenizer_records(model.llm_tokenizer)

        # ---- datasets: training items
        data_records: dict = {}
        for name in TRAIN_DATASETS:
            data_records[name] = {"train": dataset_train_records(name, datasets[name]["train"], tensors)}

        # ---- model: training batches
        task_node = next(n for n in ast.walk(parse(checkout / "uni_med" / "tasks" / "base_task.py"))
                         if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and n.targets[0].id == "task"
                         and "re.search" in ast.unparse(n.value))
        task_expr = compile(ast.Expression(task_node.value), str(checkout / "uni_med/tasks/base_task.py"), "eval")
        capture = Capture(model)
        train_batches = {}
        for name in TRAIN_DATASETS:
            train_batches[name] = train_batch_record(name, model, datasets[name]["train"], capture, tensors, task_expr)
        capture.remove()

        # ---- eval scripts
        eval_model_records: dict = {}
        eval_models = []
        scripts: dict = {}
        for eval_set, (script, block_name, train_name) in EVAL_SETS.items():
            scripts.setdefault(script, []).append((eval_set, block_name, train_name))
        skipped_imports = {}
        for script, sets in scripts.items():
            path = checkout / script
            tree = parse(path)
            blocks = {}
            prelude = []
            for node in tree.body:
                block = _dataset_block_name(node)
                if block is not None:
                    blocks.setdefault(block, node)  # eval_ref/eval_identify repeat the SA-Med block: first one
                else:
                    prelude.append(node)
            for eval_set, block_name, train_name in sets:
                namespace = {"__name__": "__unimed_eval__", "__file__": str(path)}
                argv = [script, "--cfg-path", str(checkout / "eval_configs" / "uni_med_benchmark_evaluation.yaml"),
                        "--dataset", block_name, "--options", *eval_options()]
                saved_argv = sys.argv
                sys.argv = argv
                try:
                    for node in prelude:
                        if isinstance(node, (ast.Import, ast.ImportFrom)):
                            try:
                                run_statements([node], path, namespace)
                            except ModuleNotFoundError as error:
                                skipped = skipped_imports.setdefault(script, [])
                                if f"{ast.unparse(node)} ({error})" not in skipped:
                                    skipped.append(f"{ast.unparse(node)} ({error})")
                            continue
                        if isinstance(node, ast.Assign) and "init_model" in ast.unparse(node.value):
                            with cuda_to_cpu(), contextlib.redirect_stdout(io.StringIO()):
                                run_statements([node], path, namespace)
                            continue
                        run_statements([node], path, namespace)
                finally:
                    sys.argv = saved_argv
                eval_model = namespace["model"]
                eval_models.append(eval_model)
                if script == "eval_cls.py":
                    block = blocks[block_name]
                    call = block.body[0].value
                    namespace["dataset_name"] = call.args[0].value
                    namespace["dataset_cls"] = namespace[call.args[1].id]
                    body = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "eval_2d").body
                else:
                    body = blocks[block_name].body
                statements, loop = up_to_loop(body)
                capture = Capture(eval_model)
                with contextlib.redirect_stderr(io.StringIO()):  # tqdm
                    run_statements(statements, path, namespace)
                capture.remove()
                data_records.setdefault(train_name, {}).setdefault("eval", {})[eval_set] = dict(
                    eval_dataset_records(eval_set, namespace["data"], loop, tensors),
                    script=script, block=block_name,
                    statements_run=f"{script} lines {statements[0].lineno}-{loop.end_lineno}")
                eval_model_records[eval_set] = eval_record(eval_set, capture, namespace, tensors)

        # the eval models load checkpoint_0.pth over a fresh random init: same weights as the training model
        reference = model.state_dict()
        for eval_model in eval_models:
            for key, value in eval_model.state_dict().items():
                if not torch.equal(value, reference[key]):
                    raise RuntimeError(f"eval model differs from the training model at {key}")

        # ---- text-only datasets: no original evaluation
        conv_namespace: dict = {}
        run_statements([n for n in parse(checkout / "eval_vqa.py").body
                        if isinstance(n, ast.ImportFrom) and n.module == "uni_med.conversation.conversation"],
                       checkout / "eval_vqa.py", conv_namespace)
        conv_temp = conv_namespace["Conversation"](system="", roles=(f"{model.llm_tokenizer.bos_token}[INST] ", " [/INST]"),
                                                   messages=[], sep="", offset=2).copy()
        capture = Capture(eval_models[0])
        text_only = {}
        for name in TEXT_DATASETS:
            data_records[name]["eval"] = None
            data_records[name]["eval_note"] = ("the original evaluates no QA dataset: no eval script or eval "
                                               "dataset class reads its test split")
            text_only[name] = text_only_record(name, eval_models[0], datasets[name]["train"], capture, conv_temp)
        capture.remove()

        routing = {k: v["routing_first_image_mean"] for k, v in eval_model_records.items()}
        observations = observe(train_batches, eval_model_records, text_only, token_records)
        golden = {
            "produced_by": produced_by(checkout_check, skipped_imports),
            "commit": COMMIT,
            "versions": versions(),
            "schema": SCHEMA,
            "vision_stub": vision_stub,
            "llm": llm_record,
            "medmnist_counts": medmnist_counts,
            "connector": {"projector_type": "moe_mlp", "num_experts": 5, "router_type": "soft",
                          "router_method": "router_task_token", "num_task_tokens": 1,
                          "task_token_c": TASK_TOKEN_C, "resample_method": "projection", "resample_rate": 4,
                          "has_moe": True, "img_f_dim": NUM_FEATURES * 4, "hidden": 64,
                          "init": "the original's own init after setup_seeds (seed 42): task tokens N(0, 0.02), "
                                  "nn.Linear defaults"},
            "checkpoint": checkpoint_record,
            "config": {"train_options": train_options(), "eval_options": eval_options(),
                       "model_cfg": plain(__import__("omegaconf").OmegaConf.to_container(cfg.model_cfg))},
            "text_processor": text_records,
            "tokenizer": token_records,
            "datasets": data_records,
            "model": {"train_batches": train_batches, "eval": eval_model_records, "eval_text_only": text_only,
                      "routing": routing},
            "observations": observations,
        }
        text = dump_json(golden) + "\n"
        (out_dir / "golden.json").write_text(text, encoding="utf-8")
        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(out_dir / "golden.safetensors"))
    finally:
        os.chdir(previous_cwd)
        shutil.rmtree(work, ignore_errors=True)
    sizes = {p.relative_to(out_dir).as_posix(): p.stat().st_size for p in sorted(out_dir.rglob("*")) if p.is_file()}
    print(json.dumps(sizes, indent=1))
    print("total", sum(sizes.values()))


def observe(train_batches: dict, evals: dict, text_only: dict, tokens: dict) -> list:
    """A few facts about the original's behaviour, each checked on the records before it is written."""
    notes = []
    assert all(s["sequence"][:2] == [1, 290] for b in train_batches.values() for s in b["samples"])
    assert all(c[:3] == [1, 1, 290] for e in evals.values() for c in e["contexts"])
    assert all(c[:3] == [1, 1, 290] for e in text_only.values() for c in e["contexts"])
    notes.append("training sequences start with one BOS (forward prepends it; the '[INST] ...' prompt is tokenised "
                 "without special tokens): [1, 290 ('▁['), ...]; evaluation contexts start with two: "
                 "get_context_emb tokenises '<s>[INST] ...' with add_special_tokens=True: [1, 1, 290, ...]")
    assert all(e["output_prefix_length"] == 1 for e in list(evals.values()) + list(text_only.values()))
    notes.append("transformers 4.30 generates from inputs_embeds with input_ids = [[bos_token_id]]: every output_ids "
                 "row starts with 1, and min_length=1 never suppresses EOS (cur_len is already 1 at the first step)")
    first_eos = [(name, i) for name, e in evals.items() for i, o in enumerate(e["output_ids"]) if o[1] == 2]
    if first_eos:
        notes.append(f"EOS as the first generated token (allowed, see above) gives an empty answer: {first_eos}")
    assert tokens["pad_token_id"] == tokens["unk_token_id"] == 0
    notes.append("pad_token '$$' is not a piece of the vocabulary, so pad_token_id is <unk>'s id 0; rows finished "
                 "by EOS are padded with generation_config.pad_token_id (0), which decode(skip_special_tokens=True) "
                 "drops, as it drops a generated <unk> (0)")
    return notes


SCHEMA = {
    "produced_by": "how the files were made (commit, scripts, venv, every harness patch)",
    "commit": "the original's commit",
    "versions": "python and package versions of the venv that ran it",
    "vision_stub": "the stub vision encoder: image_size, patch, num_features, weight [8][3], bias [8], token rule",
    "llm": "the tiny LLM: its config.json, files, seed and init",
    "connector": "the connector settings (train_configs/uni_med.yaml with task_token_c 32, image_size 32)",
    "checkpoint": "checkpoint_0.pth: how it was saved, model_keys {key: shape}, trainable_parameters {name: shape}",
    "config": "the --options given to the original's Config (training and eval) and the resulting model config",
    "text_processor": "[{input, output}]: blip_caption_new (max_words 50) on tricky strings",
    "tokenizer": "the slow LlamaTokenizer as init_llm builds it: ids, special tokens; encode [{text, ids "
                 "(add_special_tokens=False), ids_with_bos (True), pieces}]; decode [{ids, skip_special_tokens, "
                 "keep_special_tokens}]",
    "datasets.<train name>.train": "class, len, pool, pool_size, entries [{index, templates [{k, ...what "
                                   "__getitem__ returns minus the image}]}] (random.choice forced to pool[k]; "
                                   "k null where no pool)",
    "datasets.<train name>.eval.<eval set>": "the eval script's dataset: class, len, loop_variables (the script's "
                                             "for-loop names), entries [{loop variable: item value}] (image tensors "
                                             "elided), script, block, statements_run; null for medqa_en/pubmedqa",
    "model.train_batches.<train name>": "one batch through UniMedBase.forward (model.eval()): indices, k, task, loss, "
                                        "routing_weights_mean (forward's output), samples [{index, k, "
                                        "instruction_input, answer, sequence (per attention-mask-1 position of the "
                                        "LLM input: token id, or -1 for an image row), targets (labels at those "
                                        "positions, -100 ignored), sequence_length_padded, logit_positions (t with "
                                        "labels[t+1] != -100: the rows of golden.safetensors train/<name>/logits, "
                                        "samples concatenated in order)}]",
    "model.eval.<eval set>": "the eval script's batch: task, model_generate_kwargs, prompts (prepare_texts output), "
                             "contexts (get_context_emb rows: token id or -1), left_padding, llm_generate_kwargs, "
                             "output_ids (raw llm_model.generate output), answers (UniMedBase.generate's), results "
                             "(the script's uni_med_predict dicts: post-processed answer_pred / pred_bbox / iou), "
                             "greedy_margins [{min_gap, at_step}] (top-1 minus top-2 next-token logit, up to EOS), "
                             "routing_first_image_mean, forward_steps (LLM forward calls), output_prefix_length (ids before the first "
                             "generated one in output_ids: 1, the BOS that transformers 4.30 starts inputs_embeds "
                             "generation from), generation_config (the LLM's, before generate's kwargs)",
    "model.eval_text_only.<medqa_en|pubmedqa>": "harness-built prompts through UniMedBase.generate(None, ...): same "
                                                "fields as model.eval plus test_rows, answers_lower_unk_strip",
    "observations": "a few facts about the original's behaviour, each asserted on the records",
    "medmnist_counts": "the medmnist release's split sizes and the tiny files' (harness patch of medmnist INFO)",
    "model.routing.<eval set>": "routing weights of the eval batch's first image, mean over its 4 tokens [5]",
    "golden.safetensors": "pixels/<train name>/train/0 and pixels/<eval set>/eval/0 [3, 32, 32] (vis processor "
                          "output); train/<train name>/logits [n, 560] float32; eval/<eval set>/vision [17, 8] "
                          "(stub output, CLS first), eval/<eval set>/image_embeds [4, 64] (encode_img output), "
                          "eval/<eval set>/routing [4, 5], all for the eval batch's first image",
}


def produced_by(checkout_check: str, skipped_imports: dict) -> dict:
    return {
        "summary": f"The original Uni-Med code (tsinghua-msiip/Uni-Med {COMMIT}) run unchanged by "
                   "tests/golden/make_original_run.py in the venv of tests/golden/original_venv.sh, on the tiny "
                   "datasets of tests/golden/original_run_data.py, the tokenizer of tests/golden/make_sp_tokenizer.py "
                   "and a tiny random Llama; CPU, float32, model.eval(), single thread.",
        "checkout": checkout_check,
        "scripts": ["tests/golden/original_venv.sh", "tests/golden/original_run_data.py",
                    "tests/golden/make_original_run.py", "tests/golden/make_sp_tokenizer.py"],
        "original_code_run": ["train.py: setup_seeds (lifted with ast)", "uni_med.common.config.Config",
                              "uni_med.tasks.setup_task / BaseTask.build_datasets / BaseTask.build_model",
                              "UniMed.from_config (init_llm, init_vision_encoder, LoRA via peft)",
                              "RunnerBase.optimizer and RunnerBase._save_checkpoint (on a stand-in runner)",
                              "the datasets' __getitem__ and the eval dataset classes",
                              "UniMedBase.forward / generate / get_context_emb / prompt_wrap, UniMed.encode_img",
                              "eval_vqa.py, eval_ref.py, eval_identify.py, eval_caption.py, eval_cls.py: prelude "
                              "(argparse, Config, init_model, Conversation) and each dataset's statements up to the "
                              "eval loop, lifted with ast"],
        "harness_patches": [
            "torchvision 0.28.0 (CUDA build, C ops unloadable on CPU torch): the schemas torchvision::nms and "
            "torchvision::qnms declared with torch.library before import (no operator is called)",
            "uni_med.models.base_model.create_eva_vit_g -> the stub vision encoder of 'vision_stub'",
            "uni_med.models.base_model.LayerNorm -> nn.Identity factory (ln_vision is the identity)",
            "torch.nn.Module.to maps cuda devices to CPU while eval_utils.init_model runs",
            "medmnist.info.INFO[flag]['n_samples'] set to the tiny files' split sizes (medmnist's __len__ asserts "
            "the release's sizes)",
            "random.choice -> pool[k] while a training __getitem__ runs",
            "training task name: BaseTask._train_inner_loop's re.search expression evaluated via ast on the "
            "default_collate batch",
            "eval scripts: top-level statements except the dataset blocks, then the dataset block (eval_cls.py: "
            "eval_2d's body) up to the eval loop, executed via ast with sys.argv set",
            "LoRA B matrices re-drawn N(0, 0.02) (seeded) before the checkpoint is saved",
            "checkpoint 'scaler' None (run.amp is True in the config; on CPU there is no GradScaler state)",
            "capture wrappers on encode_img, get_context_emb, generate, llm_model.generate and a forward hook on "
            "the inner LlamaForCausalLM",
            "text-only eval (medqa_en, pubmedqa): harness-built prompts, see model.eval_text_only",
        ],
        "skipped_imports": skipped_imports,
        "venv": "python3.11 venv with the environment.yml pins of tests/golden/original_venv.sh (torch 2.13.0 CPU, "
                "torchvision 0.28.0, transformers 4.30.0, peft 0.7.1, tokenizers 0.13.2, sentencepiece 0.1.99, "
                "numpy 1.26.1, pandas 1.5.3, setuptools 60.2.0, ...); exact versions in 'versions'",
        "paths": "the run happens in a scratch folder with relative paths (data/, llm/, checkpoint_0.pth), which is "
                 "why the checkpoint's config holds relative paths",
    }


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: make_original_run.py ORIGINAL_CHECKOUT OUT_DIR")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
