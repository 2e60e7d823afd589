#!/usr/bin/env bash
# Create the scratch virtualenv in which tests/golden/make_original_run.py runs the ORIGINAL Uni-Med code
# (tsinghua-msiip/Uni-Med @ 63b9dfb0db31e61afcb381865225d69518377f3d) unchanged.
#
#     bash tests/golden/original_venv.sh /tmp/unimed-orig-venv
#
# It installs the versions the original's environment.yml pins for every package that the imported parts of
# the original need (uni_med/__init__.py pulls in the dataset builders, models, processors and tasks, and
# uni_med/common/eval_utils.py the runners), on this machine's Python 3.11 and CPU torch.
#
# Deviations from environment.yml, and why:
#   * Python 3.11 (python3.11) instead of 3.9.18: the only interpreter on the machine; every pin below installs on
#     it (tokenizers falls back to 0.13.3 if 0.13.2 has no cp311 wheel for this platform: see below).
#   * torch==2.13.0 (the CPU wheel in /opt/wheels, installed first) and torchvision==0.28.0 instead of
#     torch==2.1.1 / torchvision==0.16.1 (CUDA): no GPU here, CUDA torch wheels must not be installed, and the
#     2.13.0 CPU wheel is the one this machine provides (/opt/wheels). torchaudio, triton, xformers, bitsandbytes and the
#     nvidia-* packages are left out (CUDA-only, never imported on the paths run: bitsandbytes is imported by
#     base_model.find_all_linear_names only for int4/int8, which Uni-Med's "lora" sft_type does not use).
#   * torch's own dependencies (typing-extensions, filelock, fsspec, sympy, networkx, jinja2, markupsafe, mpmath)
#     are left to pip: torch 2.13 needs newer ones than the pins (typing-extensions==4.8.0, sympy==1.12, ...).
#   * opencv-python-headless==4.8.1.78 only (the yml lists both it and opencv-python==4.7.0.72; cv2 is imported
#     by uni_med/processors/randaugment.py, never called; the headless build needs no libGL).
#   * Not installed: what the imported code never reaches (gradio, modelscope, openxlab, open-clip-torch,
#     sentence-transformers, pycocoevalcap, rouge, datasets, jupyter, ...). The eval scripts' metrics imports
#     (pycocoevalcap, rouge) are not executed: make_original_run.py lifts their functions and loops with ast.
#   * pip: the venv's own, not pip==21.2.4. setuptools==60.2.0 (the yml's pin) is installed LAST, over the one
#     torch pulls: wandb 0.12.21 (imported by uni_med/tasks/base_task.py) imports pkg_resources, which recent
#     setuptools no longer ships. torch 2.13 declares setuptools>=77.0.3 but does not import it on these paths;
#     `pip check` reports exactly that one conflict.
#   * torchvision 0.28.0 is the only 0.28.0 wheel the index offers and it is a CUDA build: its C extension
#     (_C.so, which needs libc10_cuda.so) does not load on CPU torch, and torchvision/_meta_registrations.py then
#     fails at import on `register_fake("torchvision::nms")` / `("torchvision::qnms")`. make_original_run.py
#     declares those two operator schemas (torch.library, no implementation) before importing torchvision;
#     nothing run here calls a torchvision operator (the original only uses transforms.Resize on PIL images,
#     ToTensor and Normalize, which are Python code).
# If a pin does not install, the script stops (set -e) rather than silently taking another version; the
# installed versions are printed at the end and recorded by make_original_run.py in golden.json ("versions").
set -euo pipefail

VENV=${1:?usage: original_venv.sh VENV_DIR}
PY=${PYTHON:-python3.11}
WHEELS=${TORCH_WHEELS:-/opt/wheels}

"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# 1. torch first, from the local CPU wheel: nothing later can pull a CUDA build.
"${PIP[@]}" install --find-links "$WHEELS" "torch==2.13.0"
"${PIP[@]}" install --find-links "$WHEELS" "torchvision==0.28.0" "torch==2.13.0"

# 2. The original's pins (environment.yml, pip section).
REQ=$(mktemp)
trap 'rm -f "$REQ"' EXIT
cat >"$REQ" <<'EOF'
transformers==4.30.0
sentencepiece==0.1.99
safetensors==0.4.0
huggingface-hub==0.18.0
regex==2022.10.31
requests==2.28.2
urllib3==1.26.18
certifi==2023.7.22
charset-normalizer==3.3.2
idna==3.4
tqdm==4.65.2
packaging==23.2
pyyaml==6.0
peft==0.7.1
accelerate==0.25.0
psutil==5.9.4
numpy==1.26.1
pillow==10.0.1
pandas==1.5.3
pytz==2023.3.post1
python-dateutil==2.8.2
six==1.16.0
omegaconf==2.3.0
antlr4-python3-runtime==4.9.3
jsonlines==4.0.0
attrs==23.1.0
timm==0.6.13
iopath==0.1.10
portalocker==2.8.2
opencv-python-headless==4.8.1.78
medmnist==3.0.1
scikit-learn==1.3.2
scikit-image==0.22.0
scipy==1.11.3
fire==0.4.0
termcolor==2.3.0
imageio==2.31.6
tifffile==2023.9.26
lazy-loader==0.3
threadpoolctl==3.2.0
joblib==1.3.2
decord==0.6.0
webdataset==0.2.48
braceexpand==0.1.7
wandb==0.12.21
protobuf==3.20.3
promise==2.3
shortuuid==1.0.11
sentry-sdk==1.33.1
docker-pycreds==0.4.0
pathtools==0.1.2
setproctitle==1.3.3
gitpython==3.1.40
gitdb==4.0.11
smmap==5.0.1
click==8.1.7
nltk==3.8.1
EOF
# tokenizers: the yml pins 0.13.2; transformers 4.30 accepts <0.14. Take 0.13.2 where it installs as a wheel,
# else 0.13.3 (the slow LlamaTokenizer the original uses does not call it).
if "${PIP[@]}" install --only-binary tokenizers "tokenizers==0.13.2" "torch==2.13.0" >/dev/null 2>&1; then
    TOK="tokenizers==0.13.2"
else
    echo "tokenizers==0.13.2 has no wheel here; using tokenizers==0.13.3" >&2
    TOK="tokenizers==0.13.3"
fi
"${PIP[@]}" install --find-links "$WHEELS" -r "$REQ" "$TOK" "torch==2.13.0" "torchvision==0.28.0"
# Last, and alone: the yml's setuptools (see the header); pip warns that torch wants >=77.0.3.
"${PIP[@]}" install "setuptools==60.2.0"

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md, sys
names = ["torch", "torchvision", "transformers", "tokenizers", "sentencepiece", "safetensors", "peft",
         "accelerate", "numpy", "pillow", "pandas", "omegaconf", "jsonlines", "timm", "medmnist", "decord",
         "webdataset", "wandb", "nltk", "opencv-python-headless", "huggingface-hub", "setuptools"]
print("python", sys.version.split()[0])
for name in names:
    print(name, md.version(name))
EOF
