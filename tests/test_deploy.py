"""deploy/: every manifest validates offline against Kubernetes' OpenAPI schemas (kubernetes-validate,
strict: unknown fields are errors) and KubeRay's v1 API schema; the Ray version is the same
everywhere; what the jobs run exists in the repository."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from click.testing import CliRunner
from referencing import Registry, Resource

from pipeline.cli import main

from conftest import REPO

KUBERAY = REPO / "deploy" / "kuberay"
KUBERNETES_VERSION = "1.33"


def documents() -> list[tuple[str, dict]]:
    """Every manifest in deploy/kuberay, plus the RayJob template the CronJob creates."""
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d):
            docs.append((f"{path.name}#{i}", doc))
            if doc["kind"] == "ConfigMap":
                for key, text in doc.get("data", {}).items():
                    embedded = yaml.safe_load(text) if key.endswith(".yaml") else None
                    if isinstance(embedded, dict) and "apiVersion" in embedded:
                        docs.append((f"{path.name}#{i}:{key}", embedded))
    return docs


def kuberay_validator(kind: str) -> jsonschema.Draft202012Validator:
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}.0-local-strict"
    definitions = Resource.from_contents(json.loads((root / "_definitions.json").read_text()))
    schema = json.loads((KUBERAY / "schemas" / "kuberay-v1.schema.json").read_text())
    registry = Registry().with_resources(
        [("/api/_definitions.json", definitions), (schema["$id"], Resource.from_contents(schema))]
    )
    return jsonschema.Draft202012Validator({"$ref": f"{schema['$id']}#/$defs/{kind}"}, registry=registry)


DOCS = documents()


@pytest.mark.parametrize("name,doc", DOCS, ids=[n for n, _ in DOCS])
def test_manifest_validates(name, doc):
    if doc["apiVersion"] == "ray.io/v1":
        kuberay_validator(doc["kind"]).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validators_reject_what_kubectl_would():
    rayjob = next(doc for name, doc in DOCS if name.startswith("rayjob-train"))
    typo = json.loads(json.dumps(rayjob))
    typo["spec"]["shutdownAfterJobFinish"] = True
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        kuberay_validator("RayJob").validate(typo)
    bad_pod = json.loads(json.dumps(rayjob))
    bad_pod["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(jsonschema.ValidationError, match="'resourcez' was unexpected"):  # Kubernetes' own strict PodSpec
        kuberay_validator("RayJob").validate(bad_pod)
    cron = next(doc for _, doc in DOCS if doc["kind"] == "CronJob")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**cron, "spec": {**cron["spec"], "schedul": "x"}}, KUBERNETES_VERSION, strict=True)


def test_ray_version_is_the_same_in_the_image_the_manifests_and_the_environment():
    dockerfile = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1) == ray.__version__
    for name, doc in DOCS:
        if doc["apiVersion"] != "ray.io/v1":
            continue
        cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"].get("rayClusterSpec")
        if cluster:
            assert cluster["rayVersion"] == ray.__version__, name
        text = json.dumps(doc)
        assert all(tag.endswith(f"ray{ray.__version__}") for tag in re.findall(r'"image": "[^"]*strata:([^"]+)"', text)), name


IMAGE_ROOT = "/home/ray/strata"  # where the Dockerfile puts the project


def rayjobs() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in DOCS if doc["kind"] == "RayJob"]


def clusters() -> list[tuple[str, dict]]:
    """Every Ray cluster the manifests create: the RayCluster and each RayJob's own."""
    out = [(name, doc["spec"]) for name, doc in DOCS if doc["kind"] == "RayCluster"]
    return out + [(name, doc["spec"]["rayClusterSpec"]) for name, doc in rayjobs() if "rayClusterSpec" in doc["spec"]]


def in_repo(path: str) -> Path:
    assert path.startswith(f"{IMAGE_ROOT}/"), path
    return REPO / path.removeprefix(f"{IMAGE_ROOT}/")


def test_jobs_run_files_of_the_image_and_upload_nothing():
    dockerfile = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_ROOT}" in dockerfile
    for name, doc in rayjobs():
        args = shlex.split(doc["spec"]["entrypoint"])
        assert args[0] == "python" and in_repo(args[1]).is_file(), name
        for flag, value in zip(args, args[1:], strict=False):
            if flag in ("--config", "--sweep"):
                assert in_repo(value).is_file(), f"{name}: {value}"
        assert "runtimeEnvYAML" not in doc["spec"], f"{name}: the image holds the code; nothing to upload"


def strata_store() -> str:
    env = next(doc for name, doc in DOCS if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "strata-env")
    return env["data"]["STRATA_STORE"]


def test_every_rayjob_keeps_its_state_under_the_one_shared_store():
    """The memory store, Train's storage, outputs and landing zones all under $STRATA_STORE from
    strata-env, which is not one node's disk: strata's own multi-node check passes for each."""
    from pipeline.config import load_config
    from pipeline.run.preflight import check_shared_storage, is_node_local
    from pipeline.tune import load_sweep

    store = strata_store()
    assert not is_node_local(store, [])
    for name, doc in rayjobs():
        args = shlex.split(doc["spec"]["entrypoint"])
        sets = [value for flag, value in zip(args, args[1:], strict=False) if flag == "--set"]
        for key in ("output_dir", "memory.uri", "train.storage_path"):
            value = next((s.partition("=")[2] for s in sets if s.startswith(f"{key}=")), None)
            assert value is None or value.startswith("$STRATA_STORE/"), f"{name}: {key}={value}"
        assert any(s.startswith(("train.resources_timeout_s=", "set.train.resources_timeout_s=")) for s in sets), (
            f"{name}: workers start at 0 replicas; without a resources timeout the run fails before the autoscaler acts"
        )
        expanded = [s.replace("$STRATA_STORE", store) for s in sets]
        if "--sweep" in args:
            sweep = load_sweep(in_repo(args[args.index("--sweep") + 1]), [s for s in expanded if s.startswith("output_dir=")])
            places = {"output_dir": sweep.output_dir}  # Tune's storage, every trial's outputs, checkpoints and store
        else:
            cfg = load_config(in_repo(args[args.index("--config") + 1]), [s for s in expanded if not s.startswith("trial.")])
            places = {
                "output_dir": cfg.output_dir,
                "memory.uri": cfg.memory_uri,
                "train.storage_path": cfg.train.storage_path or "",
            }
            assert cfg.memory.uri and cfg.train.storage_path, name
        if "--landing" in args:
            places["landing"] = args[args.index("--landing") + 1].replace("$STRATA_STORE", store)
        assert all(v.startswith(store + "/") for v in places.values()), f"{name}: {places}"
        check_shared_storage(places, "http://mlflow:5000", nodes=3)


def test_every_cluster_requires_the_shared_token_and_every_ray_pod_is_labelled_for_the_network_policy():
    for name, spec in clusters():
        assert spec["authOptions"] == {"mode": "token", "secretName": "strata-ray-token"}, name
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            labels = group["template"]["metadata"]["labels"]
            assert labels == {"app.kubernetes.io/name": "strata", "app.kubernetes.io/component": "ray"}, name
            for container in group["template"]["spec"]["containers"]:
                assert {"configMapRef": {"name": "strata-env"}} in container["envFrom"], name
            mounts = {m["mountPath"] for c in group["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
            assert "/dev/shm" in mounts, f"{name}: Ray's object store needs more than the 64 MiB default /dev/shm"
    for name, doc in rayjobs():
        submitter = doc["spec"]["submitterPodTemplate"]
        assert submitter["metadata"]["labels"]["app.kubernetes.io/component"] == "submitter", name
        env = {e["name"]: e for e in submitter["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "strata-ray-token", "key": "auth_token"}, name
    policies = {doc["metadata"]["name"]: doc["spec"] for _, doc in DOCS if doc["kind"] == "NetworkPolicy"}
    job_port = policies["strata-ray-job-port"]
    assert job_port["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    assert [p["port"] for rule in job_port["ingress"] for p in rule["ports"]] == [8265]
    admitted = [peer["podSelector"]["matchLabels"] for rule in job_port["ingress"] for peer in rule["from"]]
    assert {"app.kubernetes.io/name": "strata", "app.kubernetes.io/component": "submitter"} in admitted
    assert "RAY_AUTH_MODE=disabled" not in (REPO / "deploy" / "README.md").read_text()


def test_the_image_installs_locked_dependencies_before_the_code_on_a_pinned_base_as_a_non_root_user():
    lines = [
        line for line in (REPO / "deploy" / "docker" / "Dockerfile").read_text().splitlines() if line and not line.startswith("#")
    ]
    base = next(line for line in lines if line.startswith("FROM "))
    assert "@${RAY_BASE_DIGEST}" in base or "@sha256:" in base, base
    install = next(i for i, line in enumerate(lines) if "--require-hashes -r requirements.lock" in line and "pip install" in line)
    first_code = next(i for i, line in enumerate(lines) if line.startswith("COPY") and "pipeline" in line)
    assert install < first_code, "a code change must not reinstall the dependencies"
    assert not any(line.startswith("USER root") for line in lines)
    assert all("--chown=ray:users" in line for line in lines if line.startswith("COPY"))


def locked_requirements() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock as {normalised name: (version, sha256 hashes)}."""
    pins: dict[str, tuple[str, list[str]]] = {}
    text = (REPO / "requirements.lock").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement, *options = line.split()
            name, sep, version = requirement.partition("==")
            assert sep, f"requirements.lock: {line!r} is not pinned"
            hashes = [o.removeprefix("--hash=sha256:") for o in options if o.startswith("--hash=sha256:")]
            pins[re.sub(r"[-_.]+", "-", name).lower()] = (version, hashes)
    return pins


def locked_versions() -> dict[str, str]:
    return {name: version for name, (version, _) in locked_requirements().items()}


def test_every_locked_requirement_carries_the_hashes_pip_checks():
    locked = locked_requirements()
    assert {"torch", "setuptools", "mlflow"} <= set(locked)  # setuptools: torch needs it, and strata's own build uses it
    assert not [name for name, (_, hashes) in locked.items() if not hashes or any(len(h) != 64 for h in hashes)]
    makefile = (REPO / "Makefile").read_text()
    assert "pip install --quiet --require-hashes -r requirements.lock" in makefile and "-c requirements.lock" not in makefile


def test_this_environment_has_the_locked_versions_and_the_lock_pins_the_images_ray():
    """`make` installs with requirements.lock as constraints: every locked package that is
    installed here has the locked version (what the tests ran with is what a fresh clone gets)."""
    from importlib.metadata import distributions

    pins = locked_versions()
    assert pins["ray"] == ray.__version__
    dockerfile = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1) == pins["ray"]
    installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in distributions()}
    moved = {name: (pins[name], installed[name]) for name in pins if name in installed and installed[name] != pins[name]}
    assert not moved, f"installed versions differ from requirements.lock (locked, installed): {moved}"
    assert {"torch", "mlflow", "pytest", "kubernetes-validate"} <= set(pins) & set(installed)


def test_every_job_asks_for_workers_that_fit_the_largest_cluster_it_may_grow_to(tmp_path):
    from pipeline.deploy import Demand, check_manifests, largest_nodes

    paths = sorted(KUBERAY.glob("*.yaml"))
    results = {name: (demands, problem) for name, demands, problem in check_manifests(paths, REPO)}
    assert set(results) == {name for name, _ in rayjobs()}
    assert {name: problem for name, (_, problem) in results.items() if problem} == {}
    cron = "cronjob-retrain.yaml#3:rayjob.yaml"
    assert results[cron][0] == [Demand("the run's workers", 2, 0.5, 1.0)]  # configs/retrain.yaml, use_gpu=true
    cluster = next(doc for _, doc in DOCS if doc["kind"] == "RayCluster")["spec"]
    assert largest_nodes(cluster) == [{"CPU": 0.0, "GPU": 0.0}] + [{"CPU": 8.0, "GPU": 1.0}] * 4  # head runs no tasks

    # The CronJob as it first shipped: two one-GPU workers, a worker group of at most one GPU pod.
    text = (KUBERAY / "cronjob-retrain.yaml").read_text().replace("maxReplicas: 2", "maxReplicas: 1")
    (tmp_path / "cronjob-retrain.yaml").write_text(text)
    [(name, _, problem)] = check_manifests([tmp_path / "cronjob-retrain.yaml"], REPO)
    assert name == cron and problem == (
        "the run's workers: 2 x (0.5 CPU + 1 GPU) do not fit the largest cluster it may grow to (2 nodes, 8 CPUs, 1 GPUs, one worker per node slot)"
    )
    result = CliRunner().invoke(main, ["check-manifests", str(tmp_path / "cronjob-retrain.yaml"), "--repo", str(REPO)])
    assert result.exit_code == 1 and result.output == f"{cron}: {problem}\n"


def pod_specs() -> list[tuple[str, dict]]:
    """Every pod template the manifests create: Ray heads and workers, submitters, the CronJob's, MLflow's."""
    pods = []
    for name, doc in DOCS:
        spec = doc.get("spec") or {}
        if doc["kind"] == "Deployment":
            pods.append((name, spec["template"]["spec"]))
        if doc["kind"] == "CronJob":
            pods.append((name, spec["jobTemplate"]["spec"]["template"]["spec"]))
        if doc["kind"] == "RayJob":
            pods.append((f"{name} submitter", spec["submitterPodTemplate"]["spec"]))
    for name, cluster in clusters():
        pods += [
            (f"{name} {group.get('groupName', 'head')}", group["template"]["spec"])
            for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        ]
    return pods


def test_every_pod_runs_unprivileged_and_only_ray_keeps_a_writable_root():
    pods = pod_specs()
    assert len(pods) == 11  # 3 clusters x (head + GPU group), 3 submitters, the CronJob's pod, MLflow
    for name, pod in pods:
        context = pod["securityContext"]
        assert (
            context["runAsNonRoot"] is True
            and context["runAsUser"] > 0
            and context["seccompProfile"] == {"type": "RuntimeDefault"}
        ), name
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, name
            ray_image = "/strata:" in container["image"]  # Ray writes its session, logs and spills across the image
            assert sc.get("readOnlyRootFilesystem", False) is not ray_image, f"{name}: {container['name']}"


def test_mlflow_requires_a_login_that_only_a_secret_gives_and_admits_only_strata_ray_pods():
    server = next(doc for _, doc in DOCS if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "strata-mlflow")
    container = server["spec"]["template"]["spec"]["containers"][0]
    assert (
        "--app-name=basic-auth" in container["args"] and "--serve-artifacts" in container["args"]
    )  # artifacts behind the login too
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "strata-mlflow-server"
    config = next(doc for _, doc in DOCS if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "strata-mlflow-auth")
    assert (
        "default_permission = NO_PERMISSIONS" in config["data"]["basic_auth.ini"]
        and "admin_password" not in config["data"]["basic_auth.ini"]
    )
    tracking = next(doc for _, doc in DOCS if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "strata-env")["data"][
        "MLFLOW_TRACKING_URI"
    ]
    service = next(doc for _, doc in DOCS if doc["kind"] == "Service" and doc["metadata"]["name"] == "strata-mlflow")
    assert tracking == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    policy = next(doc for _, doc in DOCS if doc["kind"] == "NetworkPolicy" and doc["metadata"]["name"] == "strata-mlflow")["spec"]
    assert policy["podSelector"]["matchLabels"] == server["spec"]["selector"]["matchLabels"]
    assert [peer["podSelector"]["matchLabels"] for rule in policy["ingress"] for peer in rule["from"]] == [
        {"app.kubernetes.io/name": "strata", "app.kubernetes.io/component": "ray"}
    ]
    for name, cluster in clusters():  # every Ray pod logs to MLflow: the driver on the head, Tune trials on workers
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            ray_env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
            for key, field in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
                assert ray_env[key]["valueFrom"]["secretKeyRef"] == {"name": "strata-mlflow-credentials", "key": field}, name
    for name, pod in pod_specs():  # no credential is written into a manifest
        for container in pod["containers"]:
            literal = [
                e["name"] for e in container.get("env", []) if "value" in e and re.search(r"PASSWORD|TOKEN|SECRET|KEY", e["name"])
            ]
            assert not literal, f"{name}: {literal}"


def test_the_mlflow_image_is_pinned_and_runs_the_locked_mlflow_as_a_non_root_user():
    dockerfile = (REPO / "deploy" / "docker" / "Dockerfile.mlflow").read_text()
    assert re.search(r"^FROM \S+@\$\{PYTHON_BASE_DIGEST\}$", dockerfile, re.M)
    assert re.search(r"^ARG MLFLOW_VERSION=(\S+)$", dockerfile, re.M).group(1) == locked_versions()["mlflow"]
    assert re.search(r"^USER (\d+)$", dockerfile, re.M) and "USER root" not in dockerfile
    server = next(doc for _, doc in DOCS if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "strata-mlflow")
    assert server["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f":{locked_versions()['mlflow']}")
