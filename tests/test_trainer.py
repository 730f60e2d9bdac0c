"""``g2e-jax train`` as users run it: exact resume after SIGKILL, SIGTERM, checkpoint fallback,
8-device <-> 1-device checkpoints, export to Hugging Face format."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DORA, free_port, logs, report, spawn, train_args, train_cmd, wait_all

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # training runs in subprocesses: `pytest -m "not slow"` leaves it out


@pytest.fixture(scope="module")
def setup(tiny_dir, synthetic_sets, mined_set, tmp_path_factory):
    """Synthetic data and SaHa clusters for the tiny model (shared by the run); a folder of this
    module's own for the workdirs."""
    data = synthetic_sets(train_rows=12, eval_queries=2)
    base = tmp_path_factory.mktemp("train")
    (base / "data").symlink_to(data, target_is_directory=True)
    return base, train_args(tiny_dir, data, mined_set)


_train_cmd = train_cmd


def _run(cmd, env=None, timeout=600):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _params(workdir):
    from flax import nnx

    from g2e_jax.checkpoints import load_trained

    model, _, _ = load_trained(workdir)
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _wait_for_line(path: Path, step: int, proc, timeout=900):  # generous: CI machines can be loaded
    start = time.time()
    while time.time() - start < timeout:
        if path.exists() and any(json.loads(x)["step"] >= step for x in path.read_text().splitlines()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {logs(proc)[1][-2000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for metrics")


@pytest.fixture(scope="module")
def uninterrupted(trained_run):
    """The run's shared 12-step training run (DoRA with adapter dropout 0.1, GradCache; conftest)."""
    return trained_run


def test_reports_before_step_one(uninterrupted):
    """sharding.txt (every parameter's axes and sharding) and the resolved config.txt in the workdir."""
    sharding = (uninterrupted / "sharding.txt").read_text()
    assert sharding.startswith("mesh data=1 x fsdp=1 x tensor=1") and "optimizer state:" in sharding
    assert "text.embed_tokens.embedding" in sharding and "vocab,embed" in sharding
    assert "clusters_dir:" in (uninterrupted / "config.txt").read_text()
    # configs/tiny.py fits one shape to the data: the program compiled (or read) before step one is
    # the loop's only one.
    timing = json.loads((uninterrupted / "timing.json").read_text())
    assert timing["compiles_in_loop"] == 0 and timing["compile_s_in_loop"] == 0.0, timing


def test_logged_learning_rate_is_the_reference_schedule(uninterrupted):
    """metrics.jsonl's lr at step k is the rate step k ran with: transformers' linear warm-up and
    decay (12 steps, 2 of warm-up), whose LambdaLR gives step k the factor of optimizer step k - 1."""
    torch = pytest.importorskip("torch")
    from transformers import get_linear_schedule_with_warmup

    (rate,) = re.findall(r"^\s+learning_rate: (\S+)$", (uninterrupted / "config.txt").read_text(), re.M)
    records = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=12)
    factors = []
    for _ in range(12):
        factors.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [r["step"] for r in records] == list(range(2, 13, 2))
    for r in records:
        assert r["lr"] == pytest.approx(float(rate) * factors[r["step"] - 1], rel=1e-6, abs=1e-12), r


@pytest.mark.slow
def test_step_that_does_not_fit_fails_before_step_one(setup, tmp_path):
    base, args = setup
    workdir = tmp_path / "too_small"
    # DoRA: the shared run's step, read from the compilation cache (the check compiles it ahead of time).
    proc = subprocess.run(_train_cmd(workdir, args, *DORA, "--config.train.device_memory_gb=0.001"),
                          capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "g2e-jax train: error: the training step needs" in proc.stderr
    assert "but a device holds 1.02 MiB (train.device_memory_gb)" in proc.stderr
    assert not (workdir / "metrics.jsonl").exists()  # no step ran


def test_resume_after_sigkill_is_exact(setup, uninterrupted):
    """DoRA, adapter dropout 0.1 and GradCache: the dropout keys are functions of (seed, step), so a
    run killed after its step-4 checkpoint and resumed ends with the uninterrupted run's adapters."""
    base, args = setup
    workdir = base / "killed"
    proc = spawn(_train_cmd(workdir, args, *DORA), base / "killed_log", cwd=ROOT)
    _wait_for_line(workdir / "metrics.jsonl", 6, proc)  # past the step-4 checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    _run(_train_cmd(workdir, args, *DORA))
    a, b = _params(uninterrupted), _params(workdir)
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    report("DoRA + dropout 0.1 + GradCache: SIGKILL + resume vs uninterrupted (12 steps)", max_abs_diff=diff)
    assert diff <= 1e-6
    assert (workdir / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()
    assert (workdir / "loss.png").stat().st_size > 1000
    # The same config's step was compiled before (``uninterrupted``, the killed run): the resumed run
    # reads it from the persistent compilation cache instead of compiling it (issue 23).
    timing = json.loads((workdir / "timing.json").read_text())
    assert timing["first_compile_programs"] == 0, timing
    assert timing["steps"] > 0 and timing["step_s"] > 0


@pytest.mark.slow
def test_sigterm_checkpoint_is_resumed_exactly(setup):
    """SIGTERM (preemption) saves a checkpoint and exits 0; re-running the command resumes from it and
    ends as an uninterrupted run does."""
    base, args = setup
    # The shared run's config with more steps: its program (the schedule's numbers are arguments).
    long = [*DORA, "--config.train.steps=60", "--config.train.checkpoint_every=1000"]
    workdir = base / "preempted"
    proc = spawn(_train_cmd(workdir, args, *long), base / "preempted_log", cwd=ROOT)
    _wait_for_line(workdir / "metrics.jsonl", 4, proc)  # a few steps have run
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    out, err = logs(proc)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: saved a checkpoint at step" in out
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and 0 < steps[-1] < 60
    _run(_train_cmd(workdir, args, *long))
    straight = base / "not_preempted"
    _run(_train_cmd(straight, args, *long))
    a, b = _params(straight), _params(workdir)
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    report(f"SIGTERM at step {steps[-1]} + resume vs uninterrupted (60 steps)", max_abs_diff=diff)
    assert diff <= 1e-6
    assert (workdir / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()


def test_corrupted_latest_checkpoint_falls_back(setup, uninterrupted):
    base, args = setup
    workdir = base / "corrupted"
    shutil.copytree(uninterrupted, workdir)
    latest = workdir / "checkpoints" / "12"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "params" in str(f):
            f.write_bytes(b"garbage")
    proc = _run(_train_cmd(workdir, args, *DORA))
    assert "checkpoint at step 12 is unreadable" in proc.stderr
    a, b = _params(uninterrupted), _params(workdir)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6


def _losses(workdir):
    return {
        r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    }


@pytest.mark.parametrize("first,then", [(8, 1), (1, 8)])
def test_checkpoints_move_between_8_devices_and_1(setup, first, then):
    """A checkpoint saved on one device count restores on the other: the step after the resume point
    has the same loss as continuing on the device count that saved it (the same parameters and
    batch). Later steps may drift at float rounding level (different reduction orders). The parameters
    are read back in this process, whatever its device count: a checkpoint written on 8 devices must
    load on 1 (``load_trained``)."""
    base, args = setup
    env = {n: dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}") for n in (1, 8)}
    # 10 steps on `first` devices with checkpoints at 8 and 10: steps 9 and 10 are the continuation on
    # the device count that saved step 8's checkpoint; a copy without the step-10 one resumes on `then`.
    every = ["--config.train.log_every=1", "--config.train.checkpoint_every=8", "--config.train.steps=10"]
    same, other = base / f"run_on_{first}", base / f"resumed_{first}_{then}"
    _run(_train_cmd(same, args, *every), env=env[first])
    shutil.copytree(same, other)
    assert sorted(int(p.name) for p in (other / "checkpoints").iterdir() if p.name.isdigit()) == [8, 10]
    shutil.rmtree(other / "checkpoints" / "10")
    proc = _run(_train_cmd(other, args, *every), env=env[then])
    assert "resuming from the checkpoint at step 8" in proc.stdout
    a, b = _losses(same), _losses(other)
    assert sorted(b) == list(range(1, 11))
    report(
        f"checkpoint saved on {first} device(s), resumed on {then}: loss at step 9", abs_diff=abs(a[9] - b[9])
    )
    assert abs(a[9] - b[9]) <= 1e-5
    assert all(a[k] == b[k] for k in range(1, 9))  # the saved run's lines are kept as they were
    # Step 10's loss comes after an update that used the restored Adam moments: a wrong or reset
    # optimizer state shows here (the step-9 loss above is computed before it is used).
    pa, pb = _params(same), _params(other)
    param_diff = max(float(np.abs(pa[k] - pb[k]).max()) for k in pa)
    report(
        f"checkpoint saved on {first} device(s), resumed on {then}: step 10",
        loss_abs_diff=abs(a[10] - b[10]),
        params_max_abs_diff=param_diff,
    )
    assert abs(a[10] - b[10]) <= 1e-5
    assert param_diff <= 1e-5


def test_two_processes_match_one(setup):
    """2 processes x 2 CPU devices give the same first 2 losses as 1 process x 4 devices (several
    devices per process, as on a pod's hosts; half the devices of the 2 x 4 it used before, for CI's
    time): step 2's loss follows step 1's update. Shape buckets on: each step's shapes agreed by an
    all-gather of the processes' needs."""
    base, args = setup
    per_process = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    one_process = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    # Shape buckets on: the processes must agree on each step's shapes (allgather of their needs).
    # One bucket per octave: both steps' shapes fit one program (each process compiles it).
    short = ["--config.train.steps=2", "--config.train.log_every=1", "--config.train.checkpoint_every=100",
             "--config.train.shape_buckets=True", "--config.train.bucket_steps=1"]  # fmt: skip
    _run(_train_cmd(base / "single", args, *short), env=one_process)
    port = free_port()
    procs = [
        spawn(
            _train_cmd(
                base / "multi",
                args,
                *short,
                f"--config.distributed.coordinator=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            ),
            base / "multi_logs" / f"process{i}",
            cwd=ROOT,
            env=per_process,
        )  # fmt: skip
        for i in range(2)
    ]
    wait_all(procs, timeout=900)
    single = [json.loads(x) for x in (base / "single" / "metrics.jsonl").read_text().splitlines()]
    multi = [json.loads(x) for x in (base / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in multi] == [1, 2]
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(single, multi)]
    report("2 processes x 2 devices vs 1 x 4: first 2 losses", max_abs_diff=max(diffs))
    assert max(diffs) <= 1e-5


# Every backbone in the table (checked by the test).
PREPARED_ARCHS = ("qwen2_vl", "qwen2_5_vl", "llava_next", "qwen3_vl")


def test_prepared_archs_cover_every_backbone():
    from g2e_jax.models import BACKBONES

    assert sorted(PREPARED_ARCHS) == sorted(BACKBONES)


def _prepare(model, data, out):
    from g2e_jax.prepare import prepare_config, run_prepare

    cfg = prepare_config()
    cfg.model.path, cfg.data.root, cfg.data.image_dir = str(model), str(data / "train"), str(data / "images")
    cfg.subsets, cfg.output_dir, cfg.max_len = ("SynShape", "SynT2I"), str(out), 256
    run_prepare(cfg)
    return out


def _sources(data, prepared):
    return {"from_prepared": ["--config.data.source=prepared", f"--config.data.prepared_dir={prepared}"],
            "from_files": ["--config.data.source=mmeb", f"--config.data.root={data / 'train'}",
                           f"--config.data.image_dir={data / 'images'}"]}  # fmt: skip


def _common(model):
    return [f"--config.model.path={model}", "--config.data.subsets=('SynShape', 'SynT2I')",
            "--config.train.steps=3", "--config.train.log_every=1", "--config.train.checkpoint_every=100",
            "--config.train.shape_buckets=True"]  # fmt: skip


@pytest.mark.parametrize("arch", PREPARED_ARCHS)
def test_prepared_dataset_feeds_the_trainer_the_same_batches(setup, tiny_models, arch, tmp_path):
    """For every backbone (its own image rows stored: Qwen patches, LLaVA-NeXT anyres tiles), the
    trainer's global batches of the first 3 steps from a prepared (array_record) dataset equal those
    from the MMEB files, leaf by leaf and bit for bit: the same rows, tokens, pixels and shapes; a step
    is a function of its batch (test_training_from_a_prepared_dataset runs one end to end)."""
    import jax

    from g2e_jax.config_utils import load_config
    from g2e_jax.train import feed
    from g2e_jax.train.trainer import setup as run_setup

    data, model = setup[0] / "data", tiny_models(arch)
    prepared = _prepare(model, data, tmp_path / "prepared")
    batches = {}
    for name, source in _sources(data, prepared).items():
        overrides = [a.removeprefix("--config.") for a in (*_common(model), *source)]
        run = run_setup(load_config(str(ROOT / "configs/tiny.py"), overrides), tmp_path / name)
        batches[name] = [feed.global_batch(run, step) for step in range(3)]
    for step, ((a, label_a), (b, label_b)) in enumerate(zip(batches["from_prepared"], batches["from_files"])):
        assert label_a == label_b
        flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
        assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
        for (path, x), (_, y) in zip(flat_a, flat_b):
            x, y, where = np.asarray(x), np.asarray(y), (arch, step, jax.tree_util.keystr(path))
            assert x.dtype == y.dtype and x.shape == y.shape, where
            if where[2] not in ("['query_ids']", "['target_ids']"):
                assert np.array_equal(x, y), where
        # Content ids (false-negative masks) hash the image path as each source spells it: what the
        # loss sees is which rows share content, over both sides together.
        ids_a, ids_b = (np.concatenate([np.ravel(t["query_ids"]), np.ravel(t["target_ids"])]) for t in (a, b))
        assert np.array_equal(ids_a[:, None] == ids_a[None], ids_b[:, None] == ids_b[None]), (arch, step)
    pixels = [np.asarray(x) for b, _ in batches["from_files"] for path, x in jax.tree.leaves_with_path(b)
              if "pixel_values" in jax.tree_util.keystr(path)]  # fmt: skip
    assert any(np.abs(p).sum() > 0 for p in pixels)  # the batches hold images, not only padding


def test_training_from_a_prepared_dataset(setup, tiny_dir, tmp_path):
    """``g2e-jax train`` on a prepared dataset: 3 steps with the losses of the same run on MMEB files."""
    data = setup[0] / "data"
    prepared = _prepare(tiny_dir, data, tmp_path / "prepared")
    # In this process: what is tested is the data source, not the command (no signal, no device count).
    from g2e_jax.cli import main

    for workdir, source in _sources(data, prepared).items():
        assert main(_train_cmd(tmp_path / workdir, _common(tiny_dir), *source)[3:]) == 0
    a, b = _losses(tmp_path / "from_prepared"), _losses(tmp_path / "from_files")
    diff = max(abs(a[k] - b[k]) for k in a)
    report("training from a prepared dataset vs from MMEB files (3 steps)", max_abs_diff=diff)
    assert sorted(a) == [1, 2, 3] and diff <= 1e-5


# --- adapters through `g2e-jax train` ----------------------------------------------------------------

def test_export_hf_matches_the_official_pipeline(setup, uninterrupted, tiny_dir):
    """``export-hf`` (merged) loads in transformers with the processor files it wrote, and in
    ``Embedder.from_pretrained``; ``--format peft`` in ``PeftModel.from_pretrained`` on the base model;
    all give the workdir's embeddings (the run is DoRA: magnitudes merged and exported too)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from hf_reference import OFFICIAL_SYSTEM, load_hf_model, official_embeddings, official_template

    from g2e_jax import Embedder
    from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor

    base, _ = setup
    merged, adapter = base / "exported", base / "exported_peft"
    for out, fmt in ((merged, "merged"), (adapter, "peft")):
        _run([sys.executable, "-m", "g2e_jax.cli", "export-hf", "--checkpoint", str(uninterrupted), "--output",
              str(out), "--format", fmt])  # fmt: skip
    texts = ["a red circle", "Find me an everyday image that matches the given caption: a blue star"]
    strings = [
        official_template(t, has_image=False, role="query", system=OFFICIAL_SYSTEM, scheme="gen2embed")
        for t in texts
    ]
    from_run = Embedder.from_pretrained(uninterrupted, dtype="float32", progress=False).encode(texts, role="query")
    ours = Embedder.from_pretrained(merged, dtype="float32", progress=False).encode(texts, role="query")
    np.testing.assert_allclose(ours, from_run, atol=1e-5)
    ref_merged = official_embeddings(
        load_hf_model(merged), load_hf_processor(merged), strings, [None, None], scheme="gen2embed"
    )
    wrapped = peft.PeftModel.from_pretrained(load_hf_model(tiny_dir), adapter).eval()
    assert wrapped.peft_config["default"].use_dora
    ref_peft = official_embeddings(
        wrapped.base_model.model, load_hf_processor(tiny_dir), strings, [None, None], scheme="gen2embed"
    )
    cos_merged, cos_peft = (
        float((ref_merged * from_run).sum(-1).min()),
        float((ref_peft * from_run).sum(-1).min()),
    )
    report(
        "DoRA run: transformers (merged export) and PEFT (adapter export) vs the workdir",
        one_minus_cos_merged=1 - cos_merged,
        one_minus_cos_peft=1 - cos_peft,
    )
    assert cos_merged >= 0.99999 and cos_peft >= 0.99999
    base_emb = Embedder.from_pretrained(tiny_dir, dtype="float32", progress=False).encode(texts, role="query")
    assert not np.allclose(base_emb, from_run, atol=1e-3)  # training changed the model
    del torch


def test_train_starts_from_a_peft_folder(setup, tiny_dir, tmp_path):
    """``--config.adapter.init_from=DIR``: with a zero learning rate the trained workdir is exactly the
    base model + that PEFT folder, and ``export-hf --format peft`` writes the folder's tensors back."""
    peft = pytest.importorskip("peft")
    from hf_reference import load_hf_model
    from safetensors.numpy import load_file

    from g2e_jax import Embedder

    wrapped = peft.get_peft_model(
        load_hf_model(tiny_dir),
        peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]),
    )
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    wrapped.save_pretrained(tmp_path / "start")
    base, args = setup
    workdir = tmp_path / "run"
    from g2e_jax.cli import main  # in this process: no signal or device count is tested here

    assert main(_train_cmd(workdir, args, "--config.train.steps=1", "--config.train.learning_rate=0.0",
                           f"--config.adapter.init_from={tmp_path / 'start'}")[3:]) == 0  # fmt: skip
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["adapter"]["init_from"] == str(tmp_path / "start")
    texts = ["a red circle", "a blue star"]
    a = Embedder.from_pretrained(workdir, dtype="float32", progress=False).encode(texts)
    b = Embedder.from_pretrained(
        tiny_dir, adapter=tmp_path / "start", dtype="float32", progress=False
    ).encode(texts)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert main(["export-hf", "--checkpoint", str(workdir), "--output", str(tmp_path / "back"),
                 "--format", "peft"]) == 0  # fmt: skip
    start, back = (
        load_file(tmp_path / "start/adapter_model.safetensors"),
        load_file(tmp_path / "back/adapter_model.safetensors"),
    )
    assert sorted(start) == sorted(back) and len(start) == 2 * 3 * 2  # 2 layers x (q, v) x (A, B, magnitude)
    assert max(float(np.abs(start[k] - back[k]).max()) for k in start) == 0.0
