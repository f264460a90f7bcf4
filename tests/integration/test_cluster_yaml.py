"""cluster.yaml, checked offline with Ray's own cluster-launcher code.

Ray's tests (python/ray/tests/test_autoscaler_yaml.py) check their example YAMLs the same way:
`prepare_config` merges the provider's defaults and fills per-type min/max_workers, and
`validate_config` checks the result against ray/autoscaler/ray-schema.json plus the cross-field
rules (head type exists, sum of min_workers <= max_workers). The EC2 lookup that `ray up` makes to
fill in node resources is replaced by a fixed instance-type description, so nothing leaves this
machine.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from unittest import mock

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"

# Facts from EC2 DescribeInstanceTypes (the fields Ray reads), as published by AWS.
EC2_INSTANCE_TYPES = [
    {"InstanceType": "m5.2xlarge", "VCpuInfo": {"DefaultVCpus": 8}, "MemoryInfo": {"SizeInMiB": 32768}},
    {
        "InstanceType": "p5.48xlarge",
        "VCpuInfo": {"DefaultVCpus": 192},
        "MemoryInfo": {"SizeInMiB": 2097152},
        "GpuInfo": {"Gpus": [{"Name": "H100", "Manufacturer": "NVIDIA", "Count": 8, "MemoryInfo": {"SizeInMiB": 81920}}]},
    },
    {
        "InstanceType": "p4d.24xlarge",
        "VCpuInfo": {"DefaultVCpus": 96},
        "MemoryInfo": {"SizeInMiB": 1179648},
        "GpuInfo": {"Gpus": [{"Name": "A100", "Manufacturer": "NVIDIA", "Count": 8, "MemoryInfo": {"SizeInMiB": 40960}}]},
    },
]

GPU_TYPES = {"p5.48xlarge": "H100", "p4d.24xlarge": "A100"}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(raw))


def _workers(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def _by_instance(cfg: dict) -> dict:
    return {v["node_config"]["InstanceType"]: v for v in _workers(cfg).values()}


# ---------------------------------------------------------------------------------- Ray's validator


def test_validates_against_ray_schema(prepared):
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_validator_is_not_a_rubber_stamp(prepared):
    """The same validator rejects a broken copy, so the pass above means something."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    bad = copy.deepcopy(prepared)
    bad["available_node_types"]["gpu-h100"]["resources"]["GPU"] = "eight"  # schema: integer
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)
    bad = copy.deepcopy(prepared)
    bad["head_node_type"] = "no-such-type"  # a cross-field rule, checked after the schema
    with pytest.raises(ValueError):
        validate_config(bad)


def test_declared_resources_match_what_ray_detects_on_ec2(prepared):
    """`ray up` fills node resources from EC2's description of the instance type. The declared
    values (which the autoscaler needs before any node exists) must agree with that."""
    from ray.autoscaler._private.providers import _get_node_provider_cls
    from ray.autoscaler._private.util import validate_config

    provider_cls = _get_node_provider_cls(prepared["provider"])
    with mock.patch(
        "ray.autoscaler._private.aws.node_provider.list_ec2_instances", return_value=EC2_INSTANCE_TYPES
    ) as lookup:
        filled = provider_cls.fillout_available_node_types_resources(copy.deepcopy(prepared))
    assert lookup.called  # the EC2 call was the patched one, not the network
    validate_config(filled)
    for name, node_type in prepared["available_node_types"].items():
        detected = filled["available_node_types"][name]["resources"]
        for key, value in node_type["resources"].items():
            assert detected[key] == value, (name, key)
    assert filled["available_node_types"]["head"]["resources"] == {"CPU": 0}


# ---------------------------------------------------------------------------------- node types


def test_gpu_worker_types_h100_and_a100(prepared):
    by_instance = _by_instance(prepared)
    assert set(GPU_TYPES) <= set(by_instance)
    for instance, accel in GPU_TYPES.items():
        res = by_instance[instance]["resources"]
        assert res["GPU"] == 8, instance
        assert res[f"accelerator_type:{accel}"] == 1, instance


def test_head_runs_no_work(prepared, raw):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0  # nothing at all is scheduled on the head
    assert not re.match(r"^(p|g|trn|inf)\d", head["node_config"]["InstanceType"])  # a CPU instance
    assert head["max_workers"] == 0
    start = " ".join(raw["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "--num-gpus" not in start


def test_autoscaling_bounds(prepared):
    workers = _workers(prepared)
    assert 1 <= prepared["max_workers"] <= 8  # a cost guard: 8 p5 nodes cost several $100 an hour
    assert 0 < prepared["idle_timeout_minutes"] <= 30
    for name, t in workers.items():
        assert t["min_workers"] == 0, name  # no GPU node runs while no job asks for one
        assert 1 <= t["max_workers"] <= prepared["max_workers"], name
    assert prepared["provider"]["cache_stopped_nodes"] is False  # idle GPU nodes are terminated


# ---------------------------------------------------------------------------------- setup, security


def test_setup_installs_raytrain_from_the_mounted_checkout(prepared):
    mounts = prepared["file_mounts"]
    checkout = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert checkout == ["~/raytrain"]
    cmds = " && ".join(prepared["setup_commands"])
    assert "pip install" in cmds and "raytrain" in cmds
    # head and workers both get it (prepare_config merges setup_commands into both lists)
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "raytrain" in c for c in prepared[key]), key
    assert ".gitignore" in prepared["rsync_filter"]


def test_no_credentials_in_the_file():
    text = CLUSTER_YAML.read_text().lower()
    for needle in ("aws_access_key", "aws_secret", "secret", "akia", "aws_session_token", "aws_credentials"):
        assert needle not in text, needle


def test_s3_access_through_instance_profiles(prepared):
    for name, t in prepared["available_node_types"].items():
        arn = t["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::[^:]+:instance-profile/[\w+=,.@/-]+", arn), (name, arn)
    # The user must set the account: the marker is there to be searched for.
    assert "SET-ME" in CLUSTER_YAML.read_text()


def test_dashboard_not_exposed_and_token_auth_on(raw):
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in raw[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # No user-defined security group that could open Ray's ports to the world.
    assert "security_group" not in raw["provider"]


def test_docker_image_pins_a_ray_release(raw):
    """A fixed Ray release (never `latest`), no older than pyproject's lower bound: the client
    that runs `ray job submit` and the cluster must run the same Ray."""
    m = re.fullmatch(r"rayproject/ray:(\d+)\.(\d+)\.(\d+)-py3(\d+)-gpu", raw["docker"]["image"])
    assert m, raw["docker"]["image"]
    major, minor, _, py_minor = map(int, m.groups())
    assert (major, minor) >= (2, 60) and py_minor >= 10


def test_setup_installs_java_for_meteor(prepared):
    """pycocoevalcap's METEOR and PTB tokenizer run under java: every node gets a JRE."""
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = prepared[key]
        assert any("default-jre-headless" in c and "apt-get install" in c for c in cmds), key
        assert any(c.strip() == "java -version" for c in cmds), key  # setup fails loudly if the install did not work
