"""The command line: ``g2e-jax make-tiny`` writes a model that transformers and g2e_jax both load."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from g2e_jax.models.qwen2_vl import load


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "g2e_jax.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # the command in two subprocesses: the quick tier leaves it out
def test_make_tiny_command(tmp_path):
    result = _cli("make-tiny", "--output", str(tmp_path / "tiny"), "--seed", "7")
    assert result.returncode == 0, result.stderr
    files = {p.name for p in (tmp_path / "tiny").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "chat_template.jinja"} <= files  # fmt: skip
    assert not [f for f in files if f.endswith(".tmp")]
    model = load(tmp_path / "tiny", progress=False)
    assert model.config.vision.depth >= 2 and model.config.text.num_hidden_layers >= 2
    assert model.config.text.num_key_value_heads < model.config.text.num_attention_heads
    assert np.isfinite(np.asarray(model(np.array([[1, 2, 3]])))).all()
    same_seed = _cli("make-tiny", "--output", str(tmp_path / "again"), "--seed", "7")
    assert same_seed.returncode == 0
    assert (tmp_path / "tiny" / "model.safetensors").read_bytes() == (
        tmp_path / "again" / "model.safetensors"
    ).read_bytes()

    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    hf = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "tiny", local_files_only=True)
    assert hf.config.image_token_id == model.config.image_token_id
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny", local_files_only=True)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    del torch


def test_bad_input_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    result = _cli("make-tiny", "--output", str(tmp_path / "file" / "sub"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "error" in result.stderr


def test_help_lists_commands():
    result = _cli("--help")
    assert result.returncode == 0 and "make-tiny" in result.stdout


@pytest.mark.slow  # the command in subprocesses: the quick tier leaves it out
def test_prepare_command(tiny_dir, tmp_path):
    from g2e_jax.data.prepared import PreparedDataset
    from g2e_jax.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "syn", train_rows=4, eval_queries=1)
    result = _cli(
        "prepare", f"--config.model.path={tiny_dir}", f"--config.data.root={data / 'train'}",
        f"--config.data.image_dir={data / 'images'}", "--config.subsets=('SynShape', 'SynT2I')",
        f"--config.output_dir={tmp_path / 'prepared'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    dataset = PreparedDataset(tmp_path / "prepared")
    assert len(dataset) == 8 and dataset.subsets == ["SynShape", "SynT2I"]
    missing = _cli("prepare", f"--config.model.path={tiny_dir}", f"--config.output_dir={tmp_path / 'x'}")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_make_tiny_unknown_arch_lists_the_supported_ones(tmp_path, capsys):
    from g2e_jax.cli import main

    assert main(["make-tiny", "--arch", "llava", "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "unsupported model_type 'llava'; supported: qwen2_vl, qwen2_5_vl" in err
    assert not (tmp_path / "m").exists()
