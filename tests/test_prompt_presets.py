"""The prompt-ablation presets (templates typed out by hand), their config variants, and the sweep."""

from __future__ import annotations

import json

import pytest

from g2e_jax.prompts import PRESETS, get_prompt

SYSTEM = "Given an image, summarize the provided image in one word. Given only text, describe the text in one word."
SHORT = "Given an image, summarize the provided image. Given only text, describe the text."
TAIL = "<|im_end|>\n<|im_start|>assistant\n"


def sys_turn(text):
    return f"<|im_start|>system\n{text}<|im_end|>\n" if text else ""


# preset -> (system, suffix after an image query, suffix after a text query), typed out.
EXPECTED = {
    "hierarchical": (
        SYSTEM,
        "\nRepresent the given text/image in one word.",
        "\nRepresent the given text in one word.",
    ),
    "plain": (None, "", ""),
    "system_only": (SYSTEM, "", ""),
    "suffix_only": (
        None,
        "\nRepresent the given text/image in one word.",
        "\nRepresent the given text in one word.",
    ),
    "no_system": (
        None,
        "\nRepresent the given text/image in one word.",
        "\nRepresent the given text in one word.",
    ),
    "default_system": (
        "You are a helpful assistant.",
        "\nRepresent the given text/image in one word.",
        "\nRepresent the given text in one word.",
    ),
    "no_one_word": (SHORT, "\nRepresent the given text/image.", "\nRepresent the given text."),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_templates(name):
    prompt = get_prompt(name)
    system, image_suffix, text_suffix = EXPECTED[name]
    query = prompt.render("query", prompt.user_text("query", "<|image_1|> What?", has_image=True))
    assert query == f"{sys_turn(system)}<|im_start|>user\n<|image_pad|> What?{image_suffix}{TAIL}"
    query = prompt.render("query", prompt.user_text("query", "a cat", has_image=False))
    assert query == f"{sys_turn(system)}<|im_start|>user\na cat{text_suffix}{TAIL}"
    document = prompt.render("document", prompt.user_text("document", "a dog", has_image=False))
    assert document == f"{sys_turn(system)}<|im_start|>user\na dog{TAIL}"  # documents never get a suffix


def test_every_preset_is_tested_and_distinct():
    # qwen3_vl_embedding's template (the instruction as the system turn) is typed out and checked
    # against its reference in test_qwen3_vl_embedding.py.
    assert set(PRESETS) <= set(EXPECTED) | {"qwen3_vl_embedding"}
    fields = [tuple(v for k, v in vars(p).items() if k != "name") for p in PRESETS.values()]
    assert len(set(fields)) == len(fields)  # no two presets are the same prompt under two names
    assert get_prompt("no_system") is PRESETS["suffix_only"]
    with pytest.raises(ValueError, match="unknown prompt preset 'no_sys'.*system_only"):
        get_prompt("no_sys")


@pytest.mark.parametrize("name", ["system_only", "suffix_only", "no_system", "default_system", "no_one_word"])
def test_presets_are_mmeb_eval_config_variants(name):
    from g2e_jax.config_utils import load_config

    cfg = load_config(f"configs/mmeb_eval.py:{name}")
    assert get_prompt(cfg.prompt.preset) is get_prompt(name)


@pytest.mark.slow
def test_sweep_gives_one_column_per_preset_equal_to_eval(tmp_path, tiny_dir, capsys):
    from g2e_jax.cli import main
    from g2e_jax.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "syn", train_rows=1, eval_queries=4, num_candidates=3)
    common = [
        f"--config.model.path={tiny_dir}",
        f"--config.data.root={data / 'eval'}",
        f"--config.data.image_dir={data / 'images'}",
        f"--config.data.groups_file={data / 'groups.json'}",
        "--config.subsets=('SynShape', 'SynT2I')",
        "--config.max_len=512",
        "--config.image_resolution=low",  # explicit: the two commands may have different defaults
    ]
    out = tmp_path / "sweep"
    code = main(
        [
            "eval-prompts",
            "--config",
            "configs/prompt_ablation.py",
            *common,
            "--config.presets=('system_only', 'no_system')",
            f"--config.output_dir={out}",
        ]
    )
    assert code == 0, capsys.readouterr().err
    runs = json.loads((out / "results.json").read_text())
    assert list(runs) == ["system_only", "no_system"]
    assert runs["no_system"]["prompt"]["name"] == "suffix_only"
    header = (out / "results.md").read_text().splitlines()[0]
    assert header == "| Subset | Category | Split | system_only | no_system |"
    assert (out / "results.png").is_file()

    single = tmp_path / "single"
    code = main(
        ["eval", "--config", "configs/mmeb_eval.py:system_only", *common, f"--config.output_dir={single}"]
    )
    assert code == 0, capsys.readouterr().err
    alone = json.loads((single / "results.json").read_text())["system_only"]
    for subset, result in alone["subsets"].items():
        assert runs["system_only"]["subsets"][subset]["precision_at_1"] == result["precision_at_1"]

    code = main(
        ["eval-prompts", *common, "--config.presets=('plain', 'bogus')", f"--config.output_dir={out}"]
    )
    assert code == 2 and "unknown prompt preset 'bogus'" in capsys.readouterr().err
