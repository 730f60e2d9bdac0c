"""Config files and ``--config.a.b=value`` overrides (g2e_jax.config_utils)."""

from __future__ import annotations

import argparse
import json
import re
import textwrap

import ml_collections
import pytest

from g2e_jax.config_utils import config_to_json, load_config, split_config_overrides

CONFIG = textwrap.dedent(
    """
    import dataclasses
    import ml_collections
    from ml_collections import config_dict


    @dataclasses.dataclass
    class Marker:  # A dataclass only works if the module is registered while it executes.
        x: int = 0


    def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.variant = arg or "base"
        c.seed = 0
        c.model = ml_collections.ConfigDict()
        c.model.width = 64
        c.model.dropout = 0.1
        c.model.use_bias = True
        c.model.name = "qwen2_vl"
        c.model.patch = (14, 14)
        c.model.layers = [1, 2]
        c.model.extra = None
        c.model.lr = config_dict.placeholder(float)
        c.model.steps = config_dict.placeholder(int)
        c.model.hidden = c.model.get_ref("width")
        c.data = {"batch": 8}
        c.marker = Marker().x
        return c
    """
)


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "my_config.py"
    path.write_text(CONFIG)
    return str(path)


def test_plain_load_is_locked(cfg_file):
    cfg = load_config(cfg_file)
    assert cfg.variant == "base" and cfg.model.width == 64 and cfg.data.batch == 8
    assert cfg.model.lr is None and cfg.model.steps is None
    assert cfg.is_locked and cfg.model.is_locked
    with pytest.raises(AttributeError):
        cfg.modle = 1
    with pytest.raises(AttributeError):
        cfg.model.widht = 1
    with pytest.raises(KeyError):
        cfg["new"] = 1
    cfg.model.width = 32  # Existing fields stay assignable.


def test_arg_form(cfg_file):
    assert load_config(f"{cfg_file}:large").variant == "large"
    assert load_config(f"{cfg_file}:a:b=c,d").variant == "a:b=c,d"  # Only the first ".py:" splits.


def test_overrides_of_every_type(cfg_file):
    cfg = load_config(
        cfg_file,
        [
            "seed=3",
            "--config.model.width=128",
            "model.dropout=0.25",
            "model.use_bias=FALSE",
            "model.name=  spaced = value ",
            "model.patch=(16, 8)",
            "model.lr=3",
            "model.steps=1_000",
            "data.batch=0x10",
        ],
    )
    assert cfg.seed == 3 and cfg.model.width == 128
    assert cfg.model.dropout == 0.25
    assert cfg.model.use_bias is False
    assert cfg.model.name == "  spaced = value "  # Strings are verbatim, '=' after the first included.
    assert cfg.model.patch == (16, 8) and isinstance(cfg.model.patch, tuple)
    assert cfg.model.lr == 3.0 and isinstance(cfg.model.lr, float)  # Int literal for a float placeholder.
    assert cfg.model.steps == 1000 and isinstance(cfg.model.steps, int)
    assert cfg.data.batch == 16
    assert cfg.model.hidden == 128  # A FieldReference follows the field it points at.
    assert cfg.is_locked


@pytest.mark.parametrize(
    "raw, expected",
    [("true", True), ("1", True), ("T", True), ("False", False), ("0", False), ("f", False)],
)
def test_bool_spellings(cfg_file, raw, expected):
    # absl's boolean spellings (true/false/t/f/1/0); yes/no were ours and are errors now.
    assert load_config(cfg_file, [f"model.use_bias={raw}"]).model.use_bias is expected


@pytest.mark.parametrize("override", ["model.layers=(3,)", "model.extra=[1, 'a']", "model.extra=3"])
def test_list_and_none_fields_are_not_overridable(cfg_file, override):
    # ml_collections overrides int/float/bool/str/tuple/enum fields (every field of configs/*.py);
    # a list or a None-valued field is a clear error (declare it as a tuple or a placeholder).
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"{re.escape(key)} is not supported for overriding"):
        load_config(cfg_file, [override])


def test_later_override_wins(cfg_file):
    assert load_config(cfg_file, ["seed=1", "--config.seed=2"]).seed == 2


def test_unknown_key_suggests_closest(cfg_file):
    with pytest.raises(ValueError, match=r"unknown config key 'model\.widht'.*did you mean 'model\.width'"):
        load_config(cfg_file, ["model.widht=3"])
    with pytest.raises(ValueError, match=r"'mdoel\.width'.*did you mean 'model\.width'"):
        load_config(cfg_file, ["--config.mdoel.width=3"])
    with pytest.raises(ValueError, match=r"'model\.width\.x'.*'model\.width' is a int"):
        load_config(cfg_file, ["model.width.x=3"])
    with pytest.raises(ValueError, match=r"unknown config key 'zzz'$"):
        load_config(cfg_file, ["zzz=3"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("model.width=abc", r"model\.width=abc: invalid literal for int"),
        ("model.width=1.5", r"model\.width=1\.5: invalid literal for int"),
        ("model.dropout=high", r"model\.dropout=high: could not convert string to float"),
        ("model.use_bias=maybe", r"model\.use_bias=maybe: .*Non-boolean argument"),
        ("model.use_bias=yes", r"model\.use_bias=yes: .*Non-boolean argument"),
        ("model.patch=(1,", r"model\.patch=\(1,: Error while parsing string"),
        ("model.steps=many", r"model\.steps=many: invalid literal for int"),
        ("model=3", r"model=.*is a ConfigDict and cannot be replaced"),
        ("data={'batch': 4}", r"data=.*is a ConfigDict and cannot be replaced"),
        ("model.width", r"not of the form a\.b=value"),
    ],
)
def test_bad_values(cfg_file, override, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(cfg_file, [override])


def test_file_errors(tmp_path):
    missing = tmp_path / "nope.py"
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config(f"{missing}:arg")

    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"empty\.py defines no get_config"):
        load_config(str(empty))

    wrong = tmp_path / "wrong.py"
    wrong.write_text("def get_config():\n    return {'a': 1}\n")
    with pytest.raises(ValueError, match=r"wrong\.py: get_config\(\) returned dict, not an ml_collections"):
        load_config(str(wrong))

    no_arg = tmp_path / "no_arg.py"
    no_arg.write_text("import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict()\n")
    with pytest.raises(ValueError, match=r"no_arg\.py: get_config\(\) takes no argument, but 'x' was given"):
        load_config(f"{no_arg}:x")


def test_frozen_config_accepts_overrides(tmp_path):
    path = tmp_path / "frozen.py"
    path.write_text(
        "import ml_collections\n\n"
        "def get_config():\n    return ml_collections.FrozenConfigDict({'a': 1, 'b': {'c': 2.0}})\n"
    )
    cfg = load_config(str(path), ["b.c=3"])
    assert cfg.a == 1 and cfg.b.c == 3.0 and cfg.is_locked


def test_split_config_overrides():
    argv = ["--config", "x.py:big", "--config.a.b=1", "--out", "/tmp/o", "--config.lr", "-0.5", "pos"]
    overrides, rest = split_config_overrides(argv)
    assert overrides == ["a.b=1", "lr=-0.5"]
    assert rest == ["--config", "x.py:big", "--out", "/tmp/o", "pos"]

    overrides, rest = split_config_overrides(["--config.a=1", "--", "--config.b=2"])
    assert overrides == ["a=1"] and rest == ["--", "--config.b=2"]

    with pytest.raises(ValueError, match=r"--config\.seed needs a value"):
        split_config_overrides(["--config.seed"])
    with pytest.raises(ValueError, match=r"--config\.seed needs a value"):
        split_config_overrides(["--config.seed", "--out", "x"])


def test_argparse_round_trip(cfg_file):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir")
    argv = ["--config", f"{cfg_file}:huge", "--config.model.width", "8", "--workdir=w", "--config.seed=5"]
    overrides, rest = split_config_overrides(argv)
    args = parser.parse_args(rest)
    cfg = load_config(args.config, overrides)
    assert (cfg.variant, cfg.model.width, cfg.seed, args.workdir) == ("huge", 8, 5, "w")


def test_config_to_json_is_sorted_and_stable(cfg_file):
    cfg = load_config(cfg_file, ["model.width=7"])
    text = config_to_json(cfg)
    assert text == config_to_json(load_config(cfg_file, ["model.width=7"]))
    data = json.loads(text)
    assert list(data) == sorted(data) and list(data["model"]) == sorted(data["model"])
    assert data["model"]["width"] == 7 and data["model"]["hidden"] == 7
    assert data["model"]["patch"] == [14, 14] and data["model"]["lr"] is None

    odd = ml_collections.ConfigDict({"fn": len, "kind": float})
    json.loads(config_to_json(odd))  # Best effort: never raises on non-JSON values.


def test_nullable_fields_accept_none(tmp_path):
    path = tmp_path / "c.py"
    path.write_text(
        "import ml_collections\nfrom ml_collections import config_dict\n"
        "def get_config():\n    c = ml_collections.ConfigDict()\n"
        "    c.res = config_dict.FieldReference('mid', field_type=str)\n    c.name = 'x'\n"
        "    c.opt = config_dict.placeholder(str)\n    return c\n"
    )
    cfg = load_config(str(path), ["res=None", "name=None", "opt=abc"])
    assert cfg.res is None and cfg.name == "None" and cfg.opt == "abc"
    assert load_config(str(path), ["opt=abc", "opt=None"]).opt is None
