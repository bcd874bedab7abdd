"""cluster/placement.py: what a cluster can see, how workers pack into pods (one rule for the CLI and the
chart), and the multi-node path check that `fulcrum train --address` and `fulcrum tune` run."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.placement import check_cluster_paths, pack, place_spec
from cluster.workload import load_workload
from tests.helpers import tiny_spec, write_spec
from trainers.errors import SpecError
from trainers.spec import load_spec


@pytest.mark.parametrize(
    ("ranks", "gpr", "node", "pod_gpus", "spread", "expect"),
    [
        (8, 1.0, 8, None, False, (1, 8, 8)),  # one pod holds the node's 8 GPUs
        (8, 1.0, 8, 8, False, (1, 8, 8)),  # k8s.worker.gpus: 8 -> 8 GPUs in all, not 64
        (8, 1.0, 8, 1, False, (8, 1, 1)),  # asked for one-GPU pods
        (12, 1.0, 8, None, False, (2, 6, 6)),  # balanced
        (3, 4.0, 8, None, False, (2, 2, 8)),
        (4, 0.5, 8, None, False, (1, 4, 2)),  # 4 half-GPU trials on 2 GPUs
        (6, 0.25, 8, None, False, (1, 6, 2)),
        (3, 0.0, 8, None, False, (3, 1, 0)),  # CPU pods
        (3, 1.0, 8, None, True, (3, 1, 1)),  # serving: a replica per pod
        (4, 0.5, 8, None, True, (2, 2, 1)),  # serving: half-GPU replicas share a GPU
    ],
)
def test_pack(
    ranks: int, gpr: float, node: int, pod_gpus: int | None, spread: bool, expect: tuple[int, int, int]
) -> None:
    p = pack(
        ranks=ranks, gpus_per_rank=gpr, cpus_per_rank=2, gpus_per_node=node, pod_gpus=pod_gpus, spread=spread
    )
    assert (p.replicas, p.ranks_per_pod, p.gpus_per_pod) == expect
    assert p.replicas * p.ranks_per_pod >= ranks
    assert p.gpus_per_pod >= p.ranks_per_pod * gpr - 1e-9  # every rank gets its share
    assert (p.cpu, p.memory) == (str(2 * p.ranks_per_pod + 1), f"{16 * p.ranks_per_pod}Gi")
    assert p.group == ("gpu-workers" if gpr else "cpu-workers")


def test_pack_refuses_pods_smaller_than_a_worker() -> None:
    with pytest.raises(ValueError, match=r"k8s\.worker\.gpus 1 is less than one worker.s 2 GPUs"):
        pack(ranks=2, gpus_per_rank=2, cpus_per_rank=1, gpus_per_node=8, pod_gpus=1)


def test_check_cluster_paths(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, tiny_spec(tmp_path, output=str(tmp_path / "runs" / "x"))))
    check_cluster_paths(spec, nodes=1)  # one node: its disk is the cluster's
    with pytest.raises(SpecError) as e:
        check_cluster_paths(spec, nodes=3)
    message = str(e.value)
    assert message.count("\n") == 0
    assert message.startswith(f"{tmp_path / 'spec.yaml'}:")
    assert f"output: {tmp_path / 'runs' / 'x'} is a local path, but the Ray cluster has 3 nodes" in message
    assert "URI (s3://bucket/...)" in message and "declared as storage.mount_path" in message

    shared = tiny_spec(tmp_path, output=str(tmp_path / "runs" / "x"), storage={"mount_path": str(tmp_path)})
    spec = load_spec(write_spec(tmp_path, shared))
    check_cluster_paths(spec, nodes=3, resume=str(tmp_path / "runs" / "x"))
    with pytest.raises(
        SpecError, match=r"^--resume /home/me/run: .* under storage.mount_path \(" + str(tmp_path)
    ):
        check_cluster_paths(spec, nodes=3, resume="/home/me/run")
    check_cluster_paths(spec, nodes=3, resume="s3://bucket/runs/x")

    # a local base model must be shared too; data is read by the driver, so it may stay local
    base = tmp_path / "models" / "tiny"
    base.mkdir(parents=True)
    local_base = tiny_spec(tmp_path, output="s3://b/r")
    local_base["model"] = {"base": str(base), "tokenizer": "bytes"}
    spec = load_spec(write_spec(tmp_path, local_base))
    with pytest.raises(
        SpecError, match=r"model.base: .*models/tiny is a local path, but the Ray cluster has 2"
    ):
        check_cluster_paths(spec, nodes=2)


def test_kubernetes_placement_ships_small_data_and_shares_output(tmp_path: Path) -> None:
    spec = tiny_spec(
        tmp_path,
        output="runs/x",
        data={"eval": "/fulcrum/data/eval.jsonl"},
        k8s={"storage": {"pvc": "runs", "mount_path": "/fulcrum"}},
    )
    workload = load_workload(write_spec(tmp_path, spec), cluster_prefixes=("/fulcrum",))
    placed = place_spec(workload, "k8s", mounts=("/fulcrum",), ship_prefix="/etc/fulcrum/")
    assert placed.data["data"]["train"] == "/etc/fulcrum/train-train.jsonl"
    assert placed.ship == {"train-train.jsonl": tmp_path / "train.jsonl"}
    assert placed.data["data"]["eval"] == "/fulcrum/data/eval.jsonl"  # on the volume: as written
    assert placed.data["output"] == "/fulcrum/runs/x"
    assert placed.data["storage"] == {"mount_path": "/fulcrum"} and "k8s" not in placed.data
    # the spec the pods run passes the run's own multi-node check
    on_cluster = load_workload(
        write_spec(tmp_path, placed.data, name="c.yaml"), cluster_prefixes=("/etc/fulcrum", "/fulcrum")
    )
    assert on_cluster.spec is not None and on_cluster.spec.output == "/fulcrum/runs/x"
    check_cluster_paths(on_cluster.spec, nodes=4)
