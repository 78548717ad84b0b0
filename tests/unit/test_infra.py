"""infra/ validates without a cloud: the AWS cluster config passes Ray's own autoscaler config
validation and its EC2 node configs botocore's RunInstances model; the KubeRay manifests carry the
fields KubeRay requires; the image, the manifests and pyproject.toml agree with each other."""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml
from support.commands import REPO, check_command, check_runtime_env, commands_in

INFRA = REPO / "infra"
IMAGE_HOME = "/home/ray/tsgd-ray"  # where the Dockerfile puts the repository


def _load(path):
    return yaml.safe_load((INFRA / path).read_text())


def _pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _dockerfile():
    return (INFRA / "docker" / "Dockerfile").read_text()


def _project_image() -> str:
    return f"registry.example.com/tsgd-ray:{_pyproject()['project']['version']}"


def _ray_version_of_image() -> str:
    return re.search(r"^ARG RAY_VERSION=(\S+)$", _dockerfile(), re.M).group(1)


# ---------------------------------------------------------------- AWS cluster launcher


def _validate_cluster(config: dict) -> dict:
    """What `ray up` does to a config before it calls the cloud: fill defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _validate_run_instances(node_config: dict) -> None:
    """Check a node_config as the EC2 RunInstances request Ray sends (Ray adds the AMI and counts)."""
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("ec2")
    request = {"ImageId": "ami-00000000", "MinCount": 1, "MaxCount": 1, **node_config}
    report = ParamValidator().validate(request, model.operation_model("RunInstances").input_shape)
    assert not report.has_errors(), report.generate_report()


def test_aws_cluster_passes_rays_validation():
    config = _load("aws/cluster.yaml")
    prepared = _validate_cluster(config)
    assert prepared["provider"]["type"] == "aws" and prepared["idle_timeout_minutes"] > 0
    for node_type in config["available_node_types"].values():
        _validate_run_instances(node_type["node_config"])
    for command in prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]:
        for argv in commands_in(command):
            check_command(argv)


def test_aws_cluster_has_cpu_head_spot_gpus_with_on_demand_fallback_and_cpu_decoders():
    config = _load("aws/cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and "GPU" not in head["resources"]
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    spot = [n for n, t in gpu.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    on_demand = [n for n, t in gpu.items() if "InstanceMarketOptions" not in t["node_config"]]
    assert spot and on_demand
    for s in spot:
        # the fallback offers the same resources, so it can take any request spot would have
        assert any(gpu[o]["resources"] == gpu[s]["resources"] for o in on_demand)
        assert all(gpu[s]["priority"] > gpu[o]["priority"] for o in on_demand)
    assert any("RAY_enable_autoscaler_v2=1" in c for c in config["head_start_ray_commands"]), (
        "priority and failure-aware fallback need autoscaler v2"
    )
    cpu_workers = [t for n, t in types.items() if n != config["head_node_type"] and "GPU" not in t["resources"]]
    assert cpu_workers and all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in cpu_workers)
    assert config["docker"]["image"] == _project_image()
    # two GPU families on spot: one family's missing capacity does not stall the run
    assert len({gpu[n]["node_config"]["InstanceType"].split(".")[0] for n in spot}) >= 2


def test_aws_nodes_boot_a_current_gpu_ami_pull_the_image_from_ecr_and_have_a_role():
    config = _load("aws/cluster.yaml")
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        # resolved per region at launch (not Ray's fallback Ubuntu 18.04 / CUDA 11 Deep Learning AMI)
        assert node_config["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/"), name
        assert "nvidia-driver" in node_config["ImageId"] and "ubuntu-22.04" in node_config["ImageId"]
        assert node_config["IamInstanceProfile"]["Name"].startswith("tsgd-ray-"), name
    head_profile = config["available_node_types"][config["head_node_type"]]["node_config"]["IamInstanceProfile"]
    assert head_profile["Name"] == "tsgd-ray-head"
    registry = config["docker"]["image"].split("/")[0]
    login = [c for c in config["initialization_commands"] if "docker login" in c]
    assert len(login) == 1 and "aws ecr get-login-password" in login[0] and login[0].endswith(registry)
    assert f"--region {config['provider']['region']}" in login[0]
    # the profiles' policies are files the README's commands apply
    readme = (INFRA / "aws" / "README.md").read_text()
    for name in ("ec2-trust.json", "data-policy.json", "head-policy.json"):
        assert f"file://infra/aws/{name}" in readme
    assert "AmazonEC2ContainerRegistryReadOnly" in readme


def _allows(policy: dict, action: str, resource: str) -> bool:
    """Whether an IAM policy's Allow statements grant `action` on `resource` (wildcards as IAM's)."""
    listed = lambda value: value if isinstance(value, list) else [value]  # noqa: E731
    return any(
        st["Effect"] == "Allow"
        and any(fnmatch.fnmatchcase(action, a) for a in listed(st["Action"]))
        and any(fnmatch.fnmatchcase(resource, r) for r in listed(st["Resource"]))
        for st in policy["Statement"]
    )


def test_the_head_role_can_launch_every_worker_node_type():
    """The head's autoscaler launches the workers with its own role: EC2 calls, passing the workers'
    role, and resolving each node type's `resolve:ssm:` AMI parameter (EC2 looks it up with the
    launcher's permissions, so without ssm:GetParameters every worker launch fails)."""
    config = _load("aws/cluster.yaml")
    head = json.loads((INFRA / "aws" / "head-policy.json").read_text())
    region = config["provider"]["region"]
    for action in ("ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances"):
        assert _allows(head, action, "*"), action
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue
        node_config = node_type["node_config"]
        role = node_config["IamInstanceProfile"]["Name"]  # profile and role share the name (README.md)
        assert _allows(head, "iam:PassRole", f"arn:aws:iam::123456789012:role/{role}"), name
        parameter = node_config["ImageId"].removeprefix("resolve:ssm:")
        assert _allows(head, "ssm:GetParameters", f"arn:aws:ssm:{region}::parameter{parameter}"), name
    assert not _allows(head, "iam:PassRole", "arn:aws:iam::123456789012:role/admin")  # only the workers' role
    data = json.loads((INFRA / "aws" / "data-policy.json").read_text())
    assert _allows(data, "s3:PutObject", "arn:aws:s3:::my-bucket/tsgd/k400/shards/x.parquet")
    assert not _allows(data, "s3:DeleteObject", "arn:aws:s3:::my-bucket/tsgd/k400/shards/x.parquet")


def test_the_aws_cluster_enforces_token_auth_with_the_laptops_token():
    """Every `ray start` turns token auth on, and `ray up` copies the laptop's token to Ray's default
    path on every node, so the client, the head and the workers share one token."""
    config = _load("aws/cluster.yaml")
    for command in (
        c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c
    ):
        assert "RAY_AUTH_MODE=token ray start" in command or "RAY_AUTH_MODE=token RAY_enable" in command, command
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    readme = (INFRA / "aws" / "README.md").read_text()
    assert "ray get-auth-token --generate" in readme and "export RAY_AUTH_MODE=token" in readme
    assert f'pip install "ray[default]=={_ray_version_of_image()}"' in readme  # the client's Ray is the image's
    assert "create-service-linked-role --aws-service-name spot.amazonaws.com" in readme
    assert "G and VT" in readme  # a new account's GPU quotas are 0


@pytest.mark.parametrize(
    "damage, error",
    [
        (lambda c: c.update(idle_timeout_minute=5), "Additional properties"),
        (lambda c: c["available_node_types"]["gpu-spot"].update(min_workers="two"), "is not of type"),
        (lambda c: c.update(head_node_type="nope"), "head_node_type"),
    ],
)
def test_rays_validation_catches_a_broken_cluster_config(damage, error):
    config = _load("aws/cluster.yaml")
    damage(config)
    with pytest.raises(Exception) as info:
        _validate_cluster(config)
    assert error in str(info.value)


def test_ec2_model_catches_a_broken_node_config():
    node_config = dict(_load("aws/cluster.yaml")["available_node_types"]["gpu-spot"]["node_config"])
    node_config["InstanceTyp"] = node_config.pop("InstanceType")
    with pytest.raises(AssertionError, match="InstanceTyp"):
        _validate_run_instances(node_config)


# ---------------------------------------------------------------- KubeRay


def _crd_folder() -> Path:
    """KubeRay's published CRDs, read in place (never copied): ../shared/kuberay-crds beside this
    checkout, or beside the repository a clean clone was made from (CI's clone lives elsewhere)."""
    import subprocess

    candidates = [REPO.parent / "shared" / "kuberay-crds"]
    origin = subprocess.run(
        ["git", "-C", str(REPO), "config", "--get", "remote.origin.url"], capture_output=True, text=True
    ).stdout.strip()
    if origin and "://" not in origin and ":" not in origin.split("/")[0]:  # a local path, not a remote
        candidates.append(Path(origin).resolve().parent / "shared" / "kuberay-crds")
    return next((c for c in candidates if c.is_dir()), candidates[0])


CRDS = _crd_folder()
CRD_VERSIONS = ("1.4.0", "1.7.0")
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")


def _manifests() -> dict[str, dict]:
    """file name -> its one document"""
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted((INFRA / "k8s").glob("*.yaml"))}


def _groups(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def _containers(spec: dict) -> list[dict]:
    return [c for g in _groups(spec) for c in g["template"]["spec"]["containers"]]


def _without_token_env(spec: dict) -> dict:
    """The cluster spec with the manual token-auth variables taken out of every container and
    of the autoscaler."""
    spec = copy.deepcopy(spec)
    del spec["autoscalerOptions"]["env"]
    for c in _containers(spec):
        c["env"] = [e for e in c.get("env", []) if e["name"] not in AUTH_ENV]
        if not c["env"]:
            del c["env"]
    return spec


def _strict(schema: dict) -> dict:
    """A CRD's openAPIV3Schema as JSON Schema, checked as `kubectl apply --validate=strict` does:
    unknown properties are refused on every object with `properties` unless it preserves unknown
    fields; `x-kubernetes-int-or-string` takes an integer or a string; `nullable` allows null."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    elif schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if "items" in out:
        out["items"] = _strict(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out and not schema.get("x-kubernetes-int-or-string"):
            out[key] = [_strict(s) for s in out[key]]
    return out


@functools.lru_cache(maxsize=None)
def _crd_validator(kind: str, version: str):
    import jsonschema

    crd = yaml.safe_load((CRDS / f"{kind.lower()}s-v{version}.yaml").read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(_strict(schema))


def _crd_errors(doc: dict, version: str) -> list[str]:
    if not CRDS.is_dir():
        pytest.skip(f"the KubeRay CRDs are not at {CRDS}")
    validator = _crd_validator(doc["kind"], version)
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc))


def _gibibytes(quantity: str) -> float:
    """A Kubernetes quantity in Gi, Mi or Ti (the ones these manifests use) in GiB."""
    number, unit = re.fullmatch(r"([0-9.]+)(Gi|Mi|Ti)?", str(quantity)).groups()
    return float(number) * {"Gi": 1, "Mi": 1 / 1024, "Ti": 1024, None: 1 / 2**30}[unit]


def _check_cluster_spec(spec: dict) -> None:
    """What this project needs of a cluster spec (the CRD checks the rest)."""
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["rayVersion"] == _ray_version_of_image()
    for c in _containers(spec):
        assert c["image"] == _project_image()
        assert c["resources"]["requests"] == c["resources"]["limits"], "Ray sizes itself from the limits"
    for group in _groups(spec):
        pod = group["template"]["spec"]
        # a failed Ray pod is replaced by KubeRay (its autoscaler-v2 sample sets this), never restarted in place
        assert pod["restartPolicy"] == "Never"
        # disk-backed emptyDirs count against the node's disk: the request lets the scheduler see them
        # (a 130Gi cache without one lands on a 20 GiB default node disk and is evicted under DiskPressure)
        on_disk = sum(
            _gibibytes(v["emptyDir"].get("sizeLimit", "0"))
            for v in pod.get("volumes", [])
            if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
        )
        requested = sum(_gibibytes(c["resources"]["requests"].get("ephemeral-storage", "0")) for c in pod["containers"])
        assert requested >= on_disk + 10, (group.get("groupName", "head"), requested, on_disk)
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    ]
    cpu_groups = [g for g in spec["workerGroupSpecs"] if g not in gpu_groups]
    assert gpu_groups and cpu_groups and all(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups)
    assert {"gcs", "dashboard"} <= {
        p["name"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }


@pytest.mark.parametrize("version", CRD_VERSIONS)
def test_kuberay_manifests_pass_the_crds_strict_validation(version):
    """Every ray.io manifest against KubeRay's own schema, unknown fields refused; rayjob-auth.yaml
    needs KubeRay >= 1.5.1 (authOptions), and 1.4.0's schema refuses it."""
    for name, doc in _manifests().items():
        if not doc["apiVersion"].startswith("ray.io/"):
            continue
        errors = _crd_errors(doc, version)
        if name == "rayjob-auth.yaml" and version == "1.4.0":
            assert errors == [
                "spec/rayClusterSpec: Additional properties are not allowed ('authOptions' was unexpected)"
            ]
        else:
            assert errors == [], (name, errors)


@pytest.mark.parametrize(
    "damage,error",
    [
        (lambda d: d["spec"].update(workerGroupSpec=[]), "'workerGroupSpec' was unexpected"),  # a misspelt field
        (lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "0 is not of type 'string'"),
        (lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas="16"), "'16' is not of type 'integer'"),
        (lambda d: d["spec"]["autoscalerOptions"].update(idleTimeout=60), "'idleTimeout' was unexpected"),
    ],
)
def test_the_strict_crd_check_refuses_a_broken_manifest(damage, error):
    doc = copy.deepcopy(_manifests()["raycluster.yaml"])
    damage(doc)
    assert any(error in e for e in _crd_errors(doc, CRD_VERSIONS[-1]))


def test_kuberay_raycluster_with_token_auth():
    cluster = _manifests()["raycluster.yaml"]
    assert cluster["kind"] == "RayCluster" and cluster["metadata"]["name"]
    _check_cluster_spec(cluster["spec"])
    # every Ray container enforces the token from one Secret, and the autoscaler sidecar (which KubeRay
    # gives none of the containers' env) presents it, or it cannot read the demand and never scales up
    for env_list in [c["env"] for c in _containers(cluster["spec"])] + [cluster["spec"]["autoscalerOptions"]["env"]]:
        env = {e["name"]: e for e in env_list}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "tsgd-ray-auth", "key": "auth_token"}
    steps = (INFRA / "k8s" / "README.md").read_text().split("## A standing cluster")[1]
    assert "kubectl create serviceaccount tsgd-ray" in steps  # the pods run as it


def test_kuberay_rayjobs_run_the_pipeline_from_the_image():
    manifests = _manifests()
    job, auth = manifests["rayjob.yaml"], manifests["rayjob-auth.yaml"]
    for doc in (job, auth):
        spec = doc["spec"]
        assert (
            doc["kind"] == "RayJob" and spec["shutdownAfterJobFinishes"] is True and spec["activeDeadlineSeconds"] > 0
        )
        _check_cluster_spec(spec["rayClusterSpec"])
        # the entrypoint runs in the image, where the package (and its shipped configs) is installed
        assert spec["entrypoint"].split()[:4] == ["python", "-m", "tsgd_ray", "run"] and IMAGE_HOME in _dockerfile()
        check_command(shlex.split(spec["entrypoint"]))
        check_runtime_env(json_text=json.dumps(yaml.safe_load(spec["runtimeEnvYAML"])))
    assert job["spec"]["rayClusterSpec"] == _without_token_env(manifests["raycluster.yaml"]["spec"]), (
        "rayjob.yaml and raycluster.yaml drifted"
    )
    # the submitter pulls a small CPU image of the same Ray version, not the GPU image
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert submitter["image"].startswith(f"rayproject/ray:{_ray_version_of_image()}-") and submitter["image"].endswith(
        "-cpu"
    )
    assert "nvidia.com/gpu" not in submitter["resources"]["limits"]
    # rayjob-auth.yaml: the same job with the operator's token auth and the submitter as a sidecar
    expected = copy.deepcopy(job)
    del expected["spec"]["submitterPodTemplate"]
    expected["spec"].update(submissionMode="SidecarMode")
    expected["spec"]["rayClusterSpec"]["authOptions"] = {"mode": "token"}
    expected["metadata"]["name"] += "-auth"
    assert auth == expected
    # every ConfigMap the pods read is defined
    names = {
        ref["configMapRef"]["name"] for c in _containers(job["spec"]["rayClusterSpec"]) for ref in c.get("envFrom", [])
    }
    assert names == {manifests["configmap.yaml"]["metadata"]["name"]}
    assert "MLFLOW_TRACKING_URI" in manifests["configmap.yaml"]["data"]


def test_the_kubernetes_manifests_ship_the_mlflow_server_the_configmap_names():
    """configmap.yaml's MLFLOW_TRACKING_URI resolves to mlflow.yaml's Service (name, namespace,
    port), which selects the server's pod and port; the server's volume is the claim it ships,
    and its allowed Host names include the URI's (test_tracking.py runs its command)."""
    from urllib.parse import urlsplit

    import mlflow

    manifests = _manifests()
    uri = urlsplit(manifests["configmap.yaml"]["data"]["MLFLOW_TRACKING_URI"])
    items = {item["kind"]: item for item in manifests["mlflow.yaml"]["items"]}
    service, deployment, claim = items["Service"], items["Deployment"], items["PersistentVolumeClaim"]
    service_name, namespace = uri.hostname.split(".")[:2]
    assert uri.hostname == f"{service_name}.{namespace}.svc.cluster.local"
    assert (service["metadata"]["name"], service["metadata"]["namespace"]) == (service_name, namespace)
    assert items["Namespace"]["metadata"]["name"] == namespace == deployment["metadata"]["namespace"]
    assert service["spec"]["type"] == "ClusterIP"  # mlflow server has no access control of its own
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == uri.port]
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    command = container["command"]
    assert ports[port["targetPort"]] == int(command[command.index("--port") + 1])
    assert f"{uri.hostname}:*" in command[command.index("--allowed-hosts") + 1].split(",")
    assert container["resources"]["requests"] == container["resources"]["limits"]
    (volume,) = pod["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert deployment["spec"]["strategy"]["type"] == "Recreate" and deployment["spec"]["replicas"] == 1  # sqlite
    # the server's major version is the clients'
    assert container["image"].rsplit(":v", 1)[1].split(".")[0] == mlflow.__version__.split(".")[0]
    assert "kubectl apply -f infra/k8s/mlflow.yaml" in (INFRA / "k8s" / "README.md").read_text()


# ---------------------------------------------------------------- image and runtime envs


def test_dockerfile_installs_the_project_on_a_ray_image():
    from packaging.specifiers import SpecifierSet

    text = _dockerfile()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", text, re.M)
    ray_spec = next(d for d in _pyproject()["project"]["dependencies"] if d.startswith("ray["))
    assert _ray_version_of_image() in SpecifierSet(ray_spec.split("]", 1)[1])
    for line in re.findall(r"^COPY (.*)$", text, re.M):
        sources = [a for a in line.split()[:-1] if not a.startswith("--")]
        assert sources and all((REPO / s).exists() for s in sources), line
    extras = re.findall(r'"\.\[([a-z,]+)\]"', text)
    assert extras and set(extras[0].split(",")) <= set(_pyproject()["project"]["optional-dependencies"])
    # the build proves the decoders and the pinned torchvision import, and builds one of its models
    assert "import decord, av, torch, torchvision" in text and "build_model('r2plus1d_18'" in text
    pins = dict(re.findall(r'"(torch|torchvision)==([0-9.]+)"', text))
    assert set(pins) == {"torch", "torchvision"}
    for path in ("README.md", "../k8s/rayjob.yaml", "../aws/cluster.yaml"):
        assert _project_image() in (INFRA / "docker" / path).read_text()


def test_runtime_envs_are_valid_and_the_no_image_one_lists_pyprojects_dependencies():
    for path in ("infra/runtime_env.yaml", "infra/docker/runtime_env.yaml"):
        check_runtime_env(path, working_dir=".")
    env = yaml.safe_load((INFRA / "docker" / "runtime_env.yaml").read_text())
    wanted = [d.replace(" ", "") for d in _pyproject()["project"]["dependencies"] if not d.startswith("ray")]
    assert [p.replace(" ", "") for p in env["pip"]["packages"]] == wanted
