"""The model topic's records and the rules that follow them (``streams.service.models``): pure
logic, with a stand-in for the cluster's swap; the swap itself runs on a real stack in
tests/integration/test_models.py."""

import asyncio
import json

from hypothesis import given, strategies as st

from inference.settings import ModelSettings
from streams.service.models import (
    FAILED, SWAPPED, ModelChoice, ModelFollower, choice_of, latest_choice, outcome_event, parse, set_command, standing_choice,
)

CONFIGURED = ModelSettings(name="resnet50", weights="DEFAULT", compile=False)


def encoded(record: dict) -> bytes:
    return json.dumps(record).encode()


def outcome(command: dict, ok: bool) -> bytes:
    return encoded(outcome_event(choice_of(command), "pod-a:1", ok, version="v" if ok else None, reason=None if ok else "no"))


@given(st.binary(max_size=2000) | st.text(max_size=500).map(str.encode))
def test_whatever_bytes_are_on_the_model_topic_are_a_record_of_ours_or_none(value):
    record = parse(value)
    assert record is None or (record["schema"] == "visionstream.model/v1" and isinstance(record["id"], str))


@given(st.dictionaries(st.sampled_from(["schema", "kind", "id", "model", "at"]), st.none() | st.integers() | st.text(max_size=20) | st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)))
def test_a_record_of_any_shape_makes_a_choice_or_none(record):
    parsed = parse(encoded(record))
    choice = choice_of(parsed) if parsed is not None else None
    assert choice is None or (choice.name and choice.weights)


def test_the_standing_choice_passes_over_commands_whose_model_failed_to_load():
    first, second, third = set_command("resnet50", "a.pt"), set_command("resnet50", "b.pt"), set_command("resnet50", "c.pt")
    assert standing_choice([]) is None
    assert standing_choice([encoded(first)]).weights == "a.pt"  # nobody tried it yet: in force
    values = [encoded(first), outcome(first, True), encoded(second), outcome(second, False)]
    assert standing_choice(values).weights == "a.pt" and latest_choice(values).weights == "b.pt"
    values += [encoded(third), outcome(third, True), b"not json", encoded({"schema": "other"})]
    assert standing_choice(values).weights == "c.pt"


def test_a_follower_swaps_on_each_new_command_once_and_keeps_its_model_when_a_load_fails():
    swapped, said, counted = [], [], []

    async def swap(model: ModelSettings) -> str:
        if model.weights == "broken.pt":
            raise RuntimeError("not a torch state_dict file")
        swapped.append(model)
        return f"sha256:{model.weights}"

    async def publish(event: dict) -> None:
        said.append(event)

    follower = ModelFollower(CONFIGURED, swap, publish, "pod-a:1", counted.append)
    good, broken = set_command("resnet18", "good.pt"), set_command("resnet18", "broken.pt")
    asyncio.run(follower.follow([encoded(good), encoded(good), b"\xff", encoded(broken)]))
    assert [model.weights for model in swapped] == ["good.pt"]  # once, though read twice
    assert swapped[0].precision == CONFIGURED.precision and swapped[0].compile is False  # only name and weights change
    assert follower.model.weights == "good.pt"  # the failed one kept it
    assert [(event["kind"], event["id"]) for event in said] == [(SWAPPED, good["id"]), (FAILED, broken["id"])]
    assert said[0]["version"] == "sha256:good.pt" and "not a torch state_dict" in said[1]["reason"]
    assert counted == [SWAPPED, FAILED]
    asyncio.run(follower.follow([encoded(broken)]))
    assert len(said) == 2  # a failed command is not tried again by this worker


def test_a_restarted_follower_starts_with_the_standing_model_and_does_not_replay_old_commands():
    first, failed = set_command("resnet18", "a.pt"), set_command("resnet18", "broken.pt")
    history = [encoded(first), outcome(first, True), encoded(failed), outcome(failed, False)]
    tried = []

    async def swap(model):
        tried.append(model)
        return "v"

    async def publish(event):
        return None

    follower = ModelFollower(CONFIGURED, swap, publish, "pod-b:2")
    model = follower.start_with(history)
    assert (model.name, model.weights) == ("resnet18", "a.pt")
    asyncio.run(follower.follow(history))  # the same records again: nothing to do
    assert tried == []
    assert ModelFollower(CONFIGURED, swap, publish, "pod-c:3").start_with([]) == CONFIGURED


def test_a_choice_changes_only_the_model_name_and_weights():
    choice = ModelChoice("id", "resnet18", "s3://models/r18.pt", "a" * 64)
    model = choice.applied_to(CONFIGURED.model_copy(update={"precision": "bf16", "top_k": 3}))
    assert (model.name, model.weights, model.weights_sha256, model.precision, model.top_k) == ("resnet18", "s3://models/r18.pt", "a" * 64, "bf16", 3)
