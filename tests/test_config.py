import pytest

from sgdscope.config import RunConfig, apply_overrides, load_config, validate
from sgdscope.errors import ConfigError


def test_defaults_validate_and_roundtrip():
    cfg = load_config(None)
    assert isinstance(cfg, RunConfig)
    assert cfg.measure.bn_policy == "train-restore"
    assert validate(cfg.model_dump(mode="json")) == cfg


def test_set_overrides_parse_yaml_values():
    cfg = load_config(None, ["optimizer.lr=0.05", "probes.eigen.k=3", "probes.interpolation.epochs=[1, 2]"])
    assert cfg.optimizer.lr == 0.05 and cfg.probes.eigen.k == 3
    assert cfg.probes.interpolation.epochs == [1, 2]


@pytest.mark.parametrize(
    "override, field",
    [
        ("optimizer.lr=-1", "optimizer.lr"),
        ("optimizer.lr=abc", "optimizer.lr"),
        ("optimizer.batch_size=0", "optimizer.batch_size"),
        ("optimizer.bogus=1", "optimizer.bogus"),
        ("model.name=transformer", "model.name"),
        ("probes.interpolation.alphas=[0.5, 0.1]", "probes.interpolation.alphas"),
        ("probes.interpolation.alphas=[]", "probes.interpolation.alphas"),
        ("probes.alpha_step.alphas=[]", "probes.alpha_step.alphas"),
        ("probes.alpha_step.alphas=[4, 0.5]", "probes.alpha_step.alphas"),
        ("measure.bn_policy=sometimes", "measure.bn_policy"),
        ("probes.direction.eigen_indices=[0]", "probes.direction.eigen_indices"),
    ],
)
def test_bad_values_give_one_line_naming_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert msg.startswith(field + ":"), msg
    assert "\n" not in msg


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optimizer.lr"])


def test_yaml_file_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optimizer: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
