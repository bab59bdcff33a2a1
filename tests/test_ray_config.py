"""ray_config.yaml passes Ray's own cluster-launcher validation and describes the cluster we need."""
from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw_config() -> dict:
    return yaml.safe_load((ROOT / "ray_config.yaml").read_text())


def test_ray_validates_the_cluster_config(raw_config):
    config = prepare_config(copy.deepcopy(raw_config))
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    gpu_types = [name for name, node in node_types.items() if node.get("resources", {}).get("GPU", 0) > 0]
    cpu_types = [name for name, node in node_types.items()
                 if name != config["head_node_type"] and not node.get("resources", {}).get("GPU")]
    assert gpu_types and cpu_types
    for name in gpu_types + cpu_types:
        assert node_types[name]["max_workers"] > 0
        # workers read the S3 feature store, so they need an instance profile with S3 access
        assert "IamInstanceProfile" in node_types[name]["node_config"]


def test_setup_installs_the_package(raw_config):
    mounted = raw_config["file_mounts"]
    (remote_dir,) = [remote for remote, local in mounted.items() if local == "."]
    assert any(f"pip install -e {remote_dir}" in command for command in raw_config["setup_commands"])
    assert any("torch==2.13.0" in command for command in raw_config["setup_commands"])


def test_validation_rejects_a_broken_config(raw_config):
    """Guards the test above against a validator that accepts anything."""
    broken = copy.deepcopy(raw_config)
    broken["available_node_types"]["cpu_worker"]["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_no_data_is_synced_to_the_workers(raw_config):
    """Inputs come from S3 (pixloc_core.files): the only file mount is the package itself."""
    assert not raw_config.get("cluster_synced_files")
    assert list(raw_config["file_mounts"].values()) == ["."]
