"""Hugging Face checkpoint folders: runnable with transformers, weights-only without, and every
file reached through the folder's own guard (no symlink out, bounded config, no pickled code).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import factories
from engine.backends.base import GRAPH_SURGERY, RUN
from engine.cli import main
from engine.errors import ModelLoadError
from engine.formats import LoadOptions, check_model_path, load_model
from engine.formats import hf_folder
from factories_hf import (
    bert_config,
    hand_made_folder,
    hand_made_tensors,
    sharded_folder,
    tiny_bert_folder,
)

ROOT = Path(__file__).resolve().parents[1]


def load_error(path: Path) -> str:
    with pytest.raises(ModelLoadError) as caught:
        load_model(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


# -- with transformers ---------------------------------------------------------------------------
def test_opens_as_a_runnable_model_with_transformers(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import torch
    import transformers

    folder = tiny_bert_folder(tmp_path / "bert")
    model = load_model(folder)

    assert model.format == hf_folder.NAME and model.can(RUN)
    assert model.backend.name == "transformers" and not model.can(GRAPH_SURGERY)
    assert [(s.name, s.shape, s.dtype) for s in model.inputs] == [
        (name, ("batch", "sequence"), "int64")
        for name in ("input_ids", "attention_mask", "token_type_ids")]
    assert model.outputs[0].shape == ("batch", "sequence", 32)
    assert any("transformers BertModel" in note for note in model.notes)
    assert any("64 tokens" in note for note in model.notes)  # 128 cut to the position table
    assert model.macs and model.macs > 0
    assert model.file_bytes == (folder / "model.safetensors").stat().st_size

    reference = transformers.BertModel.from_pretrained(str(folder), local_files_only=True).eval()
    # Layer names are transformers' own parameter names: no wrapper prefix.
    assert set(layer.weight_key for layer in model.layers) <= set(reference.state_dict())
    assert model.module.state_dict().keys() == reference.state_dict().keys()
    ids = torch.randint(0, 100, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        ours = model.module(ids, mask)  # positional, in the declared order
        theirs = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    assert isinstance(ours, torch.Tensor)
    torch.testing.assert_close(ours, theirs)
    # The runner feeds one array: the ids alone (attention_mask defaults to all ones).
    assert model.backend.runner().run(ids.numpy()).shape == (2, 10, 32)


def test_changed_weights_are_a_copy_of_the_same_class(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    model = load_model(tiny_bert_folder(tmp_path / "bert", "BertForSequenceClassification"))
    key = "classifier.weight"
    changed = model.backend.with_weights({key: np.zeros(model.tensors.shapes[key], np.float32)})

    assert type(changed) is type(model.backend)
    assert type(changed.module) is type(model.module)
    assert np.count_nonzero(changed.read(key)) == 0 and np.count_nonzero(model.weight(
        model.layer("classifier"))) > 0
    assert model.outputs[0].shape == ("batch", 2)  # logits: the first tensor output


def test_pytorch_model_bin_is_read_as_weights_only(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    model = load_model(tiny_bert_folder(tmp_path / "bert", weights="bin"))
    assert model.can(RUN) and "embeddings.word_embeddings" in model.layer_names()


def test_cli_inspects_a_folder(tmp_path: Path, capsys) -> None:
    folder = hand_made_folder(tmp_path / "bert")
    assert main(["inspect", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == hf_folder.NAME
    assert "encoder.layer.0.attention.self.query" in [layer["name"] for layer in report["layers"]]


# -- without transformers ------------------------------------------------------------------------
def test_opens_weights_only_without_transformers(tmp_path: Path) -> None:
    folder = hand_made_folder(tmp_path / "bert")
    model = hf_folder.open_folder(folder, LoadOptions(), use_transformers=False)

    assert not model.can(RUN) and model.module is None
    assert 'pip install "slimscope[hf]"' in " ".join(model.notes)
    assert model.layer_names() == ["embeddings.word_embeddings",
                                   "encoder.layer.0.attention.self.query",
                                   "encoder.layer.0.output.LayerNorm"]
    np.testing.assert_array_equal(model.weight("embeddings.word_embeddings"),
                                  hand_made_tensors()["embeddings.word_embeddings.weight"])


def test_without_the_package_the_cli_says_what_to_install(tmp_path: Path) -> None:
    """The real fallback, with transformers unimportable in a child process only."""
    folder = hand_made_folder(tmp_path / "bert")
    hide = ("import sys; sys.modules['transformers'] = None; "
            "from engine.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", hide, "inspect", str(folder), "--json"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert sum('pip install "slimscope[hf]"' in note for note in notes) == 1


def test_custom_code_config_opens_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = hand_made_folder(tmp_path / "custom", bert_config(
        auto_map={"AutoModel": "modeling_evil.EvilModel"}))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    model = load_model(folder)

    assert not model.can(RUN) and not marker.exists()
    assert any("custom code (auto_map)" in note for note in model.notes)


def test_sharded_checkpoint_opens_as_one_model(tmp_path: Path) -> None:
    model = hf_folder.open_folder(sharded_folder(tmp_path / "sharded"), LoadOptions(),
                                  use_transformers=False)
    assert len(model.layers) == 3 and model.params == sum(
        array.size for array in hand_made_tensors().values())


# -- refusals --------------------------------------------------------------------------------------
def test_weights_symlinked_outside_the_folder_are_refused(tmp_path: Path) -> None:
    outside = hand_made_folder(tmp_path / "elsewhere")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(bert_config()))
    (folder / "model.safetensors").symlink_to(outside / "model.safetensors")
    assert "leads outside the model's folder" in load_error(folder)


def test_config_symlinked_outside_the_folder_is_refused(tmp_path: Path) -> None:
    outside = hand_made_folder(tmp_path / "elsewhere")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").symlink_to(outside / "config.json")
    (folder / "model.safetensors").write_bytes((outside / "model.safetensors").read_bytes())
    assert "leads outside the model's folder" in load_error(folder)


def test_shard_named_outside_the_folder_is_refused(tmp_path: Path) -> None:
    folder = sharded_folder(tmp_path / "sharded")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["embeddings.word_embeddings.weight"] = "../../etc/passwd"
    index.write_text(json.dumps(data))
    assert "leads outside the model's folder" in load_error(folder)


def test_huge_config_is_refused(tmp_path: Path) -> None:
    folder = hand_made_folder(tmp_path / "bert")
    config = bert_config(padding="x" * (10 << 20))
    (folder / "config.json").write_text(json.dumps(config))
    message = load_error(folder)
    assert "config.json" in message and "MiB" in message


def test_pickle_that_runs_code_is_refused_even_with_trust(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(bert_config()))
    factories.write_malicious_pickle(tmp_path, marker).rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as caught:
        load_model(folder, LoadOptions(trust=True))
    assert not marker.exists()
    assert "plain tensors only" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("setup, expected", [
    (lambda d: (d / "config.json").write_text("[1, 2]"), "not a JSON object"),
    (lambda d: (d / "config.json").write_text('{"architectures": []}'), "no model_type"),
    (lambda d: (d / "config.json").write_text("{nope"), "not valid JSON"),
    (lambda d: (d / "config.json").write_text(json.dumps(bert_config())), "no weights"),
], ids=["not-an-object", "no-model-type", "bad-json", "no-weights"])
def test_broken_folders_get_one_line(tmp_path: Path, setup, expected: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    setup(folder)
    assert expected in load_error(folder)


def test_a_folder_without_config_is_still_not_a_model(tmp_path: Path) -> None:
    assert "is a folder" in load_error(tmp_path)
    with pytest.raises(ModelLoadError):
        check_model_path(tmp_path)
    check_model_path(hand_made_folder(tmp_path / "bert"))  # the GUI's pre-check lets it through


def test_hugging_face_cache_snapshots_follow_links_into_their_own_blobs(tmp_path: Path) -> None:
    repository = tmp_path / "models--org--tiny"
    blobs = repository / "blobs"
    source = hand_made_folder(tmp_path / "source")
    blobs.mkdir(parents=True)
    (source / "model.safetensors").rename(blobs / "0123abcd")
    snapshot = repository / "snapshots" / "f00d"
    snapshot.mkdir(parents=True)
    (blobs / "c0nf19").write_text(json.dumps(bert_config()))
    (snapshot / "config.json").symlink_to("../../blobs/c0nf19")
    (snapshot / "model.safetensors").symlink_to("../../blobs/0123abcd")
    model = hf_folder.open_folder(snapshot, LoadOptions(), use_transformers=False)
    assert len(model.layers) == 3

    # Anywhere else, even another repository's blobs, stays out of reach.
    other = tmp_path / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (blobs / "0123abcd").rename(other / "0123abcd")
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(other / "0123abcd")
    assert "leads outside the model's folder" in load_error(snapshot)


def test_a_text_model_exports_to_onnx_with_its_named_inputs(tmp_path: Path) -> None:
    """Three int64 inputs, batch and sequence dynamic: the traced graph takes them by name."""
    pytest.importorskip("transformers")
    import onnxruntime as ort

    from engine.compress import compress
    from engine.data import synthetic_data
    from engine.export import export
    from engine.plan import Plan

    model = load_model(tiny_bert_folder(tmp_path / "bert"))
    data = synthetic_data(model.inputs, count=6,
                          shapes={spec.name: (1, 12) for spec in model.inputs})
    compressed, _ = compress(model, Plan.from_dict(
        {"defaults": {"quantization": {"bits": 8, "granularity": "per-channel"}}}), data)
    result = export(compressed, model, tmp_path / "bert.onnx", format="onnx", data=data,
                    measure=False)
    assert result.kept, result.verification.summary()
    session = ort.InferenceSession(str(tmp_path / "bert.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [spec.name for spec in model.inputs]
    longer = {spec.name: np.ones((2, 20), np.int64) for spec in model.inputs}
    assert session.run(None, longer)[0].shape[:2] == (2, 20)  # batch and sequence stay dynamic
