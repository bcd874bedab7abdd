"""Drive KubeRay objects with the official `kubernetes` client: apply, status (and watch), logs, delete.

Every failure the user can fix becomes one FulcrumError line saying what to do: an unreachable API
server, a namespace that does not exist, KubeRay's CRDs missing (the operator is not installed), RBAC.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from trainers.errors import FulcrumError

GROUP, VERSION = "ray.io", "v1"
PLURALS = {"RayJob": "rayjobs", "RayService": "rayservices", "RayCluster": "rayclusters"}
JOB_DEPLOYMENT_DONE = {"Complete", "Failed", "ValidationFailed"}
JOB_DONE = {"SUCCEEDED", "FAILED", "STOPPED"}
INSTALL_OPERATOR = (
    "install the KubeRay operator: helm repo add kuberay https://ray-project.github.io/kuberay-helm/ && "
    "helm install kuberay-operator kuberay/kuberay-operator (docs/kubernetes.md)"
)


class K8sError(FulcrumError):
    """A Kubernetes API problem, explained."""


@dataclass
class Cluster:
    """An API client plus where it points, for messages."""

    api: client.ApiClient
    host: str

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)


def connect(kubeconfig: str | None = None, context: str | None = None) -> Cluster:
    """kubeconfig (--kubeconfig, KUBECONFIG, ~/.kube/config), or the pod's service account in-cluster."""
    try:
        if kubeconfig or context:
            api = config.new_client_from_config(config_file=kubeconfig, context=context)
        else:
            try:
                api = config.new_client_from_config()
            except config.ConfigException:
                cfg = client.Configuration()
                config.load_incluster_config(client_configuration=cfg)
                api = client.ApiClient(cfg)
    except Exception as e:  # ConfigException, a missing file or a folder, YAML errors, bad certificate data
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise K8sError(
            f"no usable Kubernetes configuration in {where} ({type(e).__name__}: {reason}); pass "
            "--kubeconfig FILE (a valid kubeconfig), set KUBECONFIG, or run in a pod with a service account"
        ) from None
    # Fail fast on an unreachable server instead of urllib3's long retry loop.
    api.configuration.retries = 0
    return Cluster(api=api, host=api.configuration.host)


def explain(
    e: Exception, cluster: Cluster, action: str, kind: str, namespace: str, name: str = ""
) -> K8sError:
    """One line for an API failure: what happened and what to do."""
    if isinstance(e, (urllib3.exceptions.HTTPError, OSError)):
        reason = getattr(e, "reason", None) or e
        return K8sError(
            f"cannot reach the Kubernetes API server at {cluster.host} ({reason}); check that the cluster "
            "is up and that --kubeconfig / KUBECONFIG / --context point at it"
        )
    if not isinstance(e, ApiException):
        return K8sError(f"{action} {kind} {name}: {e}")
    body = _body(e)
    message = body.get("message") or e.reason
    details = body.get("details") or {}
    plural = PLURALS.get(kind, kind.lower() + "s")
    if e.status == 401:
        return K8sError(
            f"the API server at {cluster.host} rejected the credentials (401 Unauthorized); "
            "refresh the token or certificate in your kubeconfig"
        )
    if e.status == 403:
        resource = f"{plural}.{GROUP}" if kind in PLURALS else plural
        return K8sError(
            f"not allowed to {action} {kind} in namespace {namespace!r} (RBAC: {message}); ask an admin for "
            f"a Role and RoleBinding granting `{action}` on {resource} there, or use another namespace "
            f"(check with: kubectl auth can-i {action} {resource} -n {namespace})"
        )
    if e.status == 404:
        if details.get("kind") == "namespaces":
            return K8sError(
                f"namespace {namespace!r} does not exist on {cluster.host}; create it "
                f"(kubectl create namespace {namespace}) or set k8s.namespace / --namespace"
            )
        if name and details.get("name") == name:
            return K8sError(
                f"no {kind} named {name!r} in namespace {namespace!r}; list them with "
                f"kubectl get {plural} -n {namespace}"
            )
        if kind in PLURALS:
            return K8sError(f"the API server has no {plural}.{GROUP}/{VERSION}: {INSTALL_OPERATOR}")
    if e.status == 409:
        return K8sError(
            f"{kind} {name!r} already exists in namespace {namespace!r}; delete it first "
            f"(fulcrum k8s delete {name} -n {namespace}) or set another k8s.name"
        )
    if e.status == 422:
        return K8sError(f"the API server refused {kind} {name!r}: {message}")
    return K8sError(f"{action} {kind} {name!r} in {namespace!r} failed ({e.status} {e.reason}): {message}")


def _body(e: ApiException) -> dict[str, Any]:
    try:
        return json.loads(e.body or "{}")
    except (TypeError, ValueError):
        return {}


def transient(e: BaseException, conflict: bool = False) -> bool:
    """Whether an API failure may pass by itself: no connection (refused, reset, timed out), 429, 5xx;
    and, with `conflict`, 409 Conflict on an update (someone else changed the object: read it again)."""
    if isinstance(e, ApiException):
        if e.status == 409:
            return conflict and _body(e).get("reason") == "Conflict"
        return e.status == 429 or 500 <= (e.status or 0) < 600
    return isinstance(e, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def _retry(what: str, fn: Callable[[], Any], conflict: bool = False) -> Any:
    from cluster.jobs import retrying

    return retrying(what, fn, is_transient=lambda e: transient(e, conflict))


def _call(
    cluster: Cluster,
    action: str,
    kind: str,
    namespace: str,
    name: str,
    fn: Callable[[], Any],
    conflict: bool = False,
) -> Any:
    try:
        return _retry(f"{action} {kind} {namespace}/{name}".rstrip("/"), fn, conflict)
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
        raise explain(e, cluster, action, kind, namespace, name) from None


def require_crd(cluster: Cluster, kind: str) -> None:
    """KubeRay's CRDs must be installed (discovery lists the resource) before anything is created."""
    plural = PLURALS[kind]
    try:
        resources = _retry("discover ray.io/v1", lambda: cluster.custom.get_api_resources(GROUP, VERSION))
    except ApiException as e:
        if e.status == 404:
            raise K8sError(
                f"the API server has no {GROUP}/{VERSION} API (KubeRay CRDs missing): {INSTALL_OPERATOR}"
            ) from None
        raise explain(e, cluster, "list", "API resources", "-") from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise explain(e, cluster, "list", "API resources", "-") from None
    if plural not in {r.name for r in resources.resources}:
        raise K8sError(f"the API server has no {plural}.{GROUP}/{VERSION}: {INSTALL_OPERATOR}")


# --------------------------------------------------------------------------- apply / delete
def apply(cluster: Cluster, manifests: list[dict[str, Any]], dry_run: bool = False) -> list[str]:
    """Create the ConfigMap and the RayJob (or create/update the RayService); returns what was done.
    A RayJob whose name is taken is refused before anything is written, so a running job's objects are
    never touched (its spec ConfigMap is named after its content, too)."""
    done: list[str] = []
    ray_objects = [m for m in manifests if m["apiVersion"].startswith(GROUP)]
    for obj in ray_objects:
        require_crd(cluster, obj["kind"])
        if obj["kind"] == "RayJob":
            _refuse_taken(cluster, obj)
    extra = {"dry_run": "All"} if dry_run else {}
    created_maps: list[dict[str, Any]] = []
    for obj in manifests:
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        if kind == "ConfigMap":
            state = _apply_configmap(cluster, obj, extra)
            created_maps.append(obj)
            done.append(f"configmap/{name}{'' if state == 'created' else ' unchanged'}")
            continue
        plural = PLURALS[kind]
        custom = cluster.custom
        try:
            created = _retry(
                f"create {kind} {ns}/{name}",
                lambda c=custom, ns=ns, p=plural, o=obj: c.create_namespaced_custom_object(
                    GROUP, VERSION, ns, p, o, **extra
                ),
            )
            done.append(f"{plural}.{GROUP}/{name} created")
        except ApiException as e:
            if e.status == 409 and kind == "RayService":  # serving: an apply updates the running service
                created = _replace(cluster, obj, extra)
                done.append(f"{plural}.{GROUP}/{name} updated")
            else:
                raise explain(e, cluster, "create", kind, ns, name) from None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise explain(e, cluster, "create", kind, ns, name) from None
        if not dry_run:
            _own(cluster, created_maps, created)
    return done


def _refuse_taken(cluster: Cluster, obj: dict[str, Any]) -> None:
    kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    custom = cluster.custom
    try:
        _retry(
            f"get {kind} {ns}/{name}",
            lambda: custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURALS[kind], name),
        )
    except ApiException as e:
        if e.status == 404 and _body(e).get("details", {}).get("name") == name:
            return  # free
        raise explain(e, cluster, "get", kind, ns, name) from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise explain(e, cluster, "get", kind, ns, name) from None
    raise K8sError(
        f"{kind} {name!r} already exists in namespace {ns!r}; nothing was changed. Delete it first "
        f"(fulcrum k8s delete {name} -n {ns}) or set another k8s.name"
    )


def _replace(cluster: Cluster, obj: dict[str, Any], extra: dict[str, str]) -> dict[str, Any]:
    """Update to `obj`, on the current resourceVersion; a 409 Conflict (changed meanwhile) reads again."""
    kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    plural = PLURALS[kind]
    custom = cluster.custom

    def once() -> dict[str, Any]:
        current = custom.get_namespaced_custom_object(GROUP, VERSION, ns, plural, name)
        body = {
            **obj,
            "metadata": {**obj["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]},
        }
        return custom.replace_namespaced_custom_object(GROUP, VERSION, ns, plural, name, body, **extra)

    return _call(cluster, "update", kind, ns, name, once, conflict=True)


def _apply_configmap(cluster: Cluster, obj: dict[str, Any], extra: dict[str, str]) -> str:
    """Create it; one that exists has the same name, hence the same content: leave it as it is."""
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    core = cluster.core
    try:
        _retry(f"create ConfigMap {ns}/{name}", lambda: core.create_namespaced_config_map(ns, obj, **extra))
        return "created"
    except ApiException as e:
        if e.status == 409:
            return "unchanged"
        raise explain(e, cluster, "create", "ConfigMap", ns, name) from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise explain(e, cluster, "create", "ConfigMap", ns, name) from None


def _own(cluster: Cluster, maps: list[dict[str, Any]], owner: dict[str, Any]) -> None:
    """The spec ConfigMap belongs to its RayJob, so Kubernetes' garbage collector deletes it with the job."""
    ref = {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
    }
    for m in maps:
        ns, name = m["metadata"]["namespace"], m["metadata"]["name"]
        _call(
            cluster, "patch", "ConfigMap", ns, name,
            lambda ns=ns, name=name: cluster.core.patch_namespaced_config_map(
                name, ns, {"metadata": {"ownerReferences": [ref]}}
            ),
        )  # fmt: skip


def delete(cluster: Cluster, kind: str, namespace: str, name: str) -> list[str]:
    plural = PLURALS[kind]
    require_crd(cluster, kind)
    obj = get(cluster, kind, namespace, name)
    _call(
        cluster, "delete", kind, namespace, name,
        lambda: cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name),
    )  # fmt: skip
    done = [f"{plural}.{GROUP}/{name} deleted"]
    # Its spec ConfigMaps; the garbage collector would get them too, but not every cluster runs one.
    for cm in spec_configmaps(obj):
        try:
            _retry(
                f"delete ConfigMap {namespace}/{cm}",
                lambda cm=cm: cluster.core.delete_namespaced_config_map(cm, namespace),
            )
            done.append(f"configmap/{cm} deleted")
        except ApiException as e:
            if e.status != 404:
                raise explain(e, cluster, "delete", "ConfigMap", namespace, cm) from None
    return done


def spec_configmaps(obj: dict[str, Any]) -> list[str]:
    """Names of the ConfigMaps the object's pods mount (the job's spec)."""
    spec = obj.get("spec") or {}
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or {}
    groups = [cluster.get("headGroupSpec") or {}, *(cluster.get("workerGroupSpecs") or [])]
    names: list[str] = []
    for group in groups:
        for volume in ((group.get("template") or {}).get("spec") or {}).get("volumes") or []:
            cm = (volume.get("configMap") or {}).get("name")
            if cm and cm not in names:
                names.append(cm)
    return names


# --------------------------------------------------------------------------- status / watch
def get(cluster: Cluster, kind: str, namespace: str, name: str) -> dict[str, Any]:
    require_crd(cluster, kind)
    return _call(
        cluster, "get", kind, namespace, name,
        lambda: cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name),
    )  # fmt: skip


def summary(kind: str, obj: dict[str, Any]) -> dict[str, str]:
    """The status fields a user follows, as strings ('' when not set yet)."""
    status = obj.get("status") or {}
    if kind == "RayJob":
        keys = (
            "jobDeploymentStatus",
            "jobStatus",
            "reason",
            "message",
            "jobId",
            "dashboardURL",
            "rayClusterName",
        )
        return {k: str(status.get(k) or "") for k in keys}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    return {
        "serviceStatus": str(status.get("serviceStatus") or ""),
        "ready": str(ready.get("status") or ""),
        "reason": str(ready.get("reason") or ""),
        "message": str(ready.get("message") or ""),
        "numServeEndpoints": str(status.get("numServeEndpoints") or ""),
    }


def finished(kind: str, state: dict[str, str]) -> bool | None:
    """None while running; True when it ended well (RayJob SUCCEEDED, RayService Ready); False on failure."""
    if kind == "RayJob":
        # Only the deployment status is final: a FAILED jobStatus may still be retried (backoffLimit).
        if state["jobDeploymentStatus"] in JOB_DEPLOYMENT_DONE:
            return state["jobDeploymentStatus"] == "Complete" and state["jobStatus"] in ("SUCCEEDED", "")
        return None
    if state["ready"] == "True":
        return True
    return None


def watch_states(
    cluster: Cluster, kind: str, namespace: str, name: str, timeout_s: float | None = None
) -> Iterator[dict[str, str]]:
    """Yield the status summary each time it changes, until it is terminal (or the object is deleted)."""
    obj = get(cluster, kind, namespace, name)
    state = summary(kind, obj)
    yield state
    if finished(kind, state) is not None:
        return
    version = obj["metadata"]["resourceVersion"]
    deadline = time.monotonic() + timeout_s if timeout_s else None
    plural = PLURALS[kind]
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise K8sError(f"{kind} {name} still not finished after {timeout_s:g} s (last: {_line(state)})")
        w = watch.Watch()
        server_timeout = int(min(remaining, 60)) + 1 if remaining is not None else 60
        try:
            for event in w.stream(
                cluster.custom.list_namespaced_custom_object,
                GROUP, VERSION, namespace, plural,
                field_selector=f"metadata.name={name}",
                resource_version=version,
                timeout_seconds=server_timeout,
            ):  # fmt: skip
                obj = event["object"]
                if event["type"] == "ERROR":  # e.g. 410 Gone: the version is too old; start over from now
                    obj = get(cluster, kind, namespace, name)
                version = obj["metadata"]["resourceVersion"]
                if event["type"] == "DELETED":
                    raise K8sError(f"{kind} {name} was deleted while being watched (last: {_line(state)})")
                new = summary(kind, obj)
                if new != state:
                    state = new
                    yield state
                    if finished(kind, state) is not None:
                        w.stop()
                        return
        except ApiException as e:
            if e.status != 410:
                raise explain(e, cluster, "watch", kind, namespace, name) from None
            # 410 Gone: our resourceVersion is too old to resume from; start over from the current object
            obj = get(cluster, kind, namespace, name)
            version = obj["metadata"]["resourceVersion"]
            if summary(kind, obj) != state:
                state = summary(kind, obj)
                yield state
                if finished(kind, state) is not None:
                    return
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise explain(e, cluster, "watch", kind, namespace, name) from None


def _line(state: dict[str, str]) -> str:
    return (
        ", ".join(f"{k}={v}" for k, v in state.items() if v and k not in ("dashboardURL",)) or "no status yet"
    )


def describe(state: dict[str, str]) -> str:
    return _line(state)
