"""One typed run config: shipped configs validate, every field is documented, errors point at the line."""

from pathlib import Path

import pytest
from pydantic import BaseModel

from rlhf_ray.config import ConfigError, RunConfig, load_config, save_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def _sections(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        annotation = field.annotation
        for candidate in getattr(annotation, "__args__", (annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                yield from _sections(candidate, f"{prefix}{name}.")


def test_shipped_configs_are_demo_test_and_a_gpu_example():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "test"} <= names and any(n.startswith("gpu") for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.name


def test_every_field_is_documented():
    undocumented = [name for name, field in _sections(RunConfig) if not field.description]
    assert undocumented == []


def test_defaults_alone_make_a_valid_run():
    assert RunConfig().model.hidden_size > 0


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_line_and_field(tmp_path):
    path = _write(tmp_path, "name: x\npretrain:\n  steps: 10\n  stpes: 20\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:4: pretrain.stpes: unknown setting" in str(err.value)


def test_bad_value_names_file_line_field_and_value(tmp_path):
    path = _write(tmp_path, "name: x\npretrain:\n  optim:\n    lr: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path}:4: pretrain.optim.lr: Input should be greater than 0 (got -1)" in message


def test_all_problems_are_reported_at_once(tmp_path):
    path = _write(tmp_path, "name: 'bad name!'\nseed: x\nmodel: {hidden_size: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "3 invalid setting(s)" in message
    assert f"{path}:1: name:" in message and f"{path}:2: seed:" in message
    assert f"{path}:3: model.hidden_size:" in message


def test_architecture_checks_explain_the_rule(tmp_path):
    path = _write(tmp_path, "model: {hidden_size: 96, num_heads: 6, num_kv_heads: 4}\n")
    with pytest.raises(ConfigError, match="num_heads \\(6\\) must be divisible by num_kv_heads \\(4\\)"):
        load_config(path)
    path = _write(tmp_path, "model: {hidden_size: 64, num_heads: 4, num_kv_heads: 4}\n")
    with pytest.raises(ConfigError, match="head size .* = 16 .* use one of"):
        load_config(path)


def test_cross_stage_rule_sequence_longer_than_the_context(tmp_path):
    path = _write(tmp_path, "model: {max_seq_len: 128}\npretrain: {seq_len: 256}\n")
    with pytest.raises(ConfigError, match="seq_len \\(256\\) exceeds model.max_seq_len \\(128\\)"):
        load_config(path)


def test_invalid_yaml_names_the_line(tmp_path):
    path = _write(tmp_path, "name: x\npretrain:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{path}:\\d+: not valid YAML"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_set_dotted_keys_and_are_validated(tmp_path):
    path = _write(tmp_path, "name: x\n")
    cfg = load_config(path, ["pretrain.steps=7", "ppo.estimator=grpo", "ppo.samples_per_prompt=4", "data.demo=null"])
    assert cfg.pretrain.steps == 7 and cfg.ppo.estimator == "grpo" and cfg.data.demo is None
    with pytest.raises(ConfigError, match="override 'pretrain.steps=-3': pretrain.steps"):
        load_config(path, ["pretrain.steps=-3"])
    with pytest.raises(ConfigError, match="expected 'dotted.key=value'"):
        load_config(path, ["pretrain.steps"])


def test_reward_source_needs_its_target(tmp_path):
    with pytest.raises(ConfigError, match="reward_source 'function' needs reward_function"):
        load_config(_write(tmp_path, "ppo: {reward_source: function}\n"))


def test_a_pretrained_model_brings_its_tokenizer(tmp_path):
    cfg = load_config(_write(tmp_path, "model: {pretrained: /models/qwen}\n"))
    assert cfg.tokenizer.pretrained == Path("/models/qwen")


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(CONFIGS[0])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
