"""The kopf handlers: thin shells that read, call the pure cores and apply the difference.

- Every TradingPolicy is its own NATS stack, ``<namespace>.<policy>`` (``stacks``): its
  workloads get ``QTRADER_STACK`` and speak only its names, and the operator serves every known
  stack (known from the policies at startup, added on create/resume, dropped on delete): the
  policy revision, the halt latch, heartbeats, acknowledgements, risk alerts and the risk monitor.
- TradingPolicy (create, update, resume, and a timer for readiness): ``policy_core`` decides the
  Deployments and the conditions; the handler applies them and publishes the policy revision to
  the policy's own key in its stack. An invalid policy (or one whose name cannot name a stack)
  is marked Invalid and changes nothing.
- Many EmergencyStops, one latch per policy: a stop covers every policy of the namespace, or
  those its ``policySelector`` selects, and always the policy naming it (``policy_selector``).
  A stop's reconcile decides its own status; each stack's latch is the combination of the stops
  covering its policy (``halt_combination``: most restrictive wins, ``held_by`` names them),
  under one lock, written with one revision into every policy's stack (a new stack gets it at
  once), and a keeper task re-establishes those combinations every second (a deleted stop, a
  relabelled policy, a restart, any order of events). Each stop's ``status.heldBy`` shows the
  stops holding a halt where it covers; policies are scaled to their combined state, and a
  missing ``emergencyStopRef`` keeps a policy halted.
- EmergencyStop (create, update, resume, and a timer for the cooldown and acknowledgements):
  the shared applier (``qtrader.control.ess_applier``, local mode's too) decides with
  ``reconcile`` and applies it through ``KopfStore`` (the handler's patch, Kubernetes events)
  and ``_KopfChannel`` (the combined latch): spec patch, latch, events, acknowledgements (of
  every stack's workers, named ``<stack>/<worker>``) and the AckTimeout report, status. Once
  the known workers acknowledged a halt (or the ack
  timeout passed, which is reported) the handler scales every policy's workloads to the stops'
  combined state (execution and inference to 0 while halted); once no stop covering a policy
  holds a halt its workloads are restored from the policy.
- Risk alerts from any stack's RISK stream (its risk monitor's too) become automatic trips of
  the stops covering that stack: the handler patches the EmergencyStop's spec (and the
  tripped-by annotation), so every trip is visible in kubectl. The annotation is removed once
  the spec is no longer tripped, so it never outlives its trip.
- A reset is decided with the risk monitors' ``holding`` (of the stacks it covers): while one of the
  stop's trigger conditions still holds it is refused (spec set back, a ResetRefused event with
  the figure).

Finalizer and progress storage use the project's own ``qtrader.dev`` prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import kopf

from qtrader.bus.errors import BusUnavailable, TopologyError
from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    EmergencyStopView,
    HaltLatch,
    PolicyRevision,
    RiskAlert,
    TradingState,
)
from qtrader.contracts.policy import (
    API_GROUP,
    API_VERSION,
    POLICY_KIND,
    ObjectMeta,
    TradingPolicy,
    TradingPolicySpec,
)
from qtrader.control.ess import (
    MODE_BEFORE_TRIP_ANNOTATION,
    TRIPPED_BY_ANNOTATION,
    EssEvent,
    EssMode,
    EssStatus,
    SpecPatch,
)
from qtrader.control.ess_applier import Applied, StopInput, alert_trip, apply_once
from qtrader.control.ess_resource import (
    EmergencyStopError,
    EmergencyStopSpec,
    parse_spec,
)
from qtrader.control.ess_status import format_time
from qtrader.control.halt_combination import StopView, combine_for
from qtrader.control.policy_selector import PolicyScope, PolicySelector, covers
from qtrader.exchange.listing import ListingUnavailable
from qtrader.local.control import publish_policy
from qtrader_operator import policy_core
from qtrader_operator.cancelling import cancel_and_wait
from qtrader_operator.kube import KubeError, KubeNotFound, custom_path, workload_path
from qtrader_operator.metrics import PolicyView
from qtrader_operator.runtime import OperatorConfig, OperatorRuntime
from qtrader_operator.stacks import NotLeading

log = logging.getLogger(__name__)

LATCH_KEEPER_INTERVAL_S = 1.0

registry = kopf.OperatorRegistry()
POLICIES = (API_GROUP, API_VERSION, "tradingpolicies")
STOPS = (API_GROUP, API_VERSION, "emergencystops")


def _now() -> datetime:
    return datetime.now(UTC)


def _runtime(memo: Any) -> OperatorRuntime:
    runtime: OperatorRuntime = memo.runtime
    return runtime


# --- lifecycle ---------------------------------------------------------------------------------


@kopf.on.startup(registry=registry)
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
    settings.posting.level = logging.INFO
    config: OperatorConfig = memo.config
    settings.watching.server_timeout = config.watch_timeout_s
    settings.watching.client_timeout = config.watch_timeout_s + 10
    # Namespaced resources, one namespace: nothing to discover at run time.
    settings.scanning.disabled = True
    runtime: OperatorRuntime | None = None

    async def on_alert(stack: str, alert: RiskAlert) -> None:
        assert runtime is not None  # stacks are served only once it is built
        await trip_for_alert(runtime, stack, alert)

    if config.peering is not None:
        settings.peering.lifetime = config.peering.lifetime_s
        settings.peering.stealth = True  # no log line per keep-alive (every second)
    runtime = await OperatorRuntime.start(config, on_alert=on_alert)
    memo.runtime = runtime
    await _serve_listed_policies(runtime)
    if runtime.leadership.leading:  # standalone: the only replica
        await _take_over(runtime)

    async def on_change(leading: bool) -> None:
        await (_take_over(runtime) if leading else _stand_by(runtime))

    if config.peering is not None:  # standalone, it leads for good: nothing to follow
        runtime.spawn("leadership", runtime.leadership.run(runtime.kube, on_change))


async def _take_over(runtime: OperatorRuntime) -> None:
    """This replica leads from now on: forget what it decided in an earlier term, serve the
    policies listed now, then heartbeats, alerts, monitors and the keeper. Nothing is written
    from memory: the keeper and each stop's first reconcile start from the stored statuses and
    the latches the stacks hold, so a takeover re-arms and re-trips nothing."""
    async with runtime.latch_lock:
        runtime.forget_decisions()
    await _serve_listed_policies(runtime, drop_unlisted=True)
    await runtime.stacks.lead()
    runtime.keeper = asyncio.create_task(keep_latch(runtime), name="latch-keeper")


async def _stand_by(runtime: OperatorRuntime) -> None:
    """Another replica leads: stop writing (the keeper first, then the stacks' leader work)."""
    keeper, runtime.keeper = runtime.keeper, None
    if keeper is not None:
        await cancel_and_wait([keeper])
    await runtime.stacks.follow()
    async with runtime.latch_lock:
        runtime.forget_decisions()


def _require_leading(runtime: OperatorRuntime) -> None:
    """kopf pauses a standby's handlers by itself; this covers the moment when kopf's view of
    the peering and ``leadership``'s differ (each reads it on its own clock)."""
    if not runtime.leadership.leading:
        raise kopf.TemporaryError("this operator replica stands by", delay=1)


async def _serve_listed_policies(runtime: OperatorRuntime, *, drop_unlisted: bool = False) -> None:
    """Serve every policy's stack before any stop is reconciled, so a restart or a takeover
    finds the latches the stacks hold (and keeps their revision) instead of deciding from
    none. ``drop_unlisted``: also stop serving stacks whose policy is gone (deleted while
    this replica stood by, so no delete handler ran here)."""
    namespace = runtime.config.namespace
    try:
        listing = await runtime.kube.get(custom_path("tradingpolicies", namespace))
    except KubeError as exc:  # each policy's resume adds its stack all the same
        log.warning("policies not listable: %s", exc)
        return
    listed = set()
    for item in listing.get("items", []):
        name = item["metadata"]["name"]
        try:
            stack = subjects.stack_id(namespace, name)
            listed.add(stack)
            await runtime.stacks.add(stack, _scope(item))
        except (subjects.InvalidStack, BusUnavailable, TopologyError) as exc:
            # Its policy's reconcile marks it Invalid or tries again.
            log.warning("policy %s: stack not served yet: %s", name, exc)
    if drop_unlisted:
        for stack in runtime.stacks.names - listed:
            await runtime.stacks.remove(stack)


@kopf.on.cleanup(registry=registry)
async def stop(memo: kopf.Memo, **_: Any) -> None:
    await _runtime(memo).stop()


# --- TradingPolicy -----------------------------------------------------------------------------


@kopf.on.resume(*POLICIES, registry=registry)
@kopf.on.create(*POLICIES, registry=registry)
@kopf.on.update(*POLICIES, registry=registry)
@kopf.timer(*POLICIES, interval=5.0, idle=1.0, registry=registry)
async def reconcile_policy(
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    runtime = _runtime(memo)
    if runtime.handler_runs.stopping:
        return  # the operator is stopping: the next one reconciles
    _require_leading(runtime)
    with runtime.handler_runs.tracked(), runtime.metrics.counting_errors("tradingpolicy"):
        await _reconcile_policy(
            runtime, body=body, spec=spec, meta=meta, status=status, patch=patch
        )


async def _reconcile_policy(
    runtime: OperatorRuntime,
    *,
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
) -> None:
    owner = policy_core.Owner(
        name=meta["name"], namespace=meta["namespace"], uid=meta.get("uid") or meta["name"]
    )
    previous = list(status.get("conditions") or [])
    generation = meta.get("generation")
    result = policy_core.stack_problem(owner) or await _validated(runtime, spec)
    if isinstance(result, str):
        runtime.policies.pop(owner.name, None)  # nothing of it runs
        if status.get("invalidReason") != result:
            kopf.warn(body, reason="Invalid", message=result)
        patch.status["invalidReason"] = result
        patch.status["conditions"] = policy_core.policy_conditions(
            invalid_reason=result,
            workloads={},
            halted=False,
            generation=generation,
            now=format_time(_now()),
            previous=previous,
        )
        return
    stack = policy_core.stack_of(owner)
    scope = PolicyScope(labels=dict(meta.get("labels") or {}), stop_ref=result.emergency_stop_ref)
    await _serve_stack(runtime, stack, scope)
    revision = await _publish_if_changed(
        runtime.bus.for_stack(stack), body=body, name=owner.name, spec=result
    )
    async with runtime.scale_lock:
        stop_state, flatten = await _stop_state(runtime, scope)
        stopped = _stopped_roles(stop_state, flatten=flatten)
        readiness = await _apply_workloads(runtime, owner=owner, spec=result, stopped=stopped)
        runtime.policies[owner.name] = PolicyView(
            revision=revision, workloads={r: (w.desired, w.ready) for r, w in readiness.items()}
        )
    patch.status["invalidReason"] = None
    patch.status["publishedRevision"] = revision
    patch.status["workloads"] = {
        r: {"desired": w.desired, "ready": w.ready} for r, w in readiness.items()
    }
    patch.status["conditions"] = policy_core.policy_conditions(
        invalid_reason=None,
        workloads=readiness,
        halted=bool(stopped),
        generation=generation,
        now=format_time(_now()),
        previous=previous,
    )
    if generation is not None:
        patch.status["observedGeneration"] = generation


async def _validated(runtime: OperatorRuntime, spec: kopf.Spec) -> TradingPolicySpec | str:
    """The spec checked against its venue's listing (fetched once per venue, off the loop); a
    venue that cannot be asked leaves the policy as it was and retries (fail closed)."""
    try:
        return await asyncio.to_thread(
            policy_core.validate,
            dict(spec),
            runtime.listings,
            allowed_images=runtime.config.allowed_images,
        )
    except ListingUnavailable as exc:
        raise kopf.TemporaryError(str(exc), delay=30) from exc


async def _serve_stack(runtime: OperatorRuntime, stack: str, scope: PolicyScope) -> None:
    """Serve the policy's stack; a new one (or one whose policy changed its labels or its stop)
    gets its latch before its workloads start (the keeper would bring it within a second; its
    workers stay halted without one)."""
    try:
        added = await runtime.stacks.add(stack, scope)
    except (BusUnavailable, TopologyError) as exc:
        raise kopf.TemporaryError(f"stack {stack} not served yet: {exc}", delay=2) from exc
    if not added:
        return
    try:
        await _keep_latch_once(runtime)
    except Exception as exc:  # the keeper brings the latch within a second all the same
        log.warning("stack %s: latch not written yet: %s", stack, exc)


@kopf.on.delete(*POLICIES, registry=registry, optional=True)
async def delete_policy(meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    """Stop serving a deleted policy's stack (its Deployments go with it, by owner reference).
    Optional: it never blocks a deletion."""
    runtime = _runtime(memo)
    runtime.policies.pop(meta["name"], None)
    with contextlib.suppress(subjects.InvalidStack):  # such a policy never had a stack
        await runtime.stacks.remove(subjects.stack_id(meta["namespace"], meta["name"]))


def _stopped_roles(stop_state: TradingState, *, flatten: bool) -> frozenset[str]:
    """Which workloads a stop scales to 0. A stop that flattens on trip keeps execution up:
    it closes the positions (its halt gate lets nothing else through)."""
    if stop_state is TradingState.HALTED and not flatten:
        return policy_core.HALTED_ROLES
    if stop_state is TradingState.HALTED:
        return policy_core.REDUCING_ROLES
    if stop_state is TradingState.REDUCING:
        return policy_core.REDUCING_ROLES
    return frozenset()


async def _stop_state(runtime: OperatorRuntime, scope: PolicyScope) -> tuple[TradingState, bool]:
    """What a policy's workloads obey: the most restrictive state of the stops covering it
    (``halt_combination.combine_for``), and whether every halting stop flattens on trip. A
    missing ``emergencyStopRef`` halts (fail closed)."""
    combined = combine_for(await _stop_views(runtime), scope)
    return combined.state, combined.flatten_on_trip


def _scope(item: Mapping[str, Any]) -> PolicyScope:
    """A listed policy's scope, read from the object alone (a spec without a readable
    ``emergencyStopRef`` names no stop, so its policy stays halted)."""
    ref = (item.get("spec") or {}).get("emergencyStopRef")
    labels = item.get("metadata", {}).get("labels") or {}
    return PolicyScope(labels=dict(labels), stop_ref=ref if isinstance(ref, str) else None)


async def _apply_workloads(
    runtime: OperatorRuntime,
    *,
    owner: policy_core.Owner,
    spec: TradingPolicySpec,
    stopped: frozenset[str],
) -> dict[str, policy_core.WorkloadReadiness]:
    config = runtime.config
    settings = policy_core.WorkloadSettings(
        image=config.workload_image,
        nats_url=config.nats_url,
        redis_url=config.redis_url,
        redis_secret=config.redis_secret,
        binance_secret=config.binance_secret,
        exchange_url=config.exchange_url,
        income_interval_s=config.income_interval_s,
        wallet_grace_s=config.wallet_grace_s,
        pod_defaults=config.pod_defaults,
    )
    versions = {
        name: await _secret_version(runtime, owner.namespace, name)
        for name in policy_core.execution_secrets(settings)
    }
    settings = replace(settings, secret_versions=versions)
    readiness = {}
    manifests = policy_core.desired_workloads(
        owner=owner, spec=spec, settings=settings, stopped_roles=stopped
    )
    plural = policy_core.workload_plural(settings.pod_defaults)
    for role, manifest in zip(policy_core.ROLES, manifests, strict=True):
        applied, created = await runtime.kube.apply_workload(plural, manifest)
        name = manifest["metadata"]["name"]
        # Also at the first reconcile of this process: a stop may have ended the one that
        # created this kind before it deleted the other.
        if created or name not in runtime.kinds_settled:
            await _delete_other_kind(runtime, settings.pod_defaults, manifest["metadata"])
            runtime.kinds_settled.add(name)
        ready = int((applied.get("status") or {}).get("readyReplicas") or 0)
        readiness[role] = policy_core.WorkloadReadiness(
            desired=manifest["spec"]["replicas"], ready=ready
        )
    return readiness


async def _delete_other_kind(
    runtime: OperatorRuntime, defaults: policy_core.PodDefaults, metadata: Mapping[str, Any]
) -> None:
    """A workload created as one kind replaces the other's object of its name (the outbox
    setting changed: Deployments became StatefulSets or back), so one set of pods runs."""
    other = policy_core.other_workload_plural(defaults)
    path = workload_path(other, metadata["namespace"], metadata["name"])
    with contextlib.suppress(KubeNotFound):
        await runtime.kube.delete(path)
        log.warning("replaced %s (the workloads' kind follows the outbox's storage)", path)


async def _secret_version(runtime: OperatorRuntime, namespace: str, name: str) -> str:
    """A Secret's resourceVersion: it changes with every write, so the annotation rolls the
    pods that read it. Only the version is used, never the data."""
    try:
        found = await runtime.kube.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
    except KubeNotFound:
        return "absent"
    except KubeError as exc:  # e.g. not allowed: no roll on change, said once per reconcile
        log.warning(
            "secret %s: version not readable (%s); its changes will not roll pods", name, exc
        )
        return "unknown"
    return str(found.get("metadata", {}).get("resourceVersion", "unknown"))


async def _publish_if_changed(
    bus: Bus, *, body: kopf.Body, name: str, spec: TradingPolicySpec
) -> int:
    """Publish a new revision to the policy's stack (``bus``) only when the spec differs from
    the one its workloads run."""
    current = await bus.kv_get(subjects.POLICY_BUCKET, subjects.POLICY_KEY, PolicyRevision)
    # One that does not decode is replaced by a new revision (publish_policy numbers it).
    if isinstance(current, PolicyRevision) and current.name == name and current.spec == spec:
        return current.revision
    policy = TradingPolicy(
        api_version=f"{API_GROUP}/{API_VERSION}",
        kind=POLICY_KIND,
        metadata=ObjectMeta(name=name),
        spec=spec,
    )
    revision = await publish_policy(bus, policy)
    kopf.info(body, reason="PolicyPublished", message=f"revision {revision.revision} published")
    return revision.revision


# --- EmergencyStop -----------------------------------------------------------------------------


@kopf.on.resume(*STOPS, registry=registry)
@kopf.on.create(*STOPS, registry=registry)
@kopf.on.update(*STOPS, registry=registry)
@kopf.timer(*STOPS, interval=0.5, registry=registry)
async def reconcile_stop(
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    runtime = _runtime(memo)
    if runtime.handler_runs.stopping:
        return  # the operator is stopping: the next one reconciles
    _require_leading(runtime)
    with runtime.handler_runs.tracked(), runtime.metrics.counting_errors("emergencystop"):
        await _reconcile_stop(runtime, body=body, spec=spec, meta=meta, status=status, patch=patch)


async def _reconcile_stop(
    runtime: OperatorRuntime,
    *,
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
) -> None:
    name = meta["name"]
    memory = runtime.memory(name)
    async with memory.lock:
        resource = _parse_stop(spec)
        runtime.stacks.configure(name, resource.triggers, resource.policy_selector)
        before = memory.status or EssStatus.from_dict(status)
        if memory.status is None:  # first sight since start: put the stops' combination in force
            before = await _put_latch(
                runtime,
                name=name,
                status=before,
                min_revision=before.latch_revision + 1,
                decided=False,
            )
        applied = await apply_once(
            stop=StopInput(
                name=name,
                spec=resource,
                tripped_by=(meta.get("annotations") or {}).get(TRIPPED_BY_ANNOTATION) or "",
                generation=meta.get("generation") or 0,
                previous_conditions=list(status.get("conditions") or []),
                mode_before_trip=_mode_before_trip(meta),
                positions=runtime.stacks.positions_of(name),
            ),
            status=before,
            store=KopfStore(body=body, patch=patch, status=status),
            channel=_KopfChannel(runtime, name),
            acks=runtime.acks,
            memory=memory.acks,
            hold=runtime.stacks.holding(name),
            now=_now(),
        )
        memory.status = applied.status
        memory.pending_workers = len(applied.pending)
        await _scale_when_confirmed(
            runtime, namespace=meta["namespace"], name=name, applied=applied
        )


def _mode_before_trip(meta: Mapping[str, Any]) -> EssMode | None:
    """The mode-before-trip annotation; one that does not parse restores Halted, the most
    restrictive mode (fail closed)."""
    value = (meta.get("annotations") or {}).get(MODE_BEFORE_TRIP_ANNOTATION)
    try:
        return None if value is None else EssMode(value)
    except ValueError:
        log.warning("%s=%r is not a mode: Halted restored", MODE_BEFORE_TRIP_ANNOTATION, value)
        return EssMode.HALTED


class KopfStore:
    """The applier's store on the custom resource: everything goes into the handler's patch
    (kopf applies it when the handler returns), events are Kubernetes events."""

    def __init__(
        self,
        *,
        body: kopf.Body | None,
        patch: kopf.Patch,
        status: Mapping[str, Any],
        emit: Callable[[EssEvent], None] | None = None,
    ) -> None:
        self._body = body
        self._patch = patch
        self._status = status
        self._emit = emit or self._post

    async def patch_spec(self, patch: SpecPatch, *, clear_tripped_by: bool) -> int | None:
        self._patch.spec.update(patch)
        if clear_tripped_by:
            self._patch.metadata.annotations[TRIPPED_BY_ANNOTATION] = None
            self._patch.metadata.annotations[MODE_BEFORE_TRIP_ANNOTATION] = None
        return None  # the API server counts generations

    async def post_event(self, event: EssEvent, *, at: datetime) -> None:
        self._emit(event)

    def _post(self, event: EssEvent) -> None:
        assert self._body is not None  # without a body, the caller passes ``emit``
        kopf.event(
            self._body, type=event.type.value, reason=event.reason.value, message=event.message
        )

    async def save_status(self, document: dict[str, Any]) -> None:
        changed = {k: v for k, v in document.items() if self._status.get(k) != v}
        if changed:
            self._patch.status.update(changed)


class _KopfChannel:
    """The applier's latch channel: the combination of every stop of the namespace."""

    def __init__(self, runtime: OperatorRuntime, name: str) -> None:
        self._runtime = runtime
        self._name = name

    async def put(
        self, status: EssStatus, *, min_revision: int, flatten: bool, now: datetime
    ) -> HaltLatch:
        await _put_latch(
            self._runtime,
            name=self._name,
            status=status,
            min_revision=min_revision,
            flatten=flatten,
        )
        assert self._runtime.latch is not None  # _put_latch holds the latch in force
        return self._runtime.latch

    def held_by(self) -> Sequence[str]:
        """The stops holding a halt where this one covers (the namespace's, with no policy)."""
        held = self._runtime.stacks.held_by(self._name)
        if held is not None:
            return held
        latch = self._runtime.latch
        return latch.held_by if latch is not None else ()

    async def announce(self, view: EmergencyStopView) -> None:
        await self._runtime.stacks.announce_view(view)  # to the stacks it covers


async def _scale_when_confirmed(
    runtime: OperatorRuntime, *, namespace: str, name: str, applied: Applied
) -> None:
    """Scale the policies once the workers acknowledged the latch (or are overdue, which the
    applier reported), once per latch revision and state."""
    memory = runtime.memory(name)
    target = (applied.status.latch_revision, applied.status.latch.value)
    if memory.scaled_for == target or (applied.pending and not applied.overdue):
        return
    await _scale_obeying_policies(runtime, namespace=namespace)
    memory.scaled_for = target


@kopf.on.delete(*STOPS, registry=registry, optional=True)
async def delete_stop(meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    """Forget a deleted stop. The stop still counts in the latch while it exists: the keeper
    drops it from the combination (and prunes this memory, if this never ran) once it is gone.
    Optional: it never blocks a deletion, so an operator that is down cannot hold one up."""
    runtime = _runtime(memo)
    name = meta["name"]
    async with runtime.memory(name).lock:
        runtime.ess.pop(name, None)
        runtime.stacks.forget(name)
    log.info("EmergencyStop %s deleted; it leaves the latch's combination once it is gone", name)


async def _put_latch(
    runtime: OperatorRuntime,
    *,
    name: str,
    status: EssStatus,
    min_revision: int,
    flatten: bool = False,
    decided: bool = True,
) -> EssStatus:
    """Put the combination of every stop (this one at ``status``) in force; returns ``status``
    at the revision in force. The stop's memory is updated under the same lock, so the keeper
    never combines a stale copy of it with a latch written from the new one. ``decided``:
    False when ``status`` was only read from storage (first sight after a restart), so a spec
    asking for a trip the status does not show yet still counts as one."""
    now = _now()
    async with runtime.latch_lock:
        views = await _views_for_write(runtime, name=name, status=status, decided=decided)
        try:
            latch, written = await runtime.stacks.put_latch(
                views,
                known=runtime.latch,
                min_revision=min_revision,
                now=now,
                flatten_by=name if flatten else None,
            )
        except NotLeading as exc:  # stepped down while deciding: the leader decides again
            raise kopf.TemporaryError(str(exc), delay=1) from exc
        runtime.latch = latch
        memory = runtime.memory(name)
        if written or memory.acks.latch_written is None:
            memory.acks.latch_written = (latch.revision, now)
        memory.status = replace(status, latch_revision=latch.revision)
        return memory.status


async def _views_for_write(
    runtime: OperatorRuntime, *, name: str, status: EssStatus, decided: bool
) -> list[StopView]:
    """The stops to combine for a write. A halt must not wait for the Kubernetes API: when the
    stops cannot be listed and this stop's decision halts, the stops this process knows are
    combined instead (HALTED whatever the others say, so nothing is lifted; the keeper names
    the rest once the API answers). Anything else waits for the list (the error propagates)."""
    try:
        return await _stop_views(runtime, overlay={name: status} if decided else None)
    except KubeError:
        if not decided or status.latch is not TradingState.HALTED:
            raise
        log.warning("EmergencyStop %s: stops not listable; halting from what is known", name)
        known = {n: m.status for n, m in runtime.ess.items() if m.status is not None}
        return [
            StopView(name=n, status=s, selector=runtime.stacks.selector(n))
            for n, s in {**known, name: status}.items()
        ]


async def _stop_views(
    runtime: OperatorRuntime, *, overlay: dict[str, EssStatus] | None = None
) -> list[StopView]:
    """Every EmergencyStop of the namespace as the combination sees it: this process's own
    decision where it has one, else the stored status (a spec asking for a trip counts)."""
    overlay = overlay or {}
    listing = await runtime.kube.get(custom_path("emergencystops", runtime.config.namespace))
    views = {}
    for item in listing.get("items", []):
        name = item["metadata"]["name"]
        memory = runtime.ess.get(name)
        decided = overlay.get(name) or (memory.status if memory is not None else None)
        views[name] = _view(name, item, decided)
    for name, status in overlay.items():  # not listed yet: it still counts
        selector = runtime.stacks.selector(name)
        views.setdefault(name, StopView(name=name, status=status, selector=selector))
    return list(views.values())


def _view(name: str, item: dict[str, Any], decided: EssStatus | None) -> StopView:
    spec = item.get("spec") or {}
    try:
        stored = decided or EssStatus.from_dict(item.get("status") or {})
        mode = EssMode(spec.get("mode") or EssMode.HALTED.value)
        selector = _selector(spec)
    except ValueError:  # a status, mode or selector that does not parse: fail closed, a halt
        # of every policy (no selector)
        return StopView(name=name, status=EssStatus.initial(), decided=False, spec_tripped=True)
    return StopView(
        name=name,
        status=stored,
        decided=decided is not None,
        spec_tripped=bool(spec.get("tripped")),
        spec_mode=mode,
        flatten_on_trip=bool(spec.get("flattenOnTrip")),
        selector=selector,
    )


def _selector(spec: Mapping[str, Any]) -> PolicySelector | None:
    """A stop's ``policySelector`` (ValueError when it does not parse)."""
    raw = spec.get("policySelector")
    return None if raw is None else PolicySelector.model_validate(raw)


async def keep_latch(runtime: OperatorRuntime) -> None:
    """Every ``LATCH_KEEPER_INTERVAL_S``: bring the latch to the stops' combination and the
    policies' workloads with it. Catches what no stop's reconcile writes: a deleted stop, a
    restart, a write that failed half-way. Level-based, so the order of events never matters."""
    while True:
        try:
            await _keep_latch_once(runtime)
        except Exception as exc:  # the next round decides again from what exists then
            log.warning("halt latch keeper: %s", exc)
        await asyncio.sleep(LATCH_KEEPER_INTERVAL_S)


async def _keep_latch_once(runtime: OperatorRuntime) -> None:
    async with runtime.latch_lock:
        views = await _stop_views(runtime)
        listed = {v.name for v in views}
        for name in [n for n in runtime.ess if n not in listed]:
            runtime.ess.pop(name)  # deleted: a stop created again under its name starts afresh
            runtime.stacks.forget(name)
        latch, written = await runtime.stacks.put_latch(
            views, known=runtime.latch, min_revision=0, now=_now()
        )
        runtime.latch = latch
    if written:
        log.warning(
            "halt latch brought to the stops' combination: revision %d %s held by %s",
            latch.revision,
            latch.state,
            ", ".join(latch.held_by) or "none",
        )
        await _scale_obeying_policies(runtime, namespace=runtime.config.namespace)


async def _scale_obeying_policies(runtime: OperatorRuntime, *, namespace: str) -> None:
    """Scale every policy of the namespace to what the stops' combination allows it."""
    async with runtime.scale_lock:
        await _scale_obeying_policies_locked(runtime, namespace=namespace)


async def _scale_obeying_policies_locked(runtime: OperatorRuntime, *, namespace: str) -> None:
    listing = await runtime.kube.get(custom_path("tradingpolicies", namespace))
    for item in listing.get("items", []):
        # By the schema alone: scaling on a halt must not wait for a venue's listing.
        spec = policy_core.parse_spec(item.get("spec") or {})
        if isinstance(spec, str):
            continue
        state, flatten = await _stop_state(runtime, _scope(item))
        stopped = _stopped_roles(state, flatten=flatten)
        metadata = item["metadata"]
        owner = policy_core.Owner(
            name=metadata["name"], namespace=namespace, uid=metadata.get("uid") or metadata["name"]
        )
        plural = policy_core.workload_plural(runtime.config.pod_defaults)
        for role in policy_core.ROLES:
            replicas = policy_core.desired_replicas(spec, role, stopped_roles=stopped)
            path = workload_path(plural, namespace, policy_core.workload_name(owner, role))
            try:
                scaled = await runtime.kube.merge_patch(path, {"spec": {"replicas": replicas}})
            except KubeNotFound:
                log.warning("%s not found while scaling", path)
                continue
            ready = int((scaled.get("status") or {}).get("readyReplicas") or 0)
            _show_scaled(runtime, owner.name, role, (replicas, ready))


def _show_scaled(
    runtime: OperatorRuntime, policy: str, role: str, replicas: tuple[int, int]
) -> None:
    """The metrics show a scaling as soon as it is set (one workload at a time), not at the
    policy's next reconcile."""
    known = runtime.policies.get(policy)
    if known is not None:
        runtime.policies[policy] = replace(known, workloads={**known.workloads, role: replicas})


def _parse_stop(spec: Any) -> EmergencyStopSpec:
    try:
        return parse_spec(dict(spec))
    except EmergencyStopError as exc:  # the CRD's schema should have refused it already
        raise kopf.PermanentError(f"invalid EmergencyStop spec: {exc}") from exc


# --- automatic trips ---------------------------------------------------------------------------


async def trip_for_alert(runtime: OperatorRuntime, stack: str, alert: RiskAlert) -> None:
    """Trip every EmergencyStop covering ``stack`` whose trigger the alert breaches
    (``ess_applier``'s rule). An alert from a stack no longer served trips every stop whose
    trigger it breaches: its policy's scope is not known, and a trip is the safe side."""
    namespace = runtime.config.namespace
    scope = runtime.stacks.scope(stack)
    listing = await runtime.kube.get(custom_path("emergencystops", namespace))
    for item in listing.get("items", []):
        name = item["metadata"]["name"]
        annotations = item["metadata"].get("annotations") or {}
        spec = _parse_stop(item.get("spec") or {})
        if scope is not None and not covers(stop=name, selector=spec.policy_selector, policy=scope):
            continue
        trip = alert_trip(alert, spec=spec, tripped_by=annotations.get(TRIPPED_BY_ANNOTATION) or "")
        if trip is None:
            continue
        body = {"metadata": {"annotations": trip.annotations}, "spec": trip.spec_patch}
        await runtime.kube.merge_patch(custom_path("emergencystops", namespace, name), body)
        log.warning("EmergencyStop %s tripped automatically by %s", name, trip.tripped_by)


def _release_timer_finalizers(handlers: kopf.OperatorRegistry) -> None:
    """``kopf.timer`` always asks for a finalizer (no option turns it off), so a stop or a
    policy a timer serves could not be deleted while no operator replica ran: its deletion
    waited on ``qtrader.dev/finalizer``. The timers need none: nothing is cleaned up at a
    deletion (the Deployments go by owner reference, the stop leaves the latch's combination
    once it is gone, the delete handlers are optional), and kopf stops an object's timer when
    the object goes. Without a handler requiring it, kopf also removes the finalizer it put on
    objects earlier. kopf 1.45 keeps the spawning handlers in this one list."""
    spawning = handlers._spawning._handlers
    spawning[:] = [replace(h, requires_finalizer=False) for h in spawning]


_release_timer_finalizers(registry)
