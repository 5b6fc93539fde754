"""The model topic's records and the rules that follow them (``streams.service.models``): pure
logic, with a stand-in for the cluster's swap; the swap itself runs on a real stack in
tests/integration/test_models.py."""

import asyncio

import pytest
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

    async def publish(event: dict, key=None) -> None:
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

    async def publish(event, key=None):
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


# --- canaries --------------------------------------------------------------------------------

from streams.service.canary import PROMOTE, ROLL_BACK, CanaryRule, Tally, verdict  # noqa: E402
from streams.service.models import CANARY, PROMOTED, ROLLED_BACK, SET, canary_command, canary_of  # noqa: E402


def tally(labelled: int, matched: int) -> Tally:
    return Tally(predicted=labelled, labelled=labelled, matched=matched, confidence_sum=0.5 * labelled)


def test_a_canary_is_promoted_when_not_worse_rolled_back_when_worse_and_never_runs_forever():
    rule = CanaryRule(min_labelled=100, max_drop=0.02)
    assert verdict(tally(1000, 800), tally(99, 99), rule)[0] is None  # too few on the candidate
    assert verdict(tally(1000, 800), tally(400, 330), rule)[0] == PROMOTE  # 0.825 against 0.80
    assert verdict(tally(1000, 800), tally(400, 240), rule)[0] == ROLL_BACK  # 0.60: clearly worse
    assert verdict(tally(1000, 800), tally(100, 78), rule)[0] is None  # 0.78: could be either, keep counting
    decision, why = verdict(tally(20000, 16000), tally(1000, 788), rule)
    assert decision == ROLL_BACK and "inconclusive" in why  # ten times the minimum without an answer
    assert verdict(tally(0, 0), tally(100, 50), rule)[0] is None  # nothing to compare with yet
    assert verdict(tally(300, 0), tally(100, 0), rule)[0] == PROMOTE  # both wrong alike (random weights): not worse
    assert verdict(tally(300, 300), tally(100, 0), rule)[0] == ROLL_BACK


@given(st.integers(0, 500), st.integers(0, 500), st.integers(1, 500), st.integers(0, 500))
def test_the_verdict_is_defined_for_any_counts(serving_labelled, serving_matched, candidate_labelled, candidate_matched):
    serving = tally(serving_labelled, min(serving_matched, serving_labelled))
    candidate = tally(candidate_labelled, min(candidate_matched, candidate_labelled))
    decision, why = verdict(serving, candidate, CanaryRule(min_labelled=50))
    assert decision in (None, PROMOTE, ROLL_BACK) and why


def test_canary_commands_are_checked_as_they_are_read():
    command = canary_command("resnet18", "c.pt", 0.1, CanaryRule(200, 0.02))
    choice, share, rule = canary_of(parse(encoded(command)))
    assert (choice.weights, share, rule) == ("c.pt", 0.1, CanaryRule(200, 0.02))
    for broken in ({"share": 0}, {"share": 1.5}, {"share": True}, {"min_labelled": 0}, {"max_drop": -1}, {"min_labelled": "7"}):
        assert canary_of(parse(encoded({**command, **broken}))) is None, broken


class FakeCanaryCluster:
    def __init__(self) -> None:
        self.share: float | None = None
        self.ended = 0

    async def start_canary(self, model, share):
        self.share = share
        return "sha256:candidate"

    def end_canary(self) -> None:
        self.share, self.ended = None, self.ended + 1

    async def serving_version(self):
        return "sha256:serving"


def follower_with_canary(counts: dict[str, Tally]):
    said: list[tuple[dict, bytes | None]] = []
    cluster = FakeCanaryCluster()

    async def swap(model):
        return "v"

    async def publish(event, key=None):
        said.append((event, key))

    follower = ModelFollower(CONFIGURED, swap, publish, "pod-a:1", canary=cluster, tallies=lambda: counts)
    return follower, cluster, said


def test_a_canary_that_keeps_up_is_promoted_by_a_set_command_for_the_candidate():
    counts = {"sha256:serving": tally(50, 40)}
    follower, cluster, said = follower_with_canary(counts)
    command = canary_command("resnet18", "c.pt", 0.25, CanaryRule(min_labelled=20, max_drop=0.05))
    asyncio.run(follower.follow([encoded(command)]))
    assert cluster.share == 0.25 and follower.running is not None
    assert said[0][0]["kind"] == SWAPPED and said[0][0]["version"] == "sha256:candidate"
    counts["sha256:serving"] = tally(150, 120)  # 100 more, 80 matched: 0.80 since the canary began
    counts["sha256:candidate"] = tally(40, 38)  # 0.95
    asyncio.run(follower.follow([]))
    kinds = [(event["kind"], key) for event, key in said[1:]]
    assert kinds == [(PROMOTED, None), (SET, b"set")]
    verdict_event, promotion = said[1][0], said[2][0]
    assert verdict_event["stats"]["candidate"]["top1"] == 0.95 and verdict_event["stats"]["serving"]["top1"] == 0.8
    assert promotion["model"]["weights"] == "c.pt" and promotion["because"] == command["id"]
    assert follower.running is None and cluster.ended == 0  # the set command swaps; until then the canary goes on


def test_a_canary_that_falls_behind_is_rolled_back_everywhere():
    counts = {"sha256:serving": tally(10, 10)}
    follower, cluster, said = follower_with_canary(counts)
    command = canary_command("resnet18", "random", 0.5, CanaryRule(min_labelled=10, max_drop=0.02))
    asyncio.run(follower.follow([encoded(command)]))
    counts["sha256:serving"] = tally(40, 40)
    counts["sha256:candidate"] = tally(30, 0)
    asyncio.run(follower.follow([]))
    assert [event["kind"] for event, _ in said] == [SWAPPED, ROLLED_BACK] and cluster.ended == 1
    # another stream worker reads the verdict and stops routing to the candidate too
    other, other_cluster, _ = follower_with_canary({"sha256:serving": tally(5, 5)})
    asyncio.run(other.follow([encoded(command)]))
    assert other_cluster.share == 0.5
    asyncio.run(other.follow([encoded(said[1][0])]))
    assert other.running is None and other_cluster.ended == 1
    # a worker that starts later neither resumes the decided canary nor replays it
    late, late_cluster, _ = follower_with_canary({})
    late.start_with([encoded(command), encoded(said[1][0])])
    asyncio.run(late.follow([encoded(command)]))
    assert late_cluster.share is None


def test_a_canary_without_a_verdict_is_taken_up_by_a_worker_that_starts():
    follower, cluster, _ = follower_with_canary({})
    command = canary_command("resnet18", "c.pt", 0.1, CanaryRule())
    assert follower.start_with([encoded(command)]) == CONFIGURED  # the serving model stays the configured one
    asyncio.run(follower.follow([]))  # the first round after start: the canary read at start
    assert cluster.share == 0.1 and CANARY == command["kind"]
    asyncio.run(follower.follow([encoded(command)]))  # read again: started once
    assert follower.running is not None


def test_an_operators_model_set_ends_a_running_canary():
    follower, cluster, _ = follower_with_canary({"sha256:serving": tally(5, 5)})
    asyncio.run(follower.follow([encoded(canary_command("resnet18", "c.pt", 0.2, CanaryRule()))]))
    assert cluster.share == 0.2
    asyncio.run(follower.follow([encoded(set_command("resnet18", "other.pt"))]))
    assert follower.running is None and cluster.ended == 1


def test_a_configured_canary_is_published_once_for_every_worker_and_never_again_once_decided():
    from inference.settings import CanarySettings
    from streams.service.models import ModelControl, configured_canary, verdict_event

    configured = CONFIGURED.model_copy(update={"canary": CanarySettings(weights="s3://models/c.pt", share=0.2, min_labelled=50)})
    topic: list[bytes] = []

    class Tail:
        topic = "models"

        async def start(self):
            return list(topic)

    def member(name: str):
        cluster = FakeCanaryCluster()

        async def publish(event, key=None):
            topic.append(encoded(event))

        async def swap(model):
            return "v"

        follower = ModelFollower(configured, swap, publish, name, canary=cluster, tallies=dict)
        return ModelControl(follower, Tail(), configured), cluster

    first, first_cluster = member("pod-a:1")
    assert asyncio.run(first.starting_model()) == configured  # the serving model: the configured one
    [published] = [parse(value) for value in topic]
    assert published["kind"] == CANARY and published["id"] == configured_canary(configured)["id"] and published["share"] == 0.2
    second, second_cluster = member("pod-b:2")
    asyncio.run(second.starting_model())
    assert len(topic) == 1  # the same canary, not a second one
    asyncio.run(second.follower.follow([]))  # taken up from the topic read at start
    assert second_cluster.share == 0.2
    topic.append(encoded(verdict_event(published["id"], "pod-b:2", ROLLED_BACK, "worse", {})))
    third, third_cluster = member("pod-c:3")
    asyncio.run(third.starting_model())
    asyncio.run(third.follower.follow([]))
    assert len([value for value in topic if parse(value)["kind"] == CANARY]) == 1 and third_cluster.share is None  # decided: never again
    # the canary setting is no part of the model the workers load
    from inference.settings import ImageSettings, StorageSettings
    from inference.worker.plugin import plugin_name

    assert plugin_name(configured, ImageSettings(), StorageSettings(), 60) == plugin_name(CONFIGURED, ImageSettings(), StorageSettings(), 60)


def test_a_failed_swap_never_unregisters_the_model_in_use():
    """`model set` with the weights already in use, while one worker's copy failed: the swap fails,
    and the serving model stays registered (only a candidate of its own is taken back)."""
    from inference.client.cluster import InferenceCluster
    from inference.errors import ModelSwapFailed
    from inference.settings import ClusterSettings, ImageSettings, StorageSettings

    class Client:
        def __init__(self) -> None:
            self.unregistered: list[str] = []

        async def register_plugin(self, plugin, name):
            return {}

        async def run(self, function, name):
            return {"tcp://w1": {"present": True, "loaded": False, "version": None, "failure": "MemoryError: out of memory"}}

        async def unregister_worker_plugin(self, name):
            self.unregistered.append(name)

    model = ModelSettings(name="resnet18", weights="none", compile=False)
    cluster = InferenceCluster(ClusterSettings(scheduler="tcp://127.0.0.1:1"), model, ImageSettings(), StorageSettings(), r"(?P<wnid>n\d{8})")
    cluster.client = Client()
    with pytest.raises(ModelSwapFailed, match="out of memory"):
        asyncio.run(cluster.swap(model))  # the model in use
    assert cluster.client.unregistered == []
    with pytest.raises(ModelSwapFailed):
        asyncio.run(cluster.swap(model.model_copy(update={"weights": "other.pt"})))  # a candidate: taken back
    assert len(cluster.client.unregistered) == 1 and cluster.client.unregistered[0] != cluster.plugin.name
