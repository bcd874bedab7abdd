"""The cluster in a box (tests/box.py) is what the multi-node tests stand on: three Ray nodes that tasks can
be pinned to, an S3 server that pyarrow and Ray's workers reach, and a Jobs API that accepts work. All of it
is driven from subprocesses: this process may be connected to the session's single-node Ray."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

from tests.box import ClusterBox

PINNED = """
import json, ray
ray.init()  # RAY_ADDRESS: the box

@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()

a = ray.get(where.options(resources={"node_a": 1}).remote())
b = ray.get(where.options(resources={"node_b": 1}).remote())
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
print("RESULT", json.dumps({"a": a, "b": b, "nodes": nodes}))
"""


def _result(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON a script printed after "RESULT "; its output in the message when it failed."""
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def test_tasks_pinned_by_resource_run_on_different_nodes(cluster_box: ClusterBox) -> None:
    got = _result(cluster_box.python(PINNED))
    nodes = got["nodes"]
    assert len(nodes) == 3
    assert got["a"] != got["b"]
    assert nodes[got["a"]].get("node_a") == 1 and "node_b" not in nodes[got["a"]]
    assert nodes[got["b"]].get("node_b") == 1 and "node_a" not in nodes[got["b"]]
    # The head takes no work: only the two worker nodes have CPUs.
    assert sorted(r.get("CPU", 0) for r in nodes.values()) == [0, 2, 2]
    assert cluster_box.node_resources == ["node_a", "node_b"]


S3_ROUND_TRIP = """
import json, os, sys, ray
from pyarrow import fs

endpoint, key = sys.argv[1], sys.argv[2]
assert not any(k.startswith("AWS_") for k in os.environ), "the driver must not hand its env to the workers"
s3 = fs.S3FileSystem(endpoint_override=endpoint, access_key="box", secret_key="box", region="us-east-1")
with s3.open_output_stream(key) as out:
    out.write(b"written by the driver")

ray.init()

@ray.remote(num_cpus=1, resources={"node_b": 1})
def read(key):
    # Only the node's own environment (what `ray start` got) tells this worker where S3 is.
    worker = fs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"])
    with worker.open_input_stream(key) as f:
        data = f.read().decode()
    with worker.open_output_stream(key + ".reply") as out:
        out.write(b"written on node_b")
    return {"data": data, "node": ray.get_runtime_context().get_node_id(),
            "region": os.environ.get("AWS_DEFAULT_REGION")}

got = ray.get(read.remote(key))
got["nodes"] = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
print("RESULT", json.dumps(got))
"""


def test_s3_server_round_trip_and_workers_reach_it(cluster_box: ClusterBox) -> None:
    s3 = cluster_box.fs()
    key = cluster_box.uri(f"smoke/{uuid.uuid4().hex[:6]}/hello.txt").removeprefix("s3://")
    with s3.open_output_stream(key) as out:
        out.write(b"hello box")
    with s3.open_input_stream(key) as f:
        assert f.read() == b"hello box"
    assert s3.get_file_info(key).size == len(b"hello box")

    driver_env = {k: v for k, v in cluster_box.env.items() if not k.startswith("AWS_")}
    other = key.replace("hello.txt", "from-driver.txt")
    got = _result(cluster_box.python(S3_ROUND_TRIP, cluster_box.s3_endpoint, other, env=driver_env))
    assert got["data"] == "written by the driver"
    assert got["region"] == "us-east-1"
    assert "node_b" in got["nodes"][got["node"]]
    with s3.open_input_stream(other + ".reply") as f:  # and what the worker wrote, this process reads
        assert f.read() == b"written on node_b"


JOB = """
import json, sys, time
from ray.job_submission import JobSubmissionClient, JobStatus

client = JobSubmissionClient(sys.argv[1])
job = client.submit_job(entrypoint="python -c 'print(6 * 7)'", submission_id=sys.argv[2])
deadline = time.monotonic() + 240
while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    assert time.monotonic() < deadline, "the job did not finish"
    time.sleep(0.5)
status = str(client.get_job_status(job).value)
print("RESULT", json.dumps({"status": status, "logs": client.get_job_logs(job)}))
"""


def test_ray_jobs_submission_runs(cluster_box: ClusterBox) -> None:
    job_id = f"box-smoke-{uuid.uuid4().hex[:6]}"
    got = _result(cluster_box.python(JOB, cluster_box.dashboard, job_id))
    assert got["status"] == "SUCCEEDED", got["logs"][-2000:]
    assert "42" in got["logs"].split()
    # The same job seen through `fulcrum`, run with the box's env.
    done = cluster_box.run(["jobs", "status", job_id, "--address", cluster_box.dashboard])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.startswith(f"{job_id}: SUCCEEDED")
