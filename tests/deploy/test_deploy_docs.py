"""docs/install-talos.md: the Flux example, applied to the base the way kustomize-controller does, renders
what the page promises (image, config and node selection replaced; the rollout-triggering name change).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from agent.config import parse_config

from .conftest import BASE, REPO, Obj, kustomize, only

DOC = REPO / "docs/install-talos.md"


def yaml_blocks() -> list[list[Obj]]:
    return [[d for d in yaml.safe_load_all(block) if d]
            for block in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)]


def flux_objects() -> list[Obj]:
    (block,) = [b for b in yaml_blocks() if any(o.get("kind") == "GitRepository" for o in b)]
    return block


def test_flux_kustomization_points_at_the_base() -> None:
    objs = flux_objects()
    source = only(objs, "GitRepository")
    flux = only(objs, "Kustomization")
    assert flux["apiVersion"] == "kustomize.toolkit.fluxcd.io/v1"
    assert flux["spec"]["sourceRef"] == {"kind": "GitRepository", "name": source["metadata"]["name"]}
    assert (REPO / flux["spec"]["path"]).resolve() == BASE
    assert flux["spec"]["prune"] is True


def test_flux_images_and_patches_render_as_documented(tmp_path: Path, base: list[Obj]) -> None:
    spec = only(flux_objects(), "Kustomization")["spec"]
    shutil.copytree(BASE, tmp_path / "base", ignore=shutil.ignore_patterns("examples"))
    overlay = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
               "resources": ["base"], "images": spec["images"], "patches": spec["patches"]}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    rendered = kustomize(tmp_path)

    pod = only(rendered, "DaemonSet")["spec"]["template"]["spec"]
    (image,) = spec["images"]
    assert pod["containers"][0]["image"] == f"{image['newName']}:{image['newTag']}"
    required = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    terms = required["nodeSelectorTerms"]
    assert [e["key"] for t in terms for e in t["matchExpressions"]] == ["example.com/cx7"]

    (cm,) = [o for o in rendered if o["kind"] == "ConfigMap" and "config.yaml" in o["data"]]
    config = parse_config(cm["data"]["config.yaml"])
    assert config.resources[0].pfs[0].num_vfs == 8
    (base_cm,) = [o for o in base if o["kind"] == "ConfigMap" and "config.yaml" in o["data"]]
    assert cm["metadata"]["name"] != base_cm["metadata"]["name"], "a new config must roll the DaemonSet"
    assert {"name": "config", "configMap": {"name": cm["metadata"]["name"]}} in pod["volumes"]


def test_talos_machine_config_loads_the_rdma_modules() -> None:
    module_lists = [[m["name"] for m in o["machine"]["kernel"]["modules"]]
                    for block in yaml_blocks() for o in block if "machine" in o]
    assert module_lists, "the page shows the machine.kernel.modules patch"
    for modules in module_lists:
        assert {"ib_uverbs", "rdma_ucm", "ib_umad", "mlx5_ib"} <= set(modules)
    exclusive = [m for m in module_lists if "ib_core" in m]
    assert exclusive and all(m[0] == "ib_core" for m in exclusive), "ib_core first, so its parameter applies"


def test_documented_patch_drops_the_vmpodscrape_for_clusters_without_the_operator(tmp_path: Path) -> None:
    (inline,) = re.findall(r"`(\{target: \{kind: VMPodScrape.*?\})`", DOC.read_text())
    shutil.copytree(BASE, tmp_path / "base", ignore=shutil.ignore_patterns("examples"))
    overlay = {"resources": ["base"], "patches": [yaml.safe_load(inline)]}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    kinds = {o["kind"] for o in kustomize(tmp_path)}
    assert "VMPodScrape" not in kinds
    assert {"ConfigMap", "DaemonSet", "Namespace", "ServiceAccount"} <= kinds
