import pytest
import yaml

from mmsae.config import (
    ConfigError,
    MineConfig,
    RunConfig,
    RunSection,
    ToyWorldConfig,
    config_from_yaml,
    dump_config,
    explain_config,
    load_config,
    parse_overrides,
)


def test_defaults_load_without_a_file():
    cfg = load_config(None)
    assert cfg == RunConfig()


def test_yaml_file_and_overrides_merge(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("run:\n  name: exp1\ntoyworld:\n  n_train: 10\n  seed: 3\n")
    cfg = load_config(p, ["toyworld.seed=7", "toyworld.colors=[red, blue]"])
    assert cfg.run.name == "exp1"
    assert cfg.toyworld.n_train == 10
    assert cfg.toyworld.seed == 7
    assert cfg.toyworld.colors == ["red", "blue"]


def test_text_fields_take_overrides_that_look_like_numbers_or_booleans_as_text(tmp_path):
    cfg = load_config(None, ["run.name=2024", "cache.prompt=yes", "train.k=8", "tracking.enabled=false"])
    assert (cfg.run.name, cfg.cache.prompt, cfg.train.k, cfg.tracking.enabled) == ("2024", "yes", 8, False)
    p = tmp_path / "run.yaml"
    p.write_text("run:\n  name: 7\n")
    assert load_config(p).run.name == "7"
    with pytest.raises(ConfigError, match=r"`train\.k`.*integer"):  # the other way round stays an error
        load_config(None, ["run.name=2024", "train.k=abc"])


def test_unknown_key_is_rejected_with_its_dotted_path(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("toyworld:\n  n_trian: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key `toyworld\.n_trian`"):
        load_config(p)


def test_wrong_type_names_the_key_and_what_was_expected(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["toylmm.steps=many"])
    msg = str(e.value)
    assert "`toylmm.steps`" in msg and "integer" in msg and "'many'" in msg


def test_out_of_range_value_is_rejected():
    with pytest.raises(ConfigError, match=r"`toyworld\.n_train`"):
        load_config(None, ["toyworld.n_train=0"])


def test_missing_file_and_malformed_yaml_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(top)


def test_bad_override_syntax_is_explained():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["toyworld.seed"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["run.name=x", "run.name.sub=1"])


def test_dump_and_reparse_round_trips():
    cfg = load_config(None, ["toyworld.n_train=12", "run.workdir=s3://bucket/x"])
    again = config_from_yaml(dump_config(cfg))
    assert again == cfg


def test_field_docstrings_become_descriptions():
    fields = RunConfig.model_fields["toyworld"].annotation.model_fields
    assert "training images" in fields["n_train"].description


SEEDED = ("toyworld", "toylmm", "train", "mine")


def test_run_seed_is_every_section_seed_unless_a_section_sets_its_own(tmp_path):
    cfg = load_config(None, ["run.seed=7"])
    assert {name: getattr(cfg, name).seed for name in SEEDED} == dict.fromkeys(SEEDED, 7)
    cfg = load_config(None, ["run.seed=7", "mine.seed=3"])
    assert {name: getattr(cfg, name).seed for name in SEEDED} == {"toyworld": 7, "toylmm": 7, "train": 7, "mine": 3}
    p = tmp_path / "run.yaml"
    p.write_text("run:\n  seed: 5\ntrain:\n  seed: null\n  k: 8\ntoylmm:\n  seed: 0\n")
    cfg = load_config(p)
    assert (cfg.train.seed, cfg.train.k, cfg.toylmm.seed, cfg.mine.seed) == (5, 8, 0, 5)  # null: run.seed
    assert all(type(getattr(cfg, name).seed) is int for name in SEEDED)


def test_section_seeds_follow_the_run_seed_they_were_validated_with():
    assert ToyWorldConfig().seed == 0 and ToyWorldConfig(seed=None).seed == 0  # a section alone: run.seed's default
    world = ToyWorldConfig(n_train=3)
    cfg = RunConfig(run=RunSection(seed=4), toyworld=world, mine=MineConfig(seed=2))
    assert (cfg.toyworld.seed, cfg.toyworld.n_train, cfg.mine.seed, cfg.train.seed) == (4, 3, 2, 4)
    assert world.seed == 0  # the section given is left as it was
    cfg.run = RunSection(seed=9)  # assigning re-validates: unset seeds follow, the explicit one stays
    assert (cfg.toyworld.seed, cfg.train.seed, cfg.mine.seed) == (9, 9, 2)


def test_resolved_seeds_are_written_out_and_round_trip():
    cfg = load_config(None, ["run.seed=7", "mine.seed=3"])
    dumped = dump_config(cfg)
    data = yaml.safe_load(dumped)
    assert {name: data[name]["seed"] for name in SEEDED} == {"toyworld": 7, "toylmm": 7, "train": 7, "mine": 3}
    assert config_from_yaml(dumped) == cfg


def test_explain_writes_each_key_under_its_docstring_and_reads_back():
    cfg = load_config(None, ["cache.batch_size=3", "run.seed=7"])
    text = explain_config(cfg)
    lines = text.splitlines()
    at = lines.index("cache:")
    batch = lines.index("  batch_size: 3", at)
    assert lines[batch - 1] == "  # Images per forward pass."
    assert lines[at - 1].startswith("# The cache stage")
    docs = RunConfig.model_fields["train"].annotation.model_fields["grad_clip"].description
    wrapped = [line.removeprefix("  # ") for line in lines[lines.index("train:"):] if line.startswith("  # ")]
    assert " ".join(docs.split()) in " ".join(wrapped)  # a long docstring, wrapped
    assert all(len(line) <= 120 for line in lines)
    assert config_from_yaml(text) == cfg
