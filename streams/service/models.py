"""Changing the model of a running stream (hot swap): commands on the model topic, and each
stream worker following them. No Faust here: a timer calls ``ModelFollower.follow``.

``visionstream model set`` publishes a command to ``topics.models`` (keyed ``set``, on a
compacted topic: the latest is kept however old). Every stream worker reads that topic whole
as it starts, so the latest command decides its model and a restarted worker keeps a swap;
then it follows the topic. On a new command it registers the new model on every Dask worker
(loaded and warmed up: compiled where ``model.compile`` is on) while batches keep flowing on
the one in use; once every worker has it, the next batches go to it, and batches in flight
finish on the one they began with (each names its plugin when submitted). The old model is
retired once idle (``inference.client.retirement``). A load that fails on any worker keeps the
old model everywhere: one log line, ``visionstream_model_swaps_total{outcome="failed"}``, and
an outcome event on the same topic, which ``model set`` waits for. Rolling back is the same
command with the previous weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from inference.settings import ModelSettings
from streams.service.canary import PROMOTE, CanaryRule, Tally, verdict
from streams.service.events import now_iso

log = logging.getLogger(__name__)

MODEL_SCHEMA = "visionstream.model/v1"
SET, SWAPPED, FAILED = "set", "swapped", "failed"
CANARY, PROMOTED, ROLLED_BACK = "canary", "promoted", "rolled-back"  # a canary command, and its verdict
KINDS = (SET, SWAPPED, FAILED, CANARY, PROMOTED, ROLLED_BACK)
SET_KEY = b"set"  # every command under one key: compaction keeps the latest
MAX_RECORD_BYTES = 65_536  # a model command or outcome is small; anything larger is not ours


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """What a ``set`` command asks for: the model and its weights (as ``model.name``,
    ``model.weights``, ``model.weights_sha256`` take them)."""

    id: str
    name: str
    weights: str
    weights_sha256: str | None = None
    at: str | None = None

    def applied_to(self, model: ModelSettings) -> ModelSettings:
        """``model`` with this choice's name and weights (the rest, precision, device, compile, kept)."""
        return model.model_copy(update={"name": self.name, "weights": self.weights, "weights_sha256": self.weights_sha256})


def member_name() -> str:
    """This stream worker, as its outcome events name it: host (the pod) and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def set_command(name: str, weights: str, weights_sha256: str | None = None) -> dict[str, Any]:
    """The event ``model set`` publishes."""
    return {"schema": MODEL_SCHEMA, "kind": SET, "id": uuid.uuid4().hex, "at": now_iso(),
            "model": {"name": name, "weights": weights, "weights_sha256": weights_sha256}}


def outcome_event(choice: ModelChoice, member: str, ok: bool, version: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """What a stream worker says of a command: swapped (to ``version``) or failed (``reason``)."""
    return {"schema": MODEL_SCHEMA, "kind": SWAPPED if ok else FAILED, "id": choice.id, "at": now_iso(), "member": member,
            "model": {"name": choice.name, "weights": choice.weights}, "version": version, "reason": reason}


def parse(value: bytes | None) -> dict[str, Any] | None:
    """A record of the model topic, or None for anything that is not one of ours (whatever the
    bytes: another producer's, truncated, hostile). Pure."""
    if not value or len(value) > MAX_RECORD_BYTES:
        return None
    try:
        record = json.loads(value)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(record, dict) or record.get("schema") != MODEL_SCHEMA or record.get("kind") not in KINDS:
        return None
    if not isinstance(record.get("id"), str) or not record["id"]:
        return None
    return record


def canary_command(name: str, weights: str, share: float, rule: CanaryRule, weights_sha256: str | None = None) -> dict[str, Any]:
    """The event ``model canary`` publishes: ``share`` of the images to the candidate, judged by ``rule``."""
    command = set_command(name, weights, weights_sha256)
    command.update(kind=CANARY, share=share, min_labelled=rule.min_labelled, max_drop=rule.max_drop)
    return command


def canary_of(record: dict[str, Any]) -> tuple[ModelChoice, float, CanaryRule] | None:
    """What a ``canary`` record asks (its model, share and rule), or None where it is unusable. Pure."""
    share, least, drop = record.get("share"), record.get("min_labelled"), record.get("max_drop")
    if record.get("kind") != CANARY or (choice := choice_of({**record, "kind": SET})) is None:
        return None
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 < share < 1:
        return None
    if not isinstance(least, int) or isinstance(least, bool) or least < 1 or not isinstance(drop, (int, float)) or not 0 <= drop <= 1:
        return None
    return choice, float(share), CanaryRule(least, float(drop))


def configured_canary(model: ModelSettings) -> dict[str, Any]:
    """``model.canary`` as a canary command whose id is a digest of it: every stream worker
    publishes the same one, and once decided it is never started again."""
    canary = model.canary
    assert canary is not None
    command = canary_command(canary.name or model.name, canary.weights, canary.share, CanaryRule(canary.min_labelled, canary.max_drop), canary.weights_sha256)
    command["id"] = "config-" + hashlib.sha256(json.dumps([command["model"], canary.share, canary.min_labelled, canary.max_drop]).encode()).hexdigest()[:24]
    return command


def verdict_event(canary_id: str, member: str, kind: str, reason: str, stats: dict[str, Any]) -> dict[str, Any]:
    """A canary's end: ``PROMOTED`` or ``ROLLED_BACK``, why, and both versions' counts."""
    return {"schema": MODEL_SCHEMA, "kind": kind, "id": canary_id, "at": now_iso(), "member": member, "reason": reason, "stats": stats}


def choice_of(record: dict[str, Any]) -> ModelChoice | None:
    """The choice a ``set`` record makes, or None where it names no usable model. Pure."""
    model = record.get("model")
    if record.get("kind") != SET or not isinstance(model, dict):
        return None
    name, weights, digest = model.get("name"), model.get("weights"), model.get("weights_sha256")
    if not isinstance(name, str) or not name or not isinstance(weights, str) or not weights:
        return None
    at = record.get("at")
    return ModelChoice(record["id"], name, weights, digest if isinstance(digest, str) and digest else None, at if isinstance(at, str) else None)


def latest_choice(values: Iterable[bytes | None]) -> ModelChoice | None:
    """The last usable ``set`` command among the topic's records, in their order. Pure."""
    latest = None
    for value in values:
        record = parse(value)
        if record is not None and (choice := choice_of(record)) is not None:
            latest = choice
    return latest


def standing_choice(values: Iterable[bytes | None]) -> ModelChoice | None:
    """The choice in force: the last ``set`` command that a stream worker swapped to, or that
    none has said failed (none has tried it yet). A command whose model failed to load is
    passed over: a restarted worker serves the model the others kept. Pure."""
    records = [record for value in values if (record := parse(value)) is not None]
    swapped = {record["id"] for record in records if record["kind"] == SWAPPED}
    failed = {record["id"] for record in records if record["kind"] == FAILED} - swapped
    standing = None
    for record in records:
        if (choice := choice_of(record)) is not None and choice.id not in failed:
            standing = choice
    return standing


@dataclass(frozen=True)
class ActiveCanary:
    """A canary this stream worker routes images to, and the counts it started from."""

    choice: ModelChoice
    rule: CanaryRule
    serving: str  # the versions compared
    candidate: str
    baseline: dict[str, Tally]


@dataclass
class ModelFollower:
    """Applies the model topic's commands to this stream worker's cluster handle, in order."""

    model: ModelSettings  # the model in use: the configuration's, until a command changes it
    swap: Callable[[ModelSettings], Awaitable[str]]  # registers it on every worker, then uses it; returns its version
    publish: Callable[[dict[str, Any], bytes | None], Awaitable[Any]]  # an event onto the model topic (its key, or the default)
    member: str
    counted: Callable[[str], None] = lambda outcome: None  # the swaps counter
    seen: set[str] = field(default_factory=set)  # ids of the commands read (applied, failed, or read at start)
    canary: Any = None  # the cluster's canary side: start_canary, end_canary, serving_version (InferenceCluster)
    tallies: Callable[[], dict[str, Tally]] = dict  # per model version, as the stream counted them
    running: ActiveCanary | None = None
    pending: list[bytes] = field(default_factory=list)  # records read at start, applied by the first follow

    def start_with(self, values: Iterable[bytes | None]) -> ModelSettings:
        """The model to start with: the standing command's (``standing_choice``), else the
        configuration's. Later commands, failed ones included, are not tried again."""
        values = list(values)
        choice = standing_choice(values)
        if choice is not None:
            self.model = choice.applied_to(self.model)
            log.info("model %s with weights %r, as `model set` chose (%s)", choice.name, choice.weights, choice.at or "no time given")
        records = [record for value in values if (record := parse(value)) is not None]
        decided = {record["id"] for record in records if record["kind"] in (PROMOTED, ROLLED_BACK)}
        # set commands are history; the last canary without a verdict is taken up by the first follow
        self.seen.update(record["id"] for record in records if record["kind"] == SET or (record["kind"] == CANARY and record["id"] in decided))
        self.seen.update(decided)
        undecided = [record for record in records if record["kind"] == CANARY and record["id"] not in decided]
        self.pending = [json.dumps(undecided[-1]).encode()] if undecided else []
        return self.model

    async def follow(self, values: Iterable[bytes | None]) -> None:
        """New records of the topic: each new ``set`` command is applied, in order."""
        values, self.pending = [*self.pending, *values], []
        for value in values:
            record = parse(value)
            if record is None:
                continue
            if record["kind"] in (PROMOTED, ROLLED_BACK):
                self._ended(record)
                continue
            if record["id"] in self.seen:
                continue
            if (canary := canary_of(record)) is not None:
                await self._start_canary(*canary)
            elif (choice := choice_of(record)) is not None:
                if self.running is not None:  # an operator's `model set` ends a canary
                    log.info("canary %s ended by model set %s", self.running.choice.id[:8], choice.id[:8])
                    self.running = None
                    self.canary.end_canary()
                await self._apply(choice)
        await self.judge()

    async def judge(self) -> None:
        """Decide the running canary once its rule can (``streams.service.canary``): each verdict
        an event on the model topic and a log line; a promotion is a ``set`` command for the
        candidate (every stream worker swaps to it), a roll-back ends the canary everywhere."""
        running = self.running
        if running is None:
            return
        now = self.tallies()
        serving = now.get(running.serving, Tally()).minus(running.baseline.get(running.serving, Tally()))
        candidate = now.get(running.candidate, Tally()).minus(running.baseline.get(running.candidate, Tally()))
        decision, why = verdict(serving, candidate, running.rule)
        if decision is None:
            return
        self.running = None
        stats = {"serving": {"version": running.serving, **serving.summary()}, "candidate": {"version": running.candidate, **candidate.summary()}}
        kind = PROMOTED if decision == PROMOTE else ROLLED_BACK
        log.warning("canary %s %s: %s", running.choice.id[:8], kind, why)
        self.seen.add(running.choice.id)
        await self.say(verdict_event(running.choice.id, self.member, kind, why, stats))
        if decision == PROMOTE:
            promotion = set_command(running.choice.name, running.choice.weights, running.choice.weights_sha256)
            promotion["because"] = running.choice.id
            await self.say(promotion, SET_KEY)
        else:
            self.canary.end_canary()

    async def _start_canary(self, choice: ModelChoice, share: float, rule: CanaryRule) -> None:
        self.seen.add(choice.id)
        model = choice.applied_to(self.model)
        log.info("model canary: loading %s with weights %r on every Dask worker for %.0f%% of the images", choice.name, choice.weights, share * 100)
        try:
            version = await self.canary.start_canary(model, share)
            serving = await self.canary.serving_version() or "unknown"
        except Exception as exc:  # noqa: BLE001 - no canary: the serving model takes every image
            reason = str(exc) or type(exc).__name__
            log.error("model canary %s: not started, the model in use serves every image: %s", choice.id[:8], reason)
            self.counted(FAILED)
            await self.say(outcome_event(choice, self.member, False, reason=reason[:1000]))
            return
        self.running = ActiveCanary(choice, rule, serving, version, dict(self.tallies()))
        log.info("model canary %s: version %s takes %.0f%% of the images beside %s", choice.id[:8], version, share * 100, serving)
        await self.say(outcome_event(choice, self.member, True, version=version))

    def _ended(self, record: dict[str, Any]) -> None:
        """Another stream worker's verdict (or our own, read back): the canary is over here too."""
        self.seen.add(record["id"])
        if self.running is not None and self.running.choice.id == record["id"]:
            self.running = None
            log.info("canary %s %s (by %s)", record["id"][:8], record["kind"], record.get("member"))
        if record["kind"] == ROLLED_BACK and self.canary is not None:
            self.canary.end_canary()

    async def _apply(self, choice: ModelChoice) -> None:
        self.seen.add(choice.id)  # tried once: a failed load is not retried by this worker until a new command
        model = choice.applied_to(self.model)
        log.info("model set: loading %s with weights %r on every Dask worker (batches go on meanwhile)", choice.name, choice.weights)
        try:
            version = await self.swap(model)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the old model goes on
            reason = str(exc) or type(exc).__name__
            log.error("model set %s: keeping the model in use (%s with weights %r): %s", choice.id[:8], self.model.name, self.model.weights, reason)
            self.counted(FAILED)
            await self.say(outcome_event(choice, self.member, False, reason=reason[:1000]))
            return
        self.model = model
        log.info("model set %s: batches now go to %s with weights %r (version %s)", choice.id[:8], choice.name, choice.weights, version)
        self.counted(SWAPPED)
        await self.say(outcome_event(choice, self.member, True, version=version))

    async def say(self, event: dict[str, Any], key: bytes | None = None) -> None:
        try:
            await self.publish(event, key)
        except Exception as exc:  # noqa: BLE001 - the swap stands; `model set` times out waiting
            log.warning("could not publish the model outcome event: %s", exc)


class ModelControl:
    """The model topic for one stream worker: the model it starts with, the commands it follows,
    the outcomes it publishes (``tail``: a ``TopicTail`` of ``topics.models``)."""

    def __init__(self, follower: ModelFollower, tail: Any, configured: ModelSettings) -> None:
        self.follower, self.tail, self.configured = follower, tail, configured

    async def starting_model(self) -> ModelSettings:
        """What to register first: the standing command's model, else the configured one (also
        where the topic cannot be read: following it later catches up). A ``model.canary`` that
        the topic has not seen yet is published, once for every stream worker alike."""
        try:
            values = await self.tail.start()
        except Exception as exc:  # noqa: BLE001 - the configured model, rather than no start
            log.warning("could not read the model topic %s (%s); starting with the configured model", self.tail.topic, exc)
            return self.configured
        model = self.follower.start_with(values)
        if self.configured.canary is not None:
            command = configured_canary(self.configured)
            if not any((record := parse(value)) is not None and record["id"] == command["id"] for value in values):
                log.info("model.canary: publishing canary %s (%s, %.0f%% of the images)", command["id"][:8], command["model"]["weights"], command["share"] * 100)
                await self.follower.say(command, f"canary/{command['id']}".encode())
        return model

    async def follow(self) -> None:
        """Apply the commands that arrived since the last call."""
        await self.follower.follow(await self.tail.new())

    async def stop(self) -> None:
        await self.tail.stop()
