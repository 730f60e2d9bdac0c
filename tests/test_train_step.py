"""The training step on the tiny model: GradCache equals the plain gradient, a step lowers the loss."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import report
from g2e_jax.data.mmeb import read_train
from g2e_jax.data.prepared import content_id
from g2e_jax.data.synthetic import make_synthetic
from g2e_jax.preprocess import Preprocessor, bucket
from g2e_jax.train.batch import BatchShape, build_batch
from g2e_jax.train.step import StepConfig, loss_and_grads, make_optimizer, train_step

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs/tiny.py"


@pytest.fixture(scope="module")
def setup(tiny_dir, jax_model, tmp_path_factory):
    data = make_synthetic(tmp_path_factory.mktemp("syn") / "d", train_rows=8, eval_queries=1)
    pre = Preprocessor.from_pretrained(tiny_dir, max_len=128)
    pairs = []
    for subset in ("SynShape", "SynT2I"):
        rows = read_train(data / "train", subset, image_dir=data / "images")
        qs = pre.prepare([r.qry for r in rows], [r.qry_image for r in rows], role="query", subset=subset)
        ts = pre.prepare(
            [r.pos_text for r in rows], [r.pos_image for r in rows], role="document", subset=subset
        )
        pairs += [(q, t, content_id(r.qry, r.qry_image), content_id(r.pos_text, r.pos_image))
                  for q, t, r in zip(qs, ts, rows)]  # fmt: skip
    consts = {side: (jnp.asarray(pre.system_ids(role)), jnp.asarray(pre.header_ids))
              for side, role in (("query", "query"), ("target", "document"))}  # fmt: skip
    return pre, pairs, consts


def _batch(pre, pairs, chunks, cells, rows_per_cell):
    shape = BatchShape(chunks=chunks, cells=cells, rows_per_cell=rows_per_cell, users=96, patches_per_cell=36 * rows_per_cell,
                       patch_dim=pre.config.vision.patch_dim)  # fmt: skip
    return jax.tree.map(jnp.asarray, build_batch(pairs[: shape.pairs], shape, pre.pad_id))


def _cfg(pre, **kw):
    return StepConfig(pad_id=pre.pad_id, max_patches_per_image=64, **kw)


def _checkpointed_scans(jaxpr) -> list[int]:
    """Lengths of the scans, at any depth of ``jaxpr`` (a ClosedJaxpr), whose body holds a checkpoint
    (``remat2``): the layer scans whose every layer is checkpointed."""
    from jax.extend import core as jcore

    def inner(params):
        for v in params.values():
            for u in v if isinstance(v, (list, tuple)) else (v,):
                if isinstance(u, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                    yield getattr(u, "jaxpr", u)

    found = []

    def walk(j):
        for e in j.eqns:
            if e.primitive.name == "scan" and any(q.primitive.name == "remat2" for q in e.params["jaxpr"].jaxpr.eqns):
                found.append(e.params["length"])
            for sub in inner(e.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return found


def _relative_l2(grads_a, grads_b) -> float:
    """||a - b|| / ||a|| over every leaf of two gradient trees."""
    flat_a, flat_b = jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)
    num = np.sqrt(sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(flat_a, flat_b)))
    return float(num / np.sqrt(sum(float(jnp.sum(a**2)) for a in flat_a)))


def test_grad_cache_equals_full_batch_gradient(setup, jax_model):
    pre, pairs, consts = setup
    graphdef, params, rest = nnx.split(jax_model, nnx.Param, ...)
    plain_batch = _batch(pre, pairs, chunks=1, cells=4, rows_per_cell=4)
    cached_batch = _batch(pre, pairs, chunks=4, cells=1, rows_per_cell=4)  # same 16 pairs, same order
    (loss_a, _), grads_a = jax.jit(lambda p, b: loss_and_grads(graphdef, p, rest, b, consts, _cfg(pre)))(
        params, plain_batch)  # fmt: skip
    (loss_b, _), grads_b = jax.jit(
        lambda p, b: loss_and_grads(graphdef, p, rest, b, consts, _cfg(pre, grad_cache=True, remat="full"))
    )(params, cached_batch)
    relative = _relative_l2(grads_a, grads_b)
    report("GradCache vs full-batch gradient (tiny, 16 pairs, 4 chunks)", relative_l2=relative,
           loss_diff=abs(float(loss_a - loss_b)))  # fmt: skip
    assert abs(float(loss_a - loss_b)) < 1e-5
    assert relative < 1e-5


def test_one_step_lowers_the_loss_on_a_fixed_batch(setup, jax_model):
    """The trainer's own step (``trainer.step_function``, full fine-tuning): three steps lower the
    loss; the schedule's numbers are arguments of its program, so a learning rate of 0 (another
    schedule: other steps and warm-up too) runs the same program and leaves the parameters as they were."""
    from types import SimpleNamespace

    import ml_collections

    from g2e_jax.train.step import schedule_values
    from g2e_jax.train.trainer import step_function

    pre, pairs, consts = setup
    graphdef, params, rest = nnx.split(jax_model, nnx.Param, ...)
    batch = _batch(pre, pairs, chunks=1, cells=2, rows_per_cell=8)
    tx = make_optimizer(learning_rate=1e-3, total_steps=10, warmup_steps=0)
    start = (params, tx.init(params))
    train = ml_collections.ConfigDict({"weight_decay": 0.0, "max_grad_norm": 1.0})
    run = SimpleNamespace(params=params, opt_state=start[1], graphdef=graphdef, step_cfg=_cfg(pre),
                          cfg=ml_collections.ConfigDict({"train": train}))  # fmt: skip
    step = step_function(run)
    key = jax.random.key(0)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 (the step donates its inputs)
    params, opt_state = copy(start)
    losses = []
    for _ in range(3):
        params, opt_state, metrics = step(params, rest, opt_state, batch, consts, key, schedule_values(1e-3, 10, 0))
        losses.append(float(metrics["loss"]))
    report("training steps on a fixed batch (tiny, full fine-tuning)", loss_0=losses[0], loss_2=losses[2])
    assert losses[2] < losses[0]
    assert 0 <= float(metrics["accuracy"]) <= 1 and np.isfinite(float(metrics["grad_norm"]))
    programs = step._cache_size()
    frozen, _, metrics = step(*copy((start[0], rest, start[1])), batch, consts, key, schedule_values(0.0, 7, 3))
    assert float(metrics["loss"]) == losses[0]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(start[0])))
    assert step._cache_size() == programs  # no program of its own for the other schedule


@pytest.mark.slow  # compiles two training programs: the quick tier leaves it out
def test_prefix_cache_gives_the_same_loss_and_gradients(setup, jax_model):
    pre, pairs, consts = setup
    graphdef, params, rest = nnx.split(jax_model, nnx.Param, ...)
    batch = _batch(pre, pairs, chunks=1, cells=2, rows_per_cell=8)
    (loss_a, _), grads_a = jax.jit(
        lambda p, b: loss_and_grads(graphdef, p, rest, b, consts, _cfg(pre, prefix_cache=True))
    )(params, batch)
    (loss_b, _), grads_b = jax.jit(
        lambda p, b: loss_and_grads(graphdef, p, rest, b, consts, _cfg(pre, prefix_cache=False))
    )(params, batch)
    relative = _relative_l2(grads_a, grads_b)
    report("training with vs without the prefix cache (tiny, 16 pairs)", relative_l2=relative,
           loss_diff=abs(float(loss_a - loss_b)))  # fmt: skip
    assert abs(float(loss_a - loss_b)) < 1e-5
    assert relative < 1e-5


def test_fitted_sides_give_the_same_loss_as_the_full_capacity(setup, jax_model):
    """Shape buckets per side: a text-only side gets no vision arrays, short rows a short segment,
    and the loss is the one of the capacity-padded batch."""
    from g2e_jax.train.batch import fit_sides, side_needs

    pre, pairs, consts = setup
    graphdef, params, rest = nnx.split(jax_model, nnx.Param, ...)
    shape = BatchShape(chunks=1, cells=2, rows_per_cell=4, users=96, patches_per_cell=36 * 4,
                       patch_dim=pre.config.vision.patch_dim)  # fmt: skip
    text_queries = [p for p in pairs if p[0].patches is None][: shape.pairs]  # SynT2I: text -> image
    need = side_needs(text_queries, shape)
    sides = fit_sides(shape, need)
    assert need[0, 1] == 0 and sides["query"][1] is None  # no image on the query side: no vision tower
    assert sides["target"][1] is not None and sides["target"][1] <= shape.patches_per_cell
    assert sides["query"][0] < shape.users
    loss = jax.jit(lambda p, b: loss_and_grads(graphdef, p, rest, b, consts, _cfg(pre))[0][0])
    full = jax.tree.map(jnp.asarray, build_batch(text_queries, shape, pre.pad_id))
    fitted = jax.tree.map(jnp.asarray, build_batch(text_queries, shape, pre.pad_id, sides=sides))
    assert (
        fitted["query"]["pixel_values"] is None and fitted["query"]["user_ids"].shape[-1] == sides["query"][0]
    )
    a, b = float(loss(params, full)), float(loss(params, fitted))
    report("fitted batch shapes vs full capacity (tiny, text queries)", loss_diff=abs(a - b))
    assert abs(a - b) < 1e-5
    with pytest.raises(ValueError, match="user tokens"):
        fit_sides(dataclasses.replace(shape, users=4), need)


def test_training_buckets_pad_under_a_quarter():
    """``train.bucket_steps=4``: each side is padded to the next of 16, 20, 24, 28, 32, 40, ... (4 sizes
    per doubling), so padding adds under 1/4; the grid, not each length, sets the compiled shapes."""
    from g2e_jax.train.batch import fit_sides

    grid = [16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512]
    for n in range(1, 513):
        assert bucket(n, 16, per_octave=4) == min(g for g in grid if g >= n), n
    for n in range(17, 5000):
        size = bucket(n, 16, per_octave=4)
        assert n <= size < n * 1.25, (n, size)
    assert bucket(39, 16) == 64 and bucket(18, 16) == 32  # the default grid (encode jobs): up to 2x
    shape = BatchShape(chunks=1, cells=1, rows_per_cell=4, users=960, patches_per_cell=4096, patch_dim=1176)
    need = np.array([[39, 0], [18, 1100]])  # text queries; 1,100 image patches in a target cell
    assert fit_sides(shape, need, per_octave=4) == {"query": (40, None), "target": (20, 1280)}
    assert fit_sides(shape, need) == {"query": (64, None), "target": (32, 1536)}
    with pytest.raises(ValueError, match="per_octave"):
        bucket(10, 16, per_octave=0)


def test_one_run_shape_fitted_to_the_data(tiny_dir, tmp_path):
    """``train.shape_from_data`` (the demo): the run's shape, each side fitted (in buckets) to the
    longest rows of the whole data set (measured here by preprocessing every row directly), is every
    step's without shape buckets."""
    from g2e_jax.config_utils import load_config
    from g2e_jax.train import feed, trainer
    from g2e_jax.train.batch import fit_sides, side_needs

    from PIL import Image

    data = make_synthetic(tmp_path / "d", train_rows=8, eval_queries=1)
    subsets = ("SynShape", "SynT2I", "SynI2T")
    # Images of several sizes (9 to 64 patches), so that which images a cell may hold matters.
    for i, path in enumerate(sorted((data / "images").rglob("train_*.png"))):
        side = (42, 56, 84, 112)[i % 4]
        Image.open(path).resize((side, side)).save(path)
    overrides = [f"model.path={tiny_dir}", "data.source=mmeb", f"data.root={data / 'train'}",
                 f"data.image_dir={data / 'images'}", f"data.subsets={subsets!r}",
                 f"data.check_cache={tmp_path / 'check.json'}", "train.clusters_per_batch=8",
                 "train.patches_per_cell=1024"]  # fmt: skip
    cfg = load_config(str(TINY_CONFIG), overrides)
    run = trainer.setup(cfg, tmp_path / "run")
    c = run.shape.rows_per_cell
    users, patches = {"query": [], "document": []}, {"query": [], "document": []}
    for subset in subsets:
        rows = read_train(data / "train", subset, image_dir=data / "images")
        for role, texts, images in (("query", [r.qry for r in rows], [r.qry_image for r in rows]),
                                    ("document", [r.pos_text for r in rows], [r.pos_image for r in rows])):  # fmt: skip
            for row in run.preprocessor.prepare(texts, images, role=role, subset=subset, progress=False):
                users[role].append(len(row.user_ids))
                patches[role] += [] if row.patches is None else [len(row.patches)]
    need = np.array([[max(users[r]), min(sum(sorted(patches[r])[-c:]), run.shape.patches_per_cell)]
                     for r in ("query", "document")])  # fmt: skip
    assert run.sides == fit_sides(run.shape, need, per_octave=4)
    assert sorted(patches["query"])[0] < sorted(patches["query"])[-1]  # the sizes above took
    assert run.sides["query"][0] < run.shape.users and run.sides["target"][0] < run.sides["query"][0]
    for step in range(4):
        batch, _ = feed.global_batch(run, step)
        assert (np.asarray(side_needs(feed.local_rows(run, step).pairs, run.shape)) <= need).all()
        for side in ("query", "target"):
            assert batch[side]["user_ids"].shape[-1] == run.sides[side][0]
            assert batch[side]["pixel_values"].shape[-2] == run.sides[side][1]
    # With shape buckets as well, each step is fitted on its own within that shape, which is the one
    # compiled and checked before step one.
    bucketed = trainer.setup(load_config(str(TINY_CONFIG), [*overrides, "train.shape_buckets=True"]),
                             tmp_path / "run2")  # fmt: skip
    assert bucketed.sides == run.sides
    users = {feed.global_batch(bucketed, step)[0]["target"]["user_ids"].shape[-1] for step in range(4)}
    assert max(users) <= run.sides["target"][0]


def test_a_non_finite_step_leaves_params_and_optimizer_state_untouched(setup, jax_model):
    """A NaN pixel (GradCache on, as in training) makes the loss and gradients NaN: the step returns
    the parameters and the optimizer state it got, bit for bit, and says so; the next finite step
    trains as if the bad one had not happened."""
    pre, pairs, consts = setup
    graphdef, params, rest = nnx.split(jax_model, nnx.Param, ...)
    batch = _batch(pre, pairs, chunks=2, cells=1, rows_per_cell=8)
    poisoned = dict(
        batch,
        query=dict(batch["query"], pixel_values=batch["query"]["pixel_values"].at[0, 0, 0].set(jnp.nan)),
    )
    tx = make_optimizer(learning_rate=1e-3, total_steps=10, warmup_steps=0)
    cfg = _cfg(pre, grad_cache=True)
    step = jax.jit(lambda p, o, b: train_step(graphdef, p, rest, o, b, consts, tx=tx, cfg=cfg))
    opt_state = tx.init(params)
    p1, o1, m1 = step(params, opt_state, batch)
    assert int(m1["finite"]) == 1
    p2, o2, m2 = step(p1, o1, poisoned)
    report(
        "NaN-injected step",
        loss=float(m2["loss"]),
        grad_norm=float(m2["grad_norm"]),
        finite=int(m2["finite"]),
    )
    assert int(m2["finite"]) == 0 and not np.isfinite(float(m2["loss"]))
    for a, b in zip(jax.tree.leaves((p1, o1)), jax.tree.leaves((p2, o2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # After the bad step, the same good step as without it (Adam's count was not advanced either).
    p3, _, _ = step(p2, o2, batch)
    p3_ref, _, _ = step(p1, o1, batch)
    for a, b in zip(jax.tree.leaves(p3), jax.tree.leaves(p3_ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # compiles a training program per remat policy: the quick tier leaves it out
def test_per_layer_remat_gives_the_same_loss_and_gradients(setup, tiny_dir):
    """``remat="layers"`` (each decoder layer and vision block checkpointed) changes memory, not
    numbers: with DoRA, adapter dropout 0.1 in the decoder layers and the vision blocks, and GradCache
    (whose second pass re-runs each chunk), the loss and gradients equal those without remat. The
    recomputed layers must replay the same dropout masks: another key gives another loss."""
    from g2e_jax.adapters.lora import DEFAULT_TARGETS, AdapterConfig, apply_adapters, trainable_filter
    from g2e_jax.models.qwen2_vl import load

    pre, pairs, consts = setup
    model = load(tiny_dir, progress=False)
    adapter = AdapterConfig(kind="dora", dropout=0.1, targets=DEFAULT_TARGETS + r"|visual\.blocks\.\d+\.attn\.qkv")
    apply_adapters(model, adapter, rngs=nnx.Rngs(params=0, dropout=1))
    graphdef, params, rest = nnx.split(model, trainable_filter(adapter), ...)
    # Away from the initialisation (B = 0, magnitude = ||W||), where dropout could not matter.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x * (1 + 0.5 * rng.standard_normal(x.shape)) + 0.05 * rng.standard_normal(x.shape),
                          params)  # fmt: skip
    batch = _batch(pre, pairs, chunks=2, cells=1, rows_per_cell=8)  # images on both sides' chunks

    def run(remat):
        cfg = _cfg(pre, grad_cache=True, remat=remat)
        fn = jax.jit(lambda p, b, k: loss_and_grads(graphdef, p, rest, b, consts, cfg, k))
        return fn, jax.make_jaxpr(fn)(params, batch, jax.random.key(0))

    plain, plain_jaxpr = run("none")
    layered, layered_jaxpr = run("layers")
    (loss_a, _), grads_a = plain(params, batch, jax.random.key(0))
    (loss_b, _), grads_b = layered(params, batch, jax.random.key(0))
    (loss_c, _), _ = layered(params, batch, jax.random.key(1))
    relative = _relative_l2(grads_a, grads_b)
    report("per-layer remat vs none (tiny, DoRA, dropout 0.1, GradCache 2 chunks)", relative_l2=relative,
           loss_diff=abs(float(loss_a - loss_b)), other_key_loss_diff=abs(float(loss_a - loss_c)))  # fmt: skip
    # Every layer and block of both GradCache passes is a checkpoint (the body of the decoder's and the
    # tower's layer scans, in each pass); without remat a layer scan's body only keeps its matmul
    # outputs (dots_saveable, StepConfig.layer_remat), never the layers' nothing-saved checkpoint.
    cfg = model.config
    plain_text = str(plain_jaxpr)
    assert plain_text.count("remat2[") == plain_text.count("policy=DotsSaveable(only_if_no_batch_dims=False)") > 0
    scans = _checkpointed_scans(layered_jaxpr)
    assert sum(n in (cfg.text.num_hidden_layers, cfg.vision.depth) for n in scans) >= 2 * 2, scans
    assert abs(float(loss_a - loss_c)) > 1e-4  # the dropout masks matter
    assert abs(float(loss_a - loss_b)) <= 1e-6 * abs(float(loss_a))
    assert relative < 1e-5  # float32 roundoff: 8e-7 measured


@pytest.mark.parametrize("tower", ["qwen2_5_vl", "llava_next"])
def test_per_layer_remat_in_the_towers_with_their_own_block_loop(tower):
    """Qwen2.5-VL's windowed tower and LLaVA-NeXT's CLIP scan their own blocks: with a ``remat``
    policy each block is a checkpoint, and the gradients are those without it."""

    rng = np.random.default_rng(0)
    if tower == "qwen2_5_vl":
        from g2e_jax.models.qwen2_5_vl.config import tiny_config
        from g2e_jax.models.qwen2_5_vl.vision import Qwen2_5VisionTower

        cfg = tiny_config().vision
        model, grid = Qwen2_5VisionTower(cfg, rngs=nnx.Rngs(0)), np.array([[1, 8, 12]])
        x = jnp.asarray(rng.standard_normal((96, cfg.patch_dim)), jnp.float32)

        def call(m, x, remat=None):
            return m(x, grid, 96, remat=remat)
    else:
        from g2e_jax.models.llava_next.config import tiny_config
        from g2e_jax.models.llava_next.vision import ClipVisionTower

        cfg = tiny_config().vision
        model = ClipVisionTower(cfg, rngs=nnx.Rngs(0))
        x = jnp.asarray(rng.standard_normal((2, 3, cfg.image_size, cfg.image_size)), jnp.float32)

        def call(m, x, remat=None):
            return m(x, cfg.depth, remat=remat)

    graphdef, params = nnx.split(model)
    weights = jnp.asarray(rng.standard_normal(jax.eval_shape(lambda: call(model, x)).shape), jnp.float32)

    def grads(policy):
        def loss(p, x):
            return jnp.vdot(call(nnx.merge(graphdef, p), x, policy), weights)

        fn = jax.grad(loss, argnums=(0, 1))
        return jax.jit(fn)(params, x), jax.make_jaxpr(fn)(params, x)

    plain, plain_jaxpr = grads(None)
    layered, layered_jaxpr = grads(jax.checkpoint_policies.nothing_saveable)
    relative = _relative_l2(plain, layered)
    report(f"per-layer remat vs none ({tower} vision tower, tiny)", relative_l2=relative)
    assert "remat" not in str(plain_jaxpr) and cfg.depth in _checkpointed_scans(layered_jaxpr)
    assert relative < 1e-6  # float32 roundoff: 0 and 2e-9 measured


def test_schedule_is_optax_linear_warmup_then_decay_to_the_last_bit():
    """``lr_schedule`` (its numbers may be traced: the trainer passes them to its step) gives, bit for
    bit, optax's linear warm-up joined to a linear decay to zero, as the step computed it when the
    numbers were constants of its program (old workdirs' logged rates are compared exactly); traced
    under jit, the same values within float32 rounding of the learning rate."""
    import itertools

    import optax

    from g2e_jax.train.step import lr_schedule

    def reference(lr, total, warm):
        decay = optax.linear_schedule(lr, 0.0, max(total - warm, 1))
        return decay if warm <= 0 else optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])

    traced = jax.jit(lambda c, lr, total, warm: lr_schedule(lr, total, warm)(c))
    for lr, total, warm in itertools.product((0.01, 5e-5, 2e-4), (3, 5, 12, 300, 1500), (0, 1, 2, 100)):
        count = np.arange(total + 2, dtype=np.int32)
        want = np.asarray(reference(lr, total, warm)(count))
        assert np.array_equal(np.asarray(lr_schedule(lr, total, warm)(count)), want), (lr, total, warm)
        got = traced(count, np.float32(lr), np.float32(total), np.float32(warm))
        # Compiled, XLA may reassociate (a - b) * f + b; 1 - count / steps then rounds differently
        # (cancellation near the end of a ramp): within float32 rounding of the learning rate itself.
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=lr * 2**-20, err_msg=str((lr, total, warm)))
