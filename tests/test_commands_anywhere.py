"""Every command as a user runs it: from a fresh working directory, every argument a relative path.

Each command runs in its own new folder (at another depth than the others), on the outputs of the
commands before it: make-tiny -> make-synthetic -> embed, eval, mine -> prepare -> train -> export-hf.
A path that a command wrote relative to its own working directory cannot resolve from the next one's,
so every written path is checked to resolve against the file that holds it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import ROOT, run_cli, written_paths

pytestmark = pytest.mark.slow

SUBSETS = "--config.data.subsets=('SynColor', 'SynT2I')"


def test_commands_chain_from_fresh_working_directories(fresh_cwd):
    from g2e_jax.data.prepared import PreparedDataset
    from g2e_jax.data.synthetic import SUBSETS as ALL_SUBSETS
    from g2e_jax.models import load

    def run(cwd, *args):
        result = run_cli(cwd, *args)
        assert result.returncode == 0, f"g2e-jax {' '.join(args)}\n{result.stderr[-3000:]}"
        return result

    def rel(path, cwd):
        return os.path.relpath(path, cwd)

    cwds = []

    def new(name):
        cwds.append(fresh_cwd(name))
        return cwds[-1]

    d = new("make-tiny")
    run(d, "make-tiny", "--output", "tiny")
    tiny = d / "tiny"
    d = new("make-synthetic")
    run(d, "make-synthetic", "--output", "syn")
    syn = d / "syn"

    def model_and_data(cwd, root="train"):
        """--config overrides naming the tiny model and the synthetic set, relative to ``cwd``."""
        return [
            f"--config.model.path={rel(tiny, cwd)}",
            f"--config.data.root={rel(syn / root, cwd)}",
            f"--config.data.image_dir={rel(syn / 'images', cwd)}",
        ]

    # embed: rows in a sub-folder, their images relative to that file (not to the working directory).
    d = new("embed")
    corpus = d / "rows" / "corpus.jsonl"
    corpus.parent.mkdir()
    images = sorted((syn / "images" / "SynT2I").glob("eval_*.png"))[:3]
    rows = [
        {"id": f"i{k}", "text": "<|image_1|>", "image": rel(p, corpus.parent)} for k, p in enumerate(images)
    ]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {"id": "t", "text": "a red circle"}]))
    model = f"--config.model.path={rel(tiny, d)}"
    run(d, "embed", "--input", "rows/corpus.jsonl", "--output", "emb", "--role", "document", model)
    assert np.load(d / "emb" / "embeddings.npy").shape[0] == 4
    assert json.loads((d / "emb" / "meta.json").read_text())["model_path"] == str(tiny.resolve())

    # eval: with the synthetic set's groups file, the subsets are that file's (not MMEB's 36).
    d = new("eval")
    groups = f"--config.data.groups_file={rel(syn / 'groups.json', d)}"
    run(d, "eval", *model_and_data(d, "eval"), groups, "--config.output_dir=out")
    results = json.loads((d / "out" / "results.json").read_text())["hierarchical"]
    assert list(results["subsets"]) == list(ALL_SUBSETS) and results["model_path"] == str(tiny)

    d = new("mine")
    config = rel(ROOT / "configs" / "tiny.py", d)
    run(d, "mine", "--config", config, *model_and_data(d), SUBSETS, "--config.mine.output_dir=mined")
    mined = d / "mined"
    anchor = json.loads((mined / "SynColor" / "original.jsonl").read_text().splitlines()[0])
    assert os.path.isabs(anchor["qry_image_path"]) and os.path.isfile(anchor["qry_image_path"])

    d = new("prepare")
    subsets = SUBSETS.replace("data.subsets", "subsets")
    run(d, "prepare", *model_and_data(d), subsets, "--config.output_dir=prepared", "--config.max_len=256")
    prepared = PreparedDataset(d / "prepared")
    assert prepared.subsets == ["SynColor", "SynT2I"] and prepared.meta["model"]["path"] == str(tiny)

    # train on the mined clusters, with no data.image_dir: the cluster files carry absolute paths.
    d = new("train")
    config, clusters = rel(ROOT / "configs" / "tiny.py", d), f"--config.data.clusters_dir={rel(mined, d)}"
    model = f"--config.model.path={rel(tiny, d)}"
    run(
        d, "train", "--config", config, "--workdir", "run", model, clusters, SUBSETS, "--config.train.steps=2"
    )
    saved = json.loads((d / "run" / "config.json").read_text())
    assert saved["model"]["path"] == str(tiny) and saved["data"]["clusters_dir"] == str(mined)
    workdir = d / "run"

    # export-hf reads the workdir's config.json (the base model's path) from yet another directory.
    d = new("export-hf")
    run(d, "export-hf", "--checkpoint", rel(workdir, d), "--output", "hf")
    exported = load(d / "hf", progress=False)
    assert exported.config.text.hidden_size == load(tiny, progress=False).config.text.hidden_size

    checked = 0
    for cwd in cwds:
        for file, key, value, resolved in written_paths(cwd, exclude=(syn / "train", syn / "eval")):
            assert resolved.exists(), f"{file}: {key}={value!r} does not resolve against the file"
            checked += 1
    assert checked >= 10
