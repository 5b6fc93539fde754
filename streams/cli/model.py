"""``visionstream model set|status``: change the model of a running stream, and see which is in
force (``streams.service.models``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from inference.settings import Settings, WeightsSpec
from streams.service.logs import escape

SET_WAIT_S = 900.0  # cluster.setup_timeout_s's default: a load may take that long


def register(command: Any) -> None:
    model = command("model", run_model, "change the model of the running stream (hot swap), or show which is in force")
    model.add_argument("action", choices=["set", "canary", "status"],
                       help="set: load new weights on every Dask worker and switch to them; canary: send a share of the images to them, "
                            "promoted or rolled back by their top-1 on labelled images; status: what is in force")
    model.add_argument("--weights", metavar="SPEC", help="DEFAULT | IMAGENET1K_V2 | FILE | s3://BUCKET/KEY | none (random init, for tests)")
    model.add_argument("--model", dest="name", metavar="NAME", help="torchvision model name (default: the model in force)")
    model.add_argument("--sha256", metavar="HEX", help="the weights file's whole SHA-256: the workers refuse other bytes")
    model.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                       help="wait for a stream worker to say it swapped or kept the old model (default: on)")
    model.add_argument("--timeout", type=float, default=SET_WAIT_S, metavar="SECONDS", help=f"how long to wait (default: {SET_WAIT_S:g})")
    model.add_argument("--share", type=float, default=0.1, metavar="FRACTION", help="canary: the share of the images it takes (default: 0.1)")
    model.add_argument("--min-labelled", type=int, default=200, metavar="N",
                       help="canary: labelled images on the candidate before a verdict (default: 200)")
    model.add_argument("--max-drop", type=float, default=0.02, metavar="FRACTION",
                       help="canary: how much lower a promoted candidate's top-1 may be, at 95%% confidence (default: 0.02)")
    model.add_argument("--no-check", dest="check", action="store_false",
                       help="publish without checking that the weights exist from here (a path only the workers see)")


def run_model(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "status":
        return _status(settings)
    if not args.weights:
        print("visionstream: error: model set needs --weights", file=sys.stderr)
        return 2
    weights = args.weights.strip()
    spec = WeightsSpec.parse(weights)
    if spec.kind == "checkpoint" and "://" not in weights:
        weights = str(Path(weights).expanduser().resolve())  # the workers have another working directory
    if args.check and (problem := weights_problem(spec.kind, weights, settings)) is not None:
        print(f"visionstream: error: --weights {escape(args.weights)}: {problem}", file=sys.stderr)
        return 2
    if args.action == "canary" and not (0 < args.share < 1 and args.min_labelled >= 1 and 0 <= args.max_drop <= 1):
        print("visionstream: error: model canary needs 0 < --share < 1, --min-labelled >= 1 and 0 <= --max-drop <= 1", file=sys.stderr)
        return 2
    canary = (args.share, args.min_labelled, args.max_drop) if args.action == "canary" else None
    return asyncio.run(_set(settings, args.name, weights, args.sha256, args.wait, args.timeout, canary))


def weights_problem(kind: str, weights: str, settings: Settings) -> str | None:
    """Why ``weights`` cannot be loaded, as far as this machine can tell (None: it may be)."""
    if kind == "checkpoint" and weights.startswith(("s3://", "s3a://")):
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        from inference.records.objects import split_s3_uri

        bucket, key = split_s3_uri(weights)
        try:
            boto3.client("s3", **settings.storage.boto3_kwargs()).head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            return {"404": "no such object", "NoSuchKey": "no such object", "403": "access denied to it", "AccessDenied": "access denied to it"}.get(code, f"cannot be read: {code}")
        except BotoCoreError as exc:
            return f"the store cannot be reached: {type(exc).__name__}"
        return None
    if kind == "checkpoint" and "://" not in weights:
        path = Path(weights)
        if not path.is_file():
            return "no such file"
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            return f"cannot be read: {exc.strerror or exc}"
    return None


async def _set(
    settings: Settings, name: str | None, weights: str, digest: str | None, wait: bool, timeout_s: float,
    canary: tuple[float, int, float] | None = None,
) -> int:
    from streams.service.canary import CanaryRule
    from streams.service.kafka import TopicTail, ensure_topics, start_producer
    from streams.service.models import FAILED, SET_KEY, canary_command, latest_choice, parse, set_command

    topics = settings.topics
    await ensure_topics(settings.kafka, topics, [topics.models])
    tail = TopicTail(settings.kafka, topics.models)
    history = await tail.start(idle_s=1.0)  # before publishing: no outcome is missed
    try:
        in_force = latest_choice(history)
        model_name = name or (in_force.name if in_force else settings.model.name)
        if canary is None:
            command, key, verb = set_command(model_name, weights, digest), SET_KEY, "model set"
        else:
            share, least, drop = canary
            command, verb = canary_command(model_name, weights, share, CanaryRule(least, drop), digest), "model canary"
            key = f"canary/{command['id']}".encode()
        producer = await start_producer(settings.kafka)
        try:
            await producer.send_and_wait(topics.models, json.dumps(command).encode(), key=key)
        finally:
            await producer.stop()
        print(f"{verb} {command['id'][:8]}: {command['model']['name']} with weights {escape(weights)} published to {topics.models}", flush=True)
        if not wait:
            return 0
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            for value in await tail.new():
                record = parse(value)
                if record is None or record["id"] != command["id"] or record["kind"] in ("set", "canary", "promoted", "rolled-back"):
                    continue
                member = escape(str(record.get("member")))
                if record["kind"] == FAILED:
                    print(f"{verb} {command['id'][:8]}: failed on {member}, the model in use kept: {escape(str(record.get('reason')))}", file=sys.stderr)
                    return 1
                if canary is not None:
                    print(f"model canary {command['id'][:8]}: {member} sends {canary[0]:.0%} of the images to version "
                          f"{escape(str(record.get('version')))}; `visionstream model status` shows its verdict")
                else:
                    print(f"model set {command['id'][:8]}: {member} now serves version {escape(str(record.get('version')))}")
                return 0
            await asyncio.sleep(0.5)
        print(f"visionstream: error: no stream worker answered within {timeout_s:g} s (is one running? `visionstream model status` shows later answers)", file=sys.stderr)
        return 1
    finally:
        await tail.stop()


def _status(settings: Settings) -> int:
    from streams.service.kafka import TopicTail
    from streams.service.models import FAILED, SET, parse, standing_choice

    async def read() -> list[bytes | None]:
        tail = TopicTail(settings.kafka, settings.topics.models)
        try:
            return await tail.start(idle_s=1.0)
        finally:
            await tail.stop()

    values = asyncio.run(read())
    records = [record for value in values if (record := parse(value)) is not None]
    commands = [record for record in records if record["kind"] == SET]
    canaries = [record for record in records if record["kind"] == "canary"]
    if canaries:
        latest_canary = canaries[-1]
        model = latest_canary.get("model") or {}
        verdicts = [record for record in records if record["id"] == latest_canary["id"] and record["kind"] in ("promoted", "rolled-back")]
        state = verdicts[-1]["kind"] if verdicts else "running"
        print(f"canary: {latest_canary['id'][:8]} {escape(str(model.get('name')))} weights {escape(str(model.get('weights')))} "
              f"on {latest_canary.get('share')} of the images: {state}")
        for record in verdicts[-1:]:
            for side in ("serving", "candidate"):
                numbers = (record.get("stats") or {}).get(side) or {}
                print(f"  {side}: " + escape(", ".join(f"{key} {value}" for key, value in numbers.items())))
            print(f"  {escape(str(record.get('reason')))}")
    if not commands:
        print(f"no `model set` on {settings.topics.models}: every stream worker serves its configured model "
              f"({settings.model.name}, weights {escape(settings.model.weights)})")
        return 0
    standing = standing_choice(values)
    shown = [("latest", commands[-1])]
    if standing is None:
        shown.append(("in force", None))
    elif standing.id != commands[-1]["id"]:
        shown.append(("in force", next(command for command in commands if command["id"] == standing.id)))
    else:
        shown = [("in force", commands[-1])]
    for label, command in shown:
        if command is None:
            print(f"in force: the configured model ({settings.model.name}, weights {escape(settings.model.weights)})")
            continue
        model = command.get("model") or {}
        print(f"{label}: {command['id'][:8]} {escape(str(model.get('name')))} weights {escape(str(model.get('weights')))} (set {escape(str(command.get('at')))})")
        for outcome in (record for record in records if record["id"] == command["id"] and record["kind"] != SET):
            said = f"failed, the model in force kept: {outcome.get('reason')}" if outcome["kind"] == FAILED else f"serves version {outcome.get('version')}"
            print(f"  {escape(str(outcome.get('member')))}: {escape(said)}")
    return 0
