"""Small Hugging Face checkpoint folders, built at test time.

:func:`tiny_bert_folder` needs ``transformers`` (the optional ``hf`` extra) and writes what
``save_pretrained`` writes; :func:`hand_made_folder` needs only numpy and safetensors, so the
weights-only path and every refusal are tested without the extra.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

#: The tiny BERT every transformers test builds: 2 layers, hidden 32, 64 positions.
TINY_BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)


def tiny_bert_folder(folder: Path, architecture: str = "BertModel",
                     weights: str = "safetensors") -> Path:
    """A 2-layer, hidden-32 BERT saved by transformers; `weights` "bin" writes a plain
    ``pytorch_model.bin`` state dict instead of ``model.safetensors``."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(**TINY_BERT)
    model = getattr(transformers, architecture)(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    if weights == "bin":
        config.architectures = [architecture]
        config.to_json_file(str(folder / "config.json"))
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(str(folder))
    return folder


def bert_config(**extra: Any) -> dict[str, Any]:
    """A config.json body for a tiny BERT, plus `extra` keys."""
    return {"model_type": "bert", "architectures": ["BertModel"], **TINY_BERT, **extra}


def hand_made_tensors(hidden: int = 8, vocab: int = 50) -> dict[str, np.ndarray]:
    """A few BERT-named tensors: an embedding, one attention projection, one LayerNorm."""
    rng = np.random.default_rng(0)
    return {
        "embeddings.word_embeddings.weight": rng.standard_normal((vocab, hidden), np.float32),
        "encoder.layer.0.attention.self.query.weight": rng.standard_normal((hidden, hidden),
                                                                           np.float32),
        "encoder.layer.0.attention.self.query.bias": np.zeros(hidden, np.float32),
        "encoder.layer.0.output.LayerNorm.weight": np.ones(hidden, np.float32),
        "encoder.layer.0.output.LayerNorm.bias": np.zeros(hidden, np.float32),
    }


def hand_made_folder(folder: Path, config: dict[str, Any] | None = None,
                     tensors: dict[str, np.ndarray] | None = None) -> Path:
    """config.json + model.safetensors written by hand, no transformers involved."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or bert_config()), encoding="utf-8")
    save_file(tensors or hand_made_tensors(), str(folder / "model.safetensors"))
    return folder


def sharded_folder(folder: Path) -> Path:
    """The hand-made tensors split over two safetensors shards with an index, as
    ``save_pretrained(max_shard_size=...)`` lays them out."""
    tensors = hand_made_tensors()
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2],
              "model-00002-of-00002.safetensors": names[2:]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(bert_config()), encoding="utf-8")
    weight_map = {}
    for shard, keys in shards.items():
        save_file({key: tensors[key] for key in keys}, str(folder / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    return folder
