"""``g2e-jax eval-sugarcrepe`` / ``eval-sugarcrepe-pp``: reports like ``eval``, clear errors."""

from __future__ import annotations

import json

import pytest

from g2e_jax.cli import main
from g2e_jax.eval.sugarcrepe import (
    PP_SUBSETS,
    SUBSETS,
    make_synthetic_sugarcrepe,
    make_synthetic_sugarcrepe_pp,
)


@pytest.mark.slow
def test_both_commands_write_results(tmp_path, tiny_dir, capsys):
    pp_dir, pp_images = make_synthetic_sugarcrepe_pp(tmp_path / "pp", seed=2, items_per_subset=2)
    sc_dir, sc_images = make_synthetic_sugarcrepe(tmp_path / "sc", seed=2, items_per_subset=1)
    common = [f"--config.model.path={tiny_dir}", "--config.model.dtype=float32"]
    out = tmp_path / "out_pp"
    code = main(
        [
            "eval-sugarcrepe-pp",
            *common,
            f"--config.data.dir={pp_dir}",
            f"--config.data.image_dir={pp_images}",
            f"--config.output_dir={out}",
        ]
    )
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"] == "sugarcrepe_pp" and list(results["subsets"]) == list(PP_SUBSETS)
    assert results["prompt"]["name"] == "hierarchical" and results["model_path"] == str(tiny_dir)
    markdown = (out / "results.md").read_text()
    for name, r in results["subsets"].items():
        assert r["total"] == 2 and r["image_to_text"] in (0.0, 50.0, 100.0)
        assert f"| {name} | 2 | {r['image_to_text']:.2f} | {r['text_only']:.2f} |" in markdown
    mean = sum(r["text_only"] for r in results["subsets"].values()) / len(PP_SUBSETS)
    assert results["average"]["text_only"] == pytest.approx(mean) and results["average"]["total"] == 10
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "SugarCrepe++ over 5 subsets" in capsys.readouterr().out

    out = tmp_path / "out_sc"
    code = main(
        [
            "eval-sugarcrepe",
            *common,
            f"--config.data.dir={sc_dir}",
            f"--config.data.image_dir={sc_images}",
            f"--config.output_dir={out}",
            "--config.subsets=('swap_obj', 'add_att')",
        ]
    )
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"] == "sugarcrepe" and list(results["subsets"]) == ["swap_obj", "add_att"]
    assert f"| **average** | 2 | {100 * results['average']:.2f} |" in (out / "results.md").read_text()
    assert (out / "results.png").is_file()
    assert set(SUBSETS) >= set(results["subsets"])


def test_errors_name_the_problem(tmp_path, capsys):
    pp_dir, pp_images = make_synthetic_sugarcrepe_pp(tmp_path / "pp", seed=0, items_per_subset=1)
    (pp_dir / "replace_rel.json").unlink()
    code = main(
        [
            "eval-sugarcrepe-pp",
            "--config.model.path=/nonexistent",
            f"--config.data.dir={pp_dir}",
            f"--config.data.image_dir={pp_images}",
            f"--config.output_dir={tmp_path / 'o'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    # the data is checked before the (missing) model is loaded
    assert (
        "g2e-jax eval-sugarcrepe-pp: error:" in err
        and "replace_rel.json: SugarCrepe++ subset file not found" in err
    )
    code = main(["eval-sugarcrepe", f"--config.data.dir={pp_dir}", f"--config.data.image_dir={pp_images}"])
    assert code == 2 and "no output_dir: set --config.output_dir=" in capsys.readouterr().err
    code = main(
        [
            "eval-sugarcrepe-pp",
            f"--config.data.dir={pp_dir}",
            f"--config.data.image_dir={pp_images}",
            f"--config.output_dir={tmp_path / 'o'}",
            "--config.subsets=('add_obj',)",
        ]
    )
    assert code == 2 and "unknown SugarCrepe++ subset(s) ['add_obj']" in capsys.readouterr().err
