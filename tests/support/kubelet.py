"""A kubelet for tests: the pods of kmock's emulated Deployments and StatefulSets run as local
processes.

``Kubelet`` polls the Deployments and StatefulSets of one namespace in the emulator and does
what their controllers and a node's kubelet do together: it keeps ``spec.replicas`` pods of the
current pod template (a new template replaces every pod: Recreate, not a rolling update; a
StatefulSet's pods are ``<name>-<ordinal>``, started in parallel, each with a folder per
``volumeClaimTemplates`` entry that outlives the pod, as a claim does), runs each pod's
one container as the manifest says (the image's entrypoint and the container's ``command`` and
``args``; ``env`` with values, ``fieldRef`` metadata.name/namespace and ``secretKeyRef`` and
``configMapKeyRef`` read from the emulator; ``emptyDir``, Secret and ConfigMap volumes written
with their modes and ``fsGroup`` ownership and mounted at their ``mountPath`` in a mount
namespace of the pod's own, read-only where the mount says so), polls the readiness and liveness
probes (``httpGet``) at the manifest's periods and thresholds, sets the pod's hostname to its
name (a UTS namespace), restarts a container that exited
or failed its liveness probe, writes ``status.replicas``/``readyReplicas`` back to the
Deployment, and stops pods (SIGTERM, then SIGKILL after ``terminationGracePeriodSeconds``) when
the replicas drop or the Deployment is deleted.

What differs from a real kubelet, each on purpose:

* All pods share this machine's network: each ``containerPort`` is mapped to a free loopback
  port, and env values naming the port (the number itself, or a URL's ``:port``) are rewritten to
  the mapped one, since the workloads bind the port their environment names.
* The processes run as the current user, not ``runAsUser``: this machine's Python lives under
  /root, which uid 10001 cannot traverse. What the pod's user may read is checked separately,
  in the pod's mount namespace with its uid, gid and ``fsGroup`` (``read_as_pod_user``), and with
  ``run_as_pod_user`` (a fork with the pod's identity).
* The root filesystem is not made read-only, and an image is a local command (``Image``: the
  Dockerfile's ENTRYPOINT, CMD and ENV, with the source tree on PYTHONPATH).
* A pod that mounts its service account token (``automountServiceAccountToken`` not false) gets
  a kubeconfig for the emulator instead (mounted, named by ``KUBECONFIG``): in-cluster login
  needs HTTPS and the API server's CA.
* A mount point missing on this machine is made on a tmpfs over its nearest existing ancestor
  (in the pod's namespace only), since creating it would change the host's filesystem.

``mount_secret`` and ``run_as_pod_user`` are the pieces a unit test uses without processes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from qtrader.local.nats_server import free_port

WORKLOAD_PLURALS = ("deployments", "statefulsets")
POLL_S = 0.5  # how often the Deployments are read (a watch would be quicker; polling is enough)
GRACE_S = 30  # terminationGracePeriodSeconds when the pod spec sets none
BACKOFF_S = (1.0, 2.0, 5.0, 10.0)  # before restarting an exited container (CrashLoopBackOff)
# The API server's default mode of Secret and ConfigMap volume files, and the mask the kubelet
# adds to files it gives the pod's fsGroup (SetVolumeOwnership: group read on read-only volumes).
DEFAULT_VOLUME_MODE = 0o644
FS_GROUP_READ = 0o440
KUBECONFIG_DIR = "/var/run/secrets/kubelet-test"  # see the module's doc


@dataclass(frozen=True)
class Image:
    """What a container runtime knows of an image: the Dockerfile's ENTRYPOINT, CMD and ENV."""

    entrypoint: Sequence[str]
    cmd: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    # The image's own files, here host folders (the interpreter's, the source tree): a pod's
    # mount over one of their ancestors (an emptyDir at /tmp, where a checkout may live) must
    # not hide them, as a volume never hides an image's /usr.
    host_paths: Sequence[Path] = ()


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool


@dataclass
class Probe:
    """One container probe (``httpGet`` only) and its count of consecutive results."""

    spec: Mapping[str, Any]
    next_at: float
    failures: int = 0
    successes: int = 0

    def setting(self, name: str, default: int) -> int:
        return int(self.spec.get(name, default))

    def record(self, ok: bool) -> None:
        self.successes, self.failures = (self.successes + 1, 0) if ok else (0, self.failures + 1)
        self.next_at = time.monotonic() + self.setting("periodSeconds", 10)


@dataclass
class Pod:
    name: str
    workload: str  # the Deployment's or StatefulSet's name
    template_hash: str
    template: Mapping[str, Any]
    ports: dict[str, int]  # container port (number or name) -> the loopback port it is on
    root: Path  # the pod's volumes and its log
    env: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready: bool = False
    restarts: int = 0
    restart_at: float | None = None  # when an exited container is started again
    readiness: Probe | None = None
    liveness: Probe | None = None

    @property
    def spec(self) -> Mapping[str, Any]:
        spec: Mapping[str, Any] = self.template["spec"]
        return spec

    @property
    def container(self) -> Mapping[str, Any]:
        (container,) = self.spec["containers"]  # one container per pod, as every pod here
        return dict(container)

    @property
    def labels(self) -> Mapping[str, str]:
        labels: Mapping[str, str] = self.template.get("metadata", {}).get("labels", {})
        return labels

    @property
    def log_path(self) -> Path:
        return self.root / "container.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def port(self, name_or_number: str | int) -> int:
        """The loopback port a container port (by name or number) is reachable on."""
        return self.ports[str(name_or_number)]


class Kubelet:
    """Runs the pods of the emulator's Deployments in ``namespace`` (see the module's doc)."""

    def __init__(
        self,
        *,
        api_url: str,
        namespace: str,
        images: Mapping[str, Image],
        root: Path,
        poll_s: float = POLL_S,
    ) -> None:
        self._api = httpx.AsyncClient(base_url=api_url, timeout=5)
        self._api_url = api_url
        self.namespace = namespace
        self._images = images
        self._root = root
        self._poll_s = poll_s
        self.pods: dict[str, Pod] = {}
        self.stopped: list[Pod] = []  # every pod stopped, for their logs
        self.problems: dict[str, str] = {}  # a Deployment (or "api") -> why it did not progress
        self._task: asyncio.Task[None] | None = None
        root.mkdir(parents=True, exist_ok=True)
        # Where a pod's namespace parks the image's folders while its volumes go over them: a
        # place no pod mounts over (checked per pod).
        self._stage = Path(tempfile.mkdtemp(prefix="kubelet-image-", dir="/dev/shm"))

    # --- running --------------------------------------------------------------------------

    async def __aenter__(self) -> Kubelet:
        self._task = asyncio.create_task(self._run(), name="kubelet")
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop reconciling and stop every pod."""
        await self.drain()
        await self._api.aclose()
        shutil.rmtree(self._stage, ignore_errors=True)  # the pods' namespaces are gone

    async def drain(self, *groups: Callable[[Pod], bool]) -> None:
        """Stop reconciling (a node being drained), then stop the pods of each group in turn;
        without groups every pod. The other pods run on until the next ``drain``."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for group in groups or (lambda _: True,):
            await self._stop_all([p for p in self.pods.values() if group(p)])

    def pods_of(self, deployment: str) -> list[Pod]:
        return [p for p in self.pods.values() if p.workload == deployment]

    def gone(self, deployment: str) -> bool:
        """No pod of the Deployment is left, running or terminating."""
        stopped = [p for p in self.stopped if p.workload == deployment]
        return not self.pods_of(deployment) and not any(p.running for p in stopped)

    def logs(self, deployment: str) -> str:
        """The logs of the Deployment's pods, running and stopped (for a failure's message)."""
        pods = [p for p in [*self.stopped, *self.pods.values()] if p.workload == deployment]
        return "\n".join(f"--- {p.name}\n{p.log()[-3000:]}" for p in pods)

    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
            except httpx.HTTPError as exc:  # the emulator did not answer: try again, as a kubelet
                self.problems["api"] = repr(exc)
            await asyncio.sleep(self._poll_s)

    async def _tick(self) -> None:
        workloads = {
            name: (plural, workload)
            for plural in WORKLOAD_PLURALS
            for name, workload in (await self._workloads(plural)).items()
        }
        await self._stop_all([p for p in self.pods.values() if p.workload not in workloads])
        for plural, workload in workloads.values():
            await self._reconcile(plural, workload)
        await asyncio.gather(*(self._probe(pod) for pod in list(self.pods.values())))
        for plural, workload in workloads.values():
            await self._report(plural, workload)

    async def _workloads(self, plural: str) -> dict[str, dict[str, Any]]:
        response = await self._api.get(f"/apis/apps/v1/namespaces/{self.namespace}/{plural}")
        response.raise_for_status()
        items: list[dict[str, Any]] = response.json()["items"]
        return {d["metadata"]["name"]: d for d in items if not _terminating(d)}

    async def delete_pod(self, name: str) -> None:
        """``kubectl delete pod`` (or an eviction): SIGTERM, and its controller makes another,
        a StatefulSet's under the same name with the same claims."""
        await self._stop(self.pods[name])

    # --- the Deployment and StatefulSet controllers' part ----------------------------------

    async def _reconcile(self, plural: str, workload: Mapping[str, Any]) -> None:
        name = workload["metadata"]["name"]
        template = workload["spec"]["template"]
        current = template_hash(template)
        await self._stop_all([p for p in self.pods_of(name) if p.template_hash != current])
        pods = self.pods_of(name)
        for pod in pods:
            self._restart_if_exited(pod)
        wanted = int(workload["spec"].get("replicas", 1))
        if plural == "statefulsets":
            await self._reconcile_ordinals(name, workload, current, wanted)
            return
        if len(pods) > wanted:
            # As the ReplicaSet controller chooses: pods not ready first, then the youngest.
            victims = sorted(pods, key=lambda p: (p.ready, -p.started_at))[: len(pods) - wanted]
            await self._stop_all(victims)
        for _ in range(wanted - len(pods)):
            await self._start(name, template, current, f"{current}-{secrets.token_hex(3)[:5]}")

    async def _reconcile_ordinals(
        self, name: str, workload: Mapping[str, Any], hashed: str, wanted: int
    ) -> None:
        """A StatefulSet's pods are ``<name>-<ordinal>``, 0 to replicas-1 (all at once: the
        Parallel policy), each with its claims from ``volumeClaimTemplates``."""
        pods = {p.name: p for p in self.pods_of(name)}
        wanted_names = [f"{name}-{ordinal}" for ordinal in range(wanted)]
        await self._stop_all([p for n, p in pods.items() if n not in wanted_names])
        claims = [c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])]
        for pod_name in wanted_names:
            if pod_name not in pods and not self._terminating(pod_name):
                ordinal = pod_name.rsplit("-", 1)[1]
                await self._start(
                    name, workload["spec"]["template"], hashed, ordinal, claims=claims
                )

    def _terminating(self, pod_name: str) -> bool:
        """A StatefulSet makes a pod again only once the one of its name has ended."""
        return any(p.name == pod_name and p.running for p in self.stopped)

    async def _start(
        self,
        workload: str,
        template: Mapping[str, Any],
        hashed: str,
        suffix: str,
        *,
        claims: Sequence[str] = (),
    ) -> None:
        name = f"{workload}-{suffix}"
        (container,) = template["spec"]["containers"]
        # A pod name can come back (a StatefulSet's): its own volumes start afresh, its claims
        # do not.
        root = self._root / "pods" / f"{name}-{secrets.token_hex(4)}"
        pod = Pod(name, workload, hashed, template, _map_ports(container), root)
        try:
            make_directory(root, 0o755)  # the pod's user traverses it to its volumes
            pod.mounts = await self._volumes(pod, self._claims(name, claims))
            pod.env = await self._environment(pod)
            self._spawn(pod)
        except (LookupError, ValueError, OSError, httpx.HTTPError) as exc:
            # A real pod would wait in ContainerCreating; this one is tried again next round.
            self.problems[workload] = f"{name}: {exc!r}"
            return
        self.problems.pop(workload, None)
        self.pods[name] = pod

    def claim_path(self, claim: str, pod_name: str) -> Path:
        """Where the volume of a StatefulSet pod's claim is kept on this machine."""
        return self._root / "claims" / f"{claim}-{pod_name}"

    def _claims(self, pod_name: str, claims: Sequence[str]) -> dict[str, Path]:
        """Each claim's volume (``<claim>-<pod>``, as the StatefulSet controller names the
        PersistentVolumeClaim): a folder that outlives the pod, group-writable by the pod's
        fsGroup as the kubelet makes a volume that supports ownership management."""
        volumes = {}
        for claim in claims:
            path = self.claim_path(claim, pod_name)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                make_directory(path, 0o2777)
            volumes[claim] = path
        return volumes

    def _restart_if_exited(self, pod: Pod) -> None:
        """restartPolicy Always: an exited container starts again after a back-off."""
        if pod.running:
            return
        now = time.monotonic()
        if pod.restart_at is None:
            pod.ready = False
            pod.restart_at = now + BACKOFF_S[min(pod.restarts, len(BACKOFF_S) - 1)]
        elif now >= pod.restart_at:
            pod.restarts += 1
            pod.restart_at = None
            self._spawn(pod)

    async def _stop_all(self, pods: Sequence[Pod]) -> None:
        await asyncio.gather(*(self._stop(pod) for pod in pods))

    async def _stop(self, pod: Pod) -> None:
        """SIGTERM, and SIGKILL once the pod's grace period has passed."""
        self.pods.pop(pod.name, None)
        self.stopped.append(pod)  # terminating until its process has exited
        pod.ready = False
        await _terminate(pod, float(pod.spec.get("terminationGracePeriodSeconds", GRACE_S)))

    async def _report(self, plural: str, deployment: Mapping[str, Any]) -> None:
        """The workload's status as its controller would write it from the pods."""
        name = deployment["metadata"]["name"]
        pods = self.pods_of(name)
        ready = sum(p.ready for p in pods)
        current = template_hash(deployment["spec"]["template"])
        status = {
            "replicas": len(pods),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "updatedReplicas": sum(p.template_hash == current for p in pods),
            "unavailableReplicas": max(0, int(deployment["spec"].get("replicas", 1)) - ready),
        }
        stored = deployment.get("status") or {}
        if any(stored.get(k) != v for k, v in status.items()):
            path = f"/apis/apps/v1/namespaces/{self.namespace}/{plural}/{name}"
            headers = {"Content-Type": "application/merge-patch+json"}
            response = await self._api.patch(path, json={"status": status}, headers=headers)
            response.raise_for_status()

    # --- the kubelet's part: volumes, environment, process, probes -----------------------------

    async def _volumes(self, pod: Pod, claims: Mapping[str, Path]) -> list[Mount]:
        group = pod.spec.get("securityContext", {}).get("fsGroup")
        sources: dict[str, Path] = dict(claims)
        for volume in pod.spec.get("volumes", []):
            sources[volume["name"]] = await self._volume(pod, volume, group)
        mounts = []
        for mount in pod.container.get("volumeMounts", []):
            if "subPath" in mount:
                raise ValueError(f"{mount['name']}: subPath is not supported here")
            mounts.append(
                Mount(sources[mount["name"]], mount["mountPath"], bool(mount.get("readOnly")))
            )
        if pod.spec.get("automountServiceAccountToken", True):
            mounts.append(self._kubeconfig(pod))
        return mounts

    async def _volume(self, pod: Pod, volume: Mapping[str, Any], group: int | None) -> Path:
        directory: Path = pod.root / "volumes" / str(volume["name"])
        if "emptyDir" in volume:
            return make_directory(directory, 0o777)  # as the kubelet makes an emptyDir
        for kind, plural, name_key in (
            ("secret", "secrets", "secretName"),
            ("configMap", "configmaps", "name"),
        ):
            if kind in volume:
                source = volume[kind]
                data = await self._data(plural, source[name_key])
                files = _projected(data, source.get("items"))
                mode = int(source.get("defaultMode", DEFAULT_VOLUME_MODE))
                return write_volume(directory, files, mode=mode, group=group)
        raise ValueError(f"volume {volume['name']}: only emptyDir, secret and configMap here")

    async def _data(self, plural: str, name: str) -> dict[str, str]:
        """A Secret's (base64-decoded) or a ConfigMap's data, read from the emulator."""
        response = await self._api.get(f"/api/v1/namespaces/{self.namespace}/{plural}/{name}")
        if response.status_code == 404:
            raise LookupError(f"{plural} {name} not found")
        response.raise_for_status()
        data: dict[str, str] = response.json().get("data") or {}
        if plural == "secrets":
            return {k: base64.b64decode(v).decode() for k, v in data.items()}
        return data

    async def _environment(self, pod: Pod) -> dict[str, str]:
        container = pod.container
        if "envFrom" in container:
            raise ValueError("envFrom is not supported here")
        image = self._image(container)
        env = {"PATH": os.environ["PATH"], "HOSTNAME": pod.name, **image.env}
        for variable in container.get("env", []):
            if "valueFrom" in variable:
                env[variable["name"]] = await self._value_from(pod, variable["valueFrom"])
            else:
                env[variable["name"]] = _on_mapped_port(str(variable.get("value", "")), pod.ports)
        if pod.spec.get("automountServiceAccountToken", True):
            env["KUBECONFIG"] = f"{KUBECONFIG_DIR}/config"
        return env

    async def _value_from(self, pod: Pod, source: Mapping[str, Any]) -> str:
        if "fieldRef" in source:
            fields = {"metadata.name": pod.name, "metadata.namespace": self.namespace,
                      "status.podIP": "127.0.0.1", "spec.nodeName": "kubelet"}  # fmt: skip
            return fields[source["fieldRef"]["fieldPath"]]
        for kind, plural in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
            if kind in source:
                reference = source[kind]
                return (await self._data(plural, reference["name"]))[reference["key"]]
        raise ValueError(f"valueFrom {sorted(source)} is not supported here")

    def _kubeconfig(self, pod: Pod) -> Mount:
        """Where a pod's service account token would be mounted: a kubeconfig (see the doc)."""
        directory = make_directory(pod.root / "kubeconfig", 0o755)
        (directory / "config").write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: emu, cluster: {{server: '{self._api_url}'}}}}]\n"
            "users: [{name: emu, user: {token: test}}]\n"
            f"contexts: [{{name: emu, context: {{cluster: emu, user: emu, "
            f"namespace: {self.namespace}}}}}]\n"
            "current-context: emu\n"
        )
        return Mount(directory, KUBECONFIG_DIR, read_only=True)

    def _image(self, container: Mapping[str, Any]) -> Image:
        repository = container["image"].split("@")[0].rsplit(":", 1)[0]
        return self._images[repository]

    def _spawn(self, pod: Pod) -> None:
        container = pod.container
        command = _command(container, self._image(container))
        # A mount namespace of the pod's own: its volumes at their paths, nobody else's.
        # And a UTS namespace: the pod's hostname is its name (the outbox file is named by it).
        wrapper = ["unshare", "--mount", "--uts", "--propagation", "private"]
        keep = [Path(os.path.realpath(p)) for p in self._image(container).host_paths]
        script = _mount_script(pod.mounts, keep=keep, stage=self._stage)
        shell = ["sh", "-c", f'hostname "$0"\n{script}', pod.name]
        with pod.log_path.open("ab") as log:
            pod.process = subprocess.Popen(
                [*wrapper, *shell, *command],
                env=pod.env,
                cwd=container.get("workingDir", "/"),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        pod.started_at = time.monotonic()
        pod.ready = False
        pod.readiness = _probe_of(container.get("readinessProbe"), pod.started_at)
        pod.liveness = _probe_of(container.get("livenessProbe"), pod.started_at)

    async def _probe(self, pod: Pod) -> None:
        if not pod.running:
            return
        readiness, liveness = pod.readiness, pod.liveness
        if readiness is None:
            pod.ready = True  # no readiness probe: ready once running
        elif time.monotonic() >= readiness.next_at:
            readiness.record(await self._get(pod, readiness))
            if readiness.successes >= readiness.setting("successThreshold", 1):
                pod.ready = True
            elif readiness.failures >= readiness.setting("failureThreshold", 3):
                pod.ready = False
        if liveness is not None and time.monotonic() >= liveness.next_at:
            liveness.record(await self._get(pod, liveness))
            if liveness.failures >= liveness.setting("failureThreshold", 3):
                await _terminate(pod, float(pod.spec.get("terminationGracePeriodSeconds", GRACE_S)))
                pod.restarts += 1
                self._spawn(pod)  # a failed liveness probe restarts the container at once

    async def _get(self, pod: Pod, probe: Probe) -> bool:
        action = probe.spec.get("httpGet")
        if action is None:
            raise ValueError(f"{pod.name}: only httpGet probes are supported here")
        url = f"http://127.0.0.1:{pod.port(action['port'])}{action.get('path', '/')}"
        try:
            async with httpx.AsyncClient(timeout=probe.setting("timeoutSeconds", 1)) as client:
                response = await client.get(url)
        except httpx.HTTPError:
            return False
        return 200 <= response.status_code < 400


def template_hash(template: Mapping[str, Any]) -> str:
    """Stands for the ReplicaSet's pod-template-hash: a changed template gets new pods."""
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def _terminating(deployment: Mapping[str, Any]) -> bool:
    return bool(deployment.get("metadata", {}).get("deletionTimestamp"))


def _command(container: Mapping[str, Any], image: Image) -> list[str]:
    """Kubernetes' rule: ``command`` replaces the ENTRYPOINT (and drops CMD), ``args`` CMD."""
    if "command" in container:
        return [*container["command"], *container.get("args", [])]
    return [*image.entrypoint, *container.get("args", image.cmd)]


def _map_ports(container: Mapping[str, Any]) -> dict[str, int]:
    ports = {}
    for port in container.get("ports", []):
        local = free_port()
        ports[str(port["containerPort"])] = local
        if "name" in port:
            ports[port["name"]] = local
    return ports


def _on_mapped_port(value: str, ports: Mapping[str, int]) -> str:
    """An env value naming a container port (the number, or ``host:port`` in a URL) now names
    the loopback port it is mapped to: here every pod shares one network."""
    for container_port, local in ports.items():
        if not container_port.isdigit():
            continue
        if value == container_port:
            return str(local)
        value = re.sub(rf":{container_port}(?=/|$)", f":{local}", value)
    return value


def _probe_of(spec: Mapping[str, Any] | None, started_at: float) -> Probe | None:
    if spec is None:
        return None
    return Probe(spec=spec, next_at=started_at + int(spec.get("initialDelaySeconds", 0)))


def _projected(
    data: Mapping[str, str], items: Sequence[Mapping[str, Any]] | None
) -> dict[str, str]:
    """The files a Secret or ConfigMap volume shows: every key, or the ``items`` chosen."""
    if items is None:
        return dict(data)
    return {item["path"]: data[item["key"]] for item in items}


def make_directory(path: Path, mode: int) -> Path:
    path.mkdir(parents=True)
    os.chmod(path, mode)  # whatever the umask
    return path


def write_volume(
    directory: Path, files: Mapping[str, str], *, mode: int, group: int | None
) -> Path:
    """A Secret or ConfigMap volume's files as the kubelet writes them: the volume's mode,
    owned by root and, with an ``fsGroup``, by that group with group read added."""
    make_directory(directory, 0o755)
    for name, value in files.items():
        path = directory / name
        path.write_text(value)
        os.chown(path, 0, group if group is not None else 0)
        os.chmod(path, mode | FS_GROUP_READ if group is not None else mode)
    return directory


def _mount_script(
    mounts: Sequence[Mount], *, keep: Sequence[Path] = (), stage: Path | None = None
) -> str:
    """Shell run in the pod's new mount namespace before the container's command (``$@``).
    ``keep``: the image's folders; those a mount would hide are parked under ``stage`` first
    and bound back at their paths after the pod's mounts."""
    lines = ["set -e"]
    covered = {_covered(m.target) for m in mounts}
    over = [Path(os.path.realpath(m.target)) for m in mounts]
    over += [a for a in covered if a is not None]
    hidden = [path for path in keep if any(o == path or o in path.parents for o in over)]
    if hidden and (stage is None or any(o == stage or o in stage.parents for o in over)):
        raise ValueError(f"the pod's mounts hide {hidden} and there is no stage to keep them")
    parked = [(path, shlex.quote(f"{stage}/{index}")) for index, path in enumerate(hidden)]
    for path, place in parked:
        lines += [f"mkdir -p {place}", f"mount --bind {shlex.quote(str(path))} {place}"]
    for ancestor in sorted(a for a in covered if a is not None):
        lines.append(f"mount -t tmpfs -o mode=0755 pod-{len(lines)} {shlex.quote(str(ancestor))}")
    for mount in _mount_order(mounts):
        target = shlex.quote(mount.target)
        lines += [f"mkdir -p {target}", f"mount --bind {shlex.quote(str(mount.source))} {target}"]
        if mount.read_only:
            lines.append(f"mount -o remount,bind,ro {target}")
    for path, place in parked:
        lines += [
            f"mkdir -p {shlex.quote(str(path))}",
            f"mount --bind {place} {shlex.quote(str(path))}",
        ]
    lines.append('exec "$@"')
    return "\n".join(lines)


def _mount_order(mounts: Sequence[Mount]) -> list[Mount]:
    """Shallow targets first (a mount inside another lands on it), but a mount that hides the
    source of another (an emptyDir over /tmp, where the volumes are kept) after that one."""

    def hides(mount: Mount) -> bool:
        target = Path(os.path.realpath(mount.target))
        return any(target in m.source.parents for m in mounts if m is not mount)

    ordered = sorted(mounts, key=lambda m: (hides(m), len(Path(m.target).parts)))
    for index, mount in enumerate(ordered):
        later = ordered[index + 1 :]
        if hides(mount) and any(Path(mount.target) in Path(m.target).parents for m in later):
            raise ValueError(f"{mount.target} hides a volume and holds another mount")
    return ordered


def _covered(target: str) -> Path | None:
    """The existing ancestor a tmpfs must cover so that ``target`` can be made (None: exists)."""
    path = Path(os.path.realpath(target))
    if path.exists():
        return None
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if ancestor == Path("/"):
        raise ValueError(f"mount point {target}: would need a tmpfs over /")
    return ancestor


async def _terminate(pod: Pod, grace_s: float) -> None:
    process = pod.process
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(process.wait, grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        await asyncio.to_thread(process.wait)


async def read_as_pod_user(pod: Pod, path: str) -> str:
    """``cat path`` in the pod's mount namespace with its ``runAsUser``, ``runAsGroup`` and
    ``fsGroup``: what the container's own user would read (or the error it would get)."""
    assert pod.process is not None
    context = pod.spec.get("securityContext", {})
    user, group = context["runAsUser"], context.get("runAsGroup", context["runAsUser"])
    groups = str(context["fsGroup"]) if "fsGroup" in context else None
    identity = ["--reuid", str(user), "--regid", str(group)]
    identity += ["--groups", groups] if groups else ["--clear-groups"]
    command = ["nsenter", f"--mount=/proc/{pod.process.pid}/ns/mnt", "setpriv", *identity]
    done = await asyncio.to_thread(
        subprocess.run, [*command, "cat", path], capture_output=True, text=True, check=False
    )
    return done.stdout if done.returncode == 0 else f"error: {done.stderr.strip()}"


def mount_secret(
    pod: Mapping[str, Any], volume_name: str, data: Mapping[str, str], root: Path
) -> Path:
    """Write the Secret ``data`` as the pod's volume ``volume_name`` would show it."""
    volume = next(v for v in pod["volumes"] if v["name"] == volume_name)
    mode = volume["secret"].get("defaultMode", DEFAULT_VOLUME_MODE)
    group = pod.get("securityContext", {}).get("fsGroup")
    return write_volume(root / volume_name, data, mode=mode, group=group)


def run_as_pod_user(pod: Mapping[str, Any], work: Callable[[], str]) -> str:
    """Call ``work`` in a child process that has the pod's identity: its ``runAsUser``,
    ``runAsGroup`` and ``fsGroup`` (supplementary), as the container's processes would; return
    what it returned, or ``"error: ..."`` with what it raised. A fork keeps the modules this
    process imported (the pod's user could not read this machine's interpreter under /root)."""
    context = pod.get("securityContext", {})
    groups = [context["fsGroup"]] if "fsGroup" in context else []
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read_end)
        try:
            os.setgroups(groups)
            os.setgid(context.get("runAsGroup", 0))
            os.setuid(context["runAsUser"])
            answer = work()
        except BaseException as exc:  # everything goes back to the parent as text
            answer = f"error: {type(exc).__name__}: {exc}"
        os.write(write_end, answer.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(child, 0)
    return answer
