"""Configs: YAML + typed models; a bad field names the file, the field and what was expected."""

from __future__ import annotations

import pytest
from conftest import REPO

from infra.config import ConfigError, RunConfig, load_config


def test_shipped_configs_validate():
    for path in (REPO / "configs").glob("*.yaml"):
        assert isinstance(load_config(path), RunConfig)


def test_bad_field_names_file_field_and_expectation(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ray:\n  actors: zero\ningest:\n  resize: zoom\n  shard_sise: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    text = str(err.value)
    assert str(bad) in text
    assert "'ray.actors'" in text and "valid integer" in text and "'zero'" in text
    assert "'ingest.resize'" in text and "'fit', 'center_crop' or 'none'" in text
    assert "'ingest.shard_sise'" in text and "Extra inputs are not permitted" in text


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    cfg = load_config(
        None, ["ray.actors=3", "ingest.source=s3://b/x", 'storage_options={"anon": true}']
    )
    assert (
        cfg.ray.actors == 3
        and cfg.ingest.source == "s3://b/x"
        and cfg.storage_options == {"anon": True}
    )
    with pytest.raises(ConfigError, match="'ray.cpus_per_actor'.*greater than 0"):
        load_config(None, ["ray.cpus_per_actor=0"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["ray.actors"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")


def test_model_specs_are_checked_against_the_zoo(tmp_path):
    cfg = load_config(None, ["models.generator={name: stylegan2, checkpoint: g.pt, size: 256}"])
    assert cfg.models.generator.options == {"size": 256}
    bad = tmp_path / "m.yaml"
    bad.write_text("models:\n  generator: {name: stylegan3, checkpoint: g.pt}\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(bad) in str(err.value) and "'models.generator'" in str(err.value)
    assert "stylegan2" in str(err.value)  # the known names are listed
