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
from referencing import Registry, Resource

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
    registry = Registry().with_resources([("/api/_definitions.json", definitions), (schema["$id"], Resource.from_contents(schema))])
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


def test_jobs_run_files_that_exist():
    for name, doc in DOCS:
        entrypoint = doc.get("spec", {}).get("entrypoint")
        if not entrypoint:
            continue
        args = shlex.split(entrypoint)
        assert args[0] == "python" and (REPO / args[1]).is_file(), name
        for flag, value in zip(args, args[1:], strict=False):
            if flag in ("--config", "--sweep"):
                assert (REPO / value).is_file(), f"{name}: {value}"
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert env["working_dir"] == "/home/ray/strata"
    assert "WORKDIR /home/ray/strata" in (REPO / "deploy" / "docker" / "Dockerfile").read_text()
