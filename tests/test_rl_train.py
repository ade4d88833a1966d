"""Echo end to end on real in-process hosts: a trainer peer and two sampler peers
(tiny random Llama, the whole model each) train by GRPO, the samplers pulling each
new version from the trainer and from each other.

The task is a trivially learnable reward: every prompt's answer is "7", and a random
model says "7" now and then; GRPO makes it say "7" more.
"""

from __future__ import annotations

import gc
import json
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import peerd.rl.training as training_module
from peerd.api.app import create_app
from peerd.proven import AGAIN_BAN_S, ProofFile
from peerd.rl.policy import Generation
from peerd.rl.rollouts import push_rollouts
from peerd.rl.run import RunSpec
from peerd.rl.tasks import Task
from peerd.rl.training import LIARS_FILE, Run, Training
from protocols.rollout import RolloutRequest, SignedRollout
from tests.harness import events, wait_for
from tests.models import tiny_llama_dir
from tests.rl_swarm import lie, rl_swarm, seven_task


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@pytest.fixture
def task(tmp_path: Path) -> Path:
    return seven_task(tmp_path)


async def finished(training: Training, spec: RunSpec, timeout_s: float = 120.0) -> Run:
    run = await training.start_run(spec)
    with trio.fail_after(timeout_s):
        await run.ended.wait()
    assert run.state == "done", run.to_json()
    return run


def rewards(run: Run) -> list[float]:
    lines = (run.dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["reward"] for line in lines]


def spec(tiny: Path, task: Path, **kw: Any) -> RunSpec:
    settings: dict[str, Any] = {"model": str(tiny), "task": str(task), "group": 8,
                                "batch": 4, "steps": 6, "max_tokens": 3, "lr": 0.02,
                                "seed": 1, "checkpoint_every": 3} | kw
    return RunSpec(**settings)


async def test_sync_training_learns_and_samplers_follow(tmp_path: Path, tiny: Path,
                                                        task: Path) -> None:
    async with rl_swarm(tmp_path, tiny) as (training, samplers):
        run = await finished(training, spec(tiny, task, run_id="sync"))
        got = rewards(run)
        print("rewards", got)
        out = run.to_json()
        assert out["step"] == 6 and out["version"] == 6
        assert out["staleness"] == {"0": 6 * 4 * 8}  # sync: every rollout on-policy
        await wait_for(lambda: all(s.sampler.policy.version == 6 for s in samplers))
        assert (run.dir / "reward.png").stat().st_size > 0
        assert (run.dir / "summary.json").is_file()


async def test_async_at_staleness_0_is_sync_and_async_runs_ahead(
        tmp_path: Path, tiny: Path, task: Path) -> None:
    async with rl_swarm(tmp_path / "a", tiny) as (training, _):
        sync = rewards(await finished(training, spec(tiny, task, run_id="s", steps=4)))
    async with rl_swarm(tmp_path / "b", tiny) as (training, _):
        zero = rewards(await finished(training, spec(tiny, task, run_id="z", steps=4,
                                                     mode="async", staleness=0)))
    async with rl_swarm(tmp_path / "c", tiny) as (training, samplers):
        ahead = await finished(training, spec(tiny, task, run_id="a", steps=4, mode="async",
                                              staleness=1))
        # async: the samplers took orders and pushed what they made; what the buffer
        # admitted was trained on, still waits, or aged past S in the queue (then its
        # prompt was asked again), so a slow step may admit more than it trains
        pushed = [e for s in samplers for e in events(s.node, "rollout.pushed")]
        report = ahead.to_json()
        aged = sum(v for k, v in report["refused"].items() if k.endswith("_at_train"))
        assert sum(e.data["admitted"] for e in pushed) == report["admitted"]
        assert report["admitted"] == 4 * 4 * 8 + report["waiting"] + aged, report
    print("sync", sync, "async S=0", zero)
    assert zero == sync  # the same prompts, seeds and versions: the same updates
    staleness = report["staleness"]
    assert set(staleness) <= {"0", "1"} and sum(staleness.values()) == 4 * 4 * 8



async def test_a_slow_sampler_is_asked_for_a_smaller_share_of_each_step(
        tmp_path: Path, tiny: Path, task: Path) -> None:
    """Requests carry a sampler's share of a step, in proportion to the prompts a
    second it delivered: a sampler made slow (1 s more a request) is soon asked for
    fewer prompts than the fast one, and the steps do not wait on it for half."""
    async with rl_swarm(tmp_path, tiny) as (training, (fast, slow)):
        honest = slow.sampler.policy.generate_many

        async def slower(*args: Any, **kw: Any) -> Generation:
            await trio.sleep(1.0)
            return await honest(*args, **kw)

        slow.sampler.policy.generate_many = slower
        run = await finished(training, spec(tiny, task, run_id="shares", batch=8, group=2,
                                            steps=6))
        assert run.to_json()["samples"] == 6 * 8 * 2
        made = [s.sampler.rollouts_produced for s in (fast, slow)]
        served = [s.sampler.requests_served for s in (fast, slow)]
        print("rollouts", made, "requests", served)
        # equal shares would be even (48 and 48); the first step is shared equally
        assert made[0] > 1.5 * made[1], (made, served)


async def test_a_lying_sampler_is_dropped_and_training_goes_on(tmp_path: Path, tiny: Path,
                                                               task: Path) -> None:
    async with rl_swarm(tmp_path, tiny) as (training, (_honest, liar)):
        lie(liar, 0.5)
        run = await finished(training, spec(tiny, task, run_id="lie", steps=3))
        out = run.to_json()
        liar_id = liar.node.peer_id
        assert liar_id in out["dropped"] and "log-probs" in out["dropped"][liar_id]
        assert out["refused"].get("verification", 0) > 0
        assert training.node.offences[liar_id]["rl_lie"] == 1
        assert out["step"] == 3  # the honest sampler carried the run
        assert out["last"]["verify_max_dev"] <= run.spec.verify_tolerance  # the honest one
        # no later run of this trainer asks it, for a day, nor does a restarted trainer
        await wait_for(lambda: (training.root / LIARS_FILE).exists(), 5, "liars.json")
        asked = liar.sampler.requests_served
        later = (await finished(training, spec(tiny, task, run_id="later", steps=1))).to_json()
        assert "earlier run" in later["dropped"][liar_id]
        assert liar.sampler.requests_served == asked
        restarted = ProofFile(training.root / LIARS_FILE, first_s=AGAIN_BAN_S).book
        assert restarted.proofs(liar_id) == 1
        assert restarted.banned(time.time())[liar_id][0] > 23 * 3600


async def test_a_lie_in_groups_that_train_is_caught_by_the_training_forward(
        tmp_path: Path, tiny: Path, task: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewards that differ within a group (by the completion's length) make the groups
    train, so the check is the training forward's own (fused): the step with the lie is
    refused before the optimiser moves, the liar dropped, and the step trained on the
    honest sampler's groups."""
    monkeypatch.setattr(Task, "reward", lambda self, text, answer: float(len(text) % 2))
    async with rl_swarm(tmp_path, tiny) as (training, (_honest, liar)):
        lie(liar, 0.5)
        run = await finished(training, spec(tiny, task, run_id="fused", steps=3))
        out = run.to_json()
        liar_id = liar.node.peer_id
        assert out["refused_steps"] >= 1, out
        assert out["refused"].get("verification", 0) > 0
        assert liar_id in out["dropped"] and "log-probs" in out["dropped"][liar_id]
        assert training.node.offences[liar_id]["rl_lie"] == 1
        assert out["step"] == 3 and out["skipped_groups"] < 3 * run.spec.batch
        assert out["last"]["verify_max_dev"] <= run.spec.verify_tolerance  # the honest one
        # a refused step writes no line: each step trained once
        lines = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines] == [1, 2, 3]


async def test_a_sampler_killed_mid_run_leaves_the_others_to_finish(
        tmp_path: Path, tiny: Path, task: Path) -> None:
    async with rl_swarm(tmp_path, tiny) as (training, (survivor, doomed)):
        run = await training.start_run(spec(tiny, task, run_id="kill", steps=4,
                                            sampler_timeout_s=5.0))
        await wait_for(lambda: run.to_json()["step"] >= 1, timeout_s=60)
        await doomed.node.host.close()  # gone, mid-run, without a word
        with trio.fail_after(120):
            await run.ended.wait()
        out = run.to_json()
        assert run.state == "done" and out["step"] == 4, out
        assert survivor.sampler.policy.version >= 3


async def test_a_trainer_resumes_at_its_step_and_version(tmp_path: Path, tiny: Path,
                                                         task: Path) -> None:
    async with rl_swarm(tmp_path, tiny) as (training, samplers):
        first = await finished(training, spec(tiny, task, run_id="r", steps=3))
        assert first.to_json()["version"] == 3
        again = await finished(training, spec(tiny, task, run_id="r", steps=5, resume=True,
                                              out=str(first.dir)))
        out = again.to_json()
        # steps go on from the checkpoint; versions move past anything published
        assert out["step"] == 5 and out["version"] == 3 + 1 + 2
        lines = [json.loads(x) for x in (first.dir / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == [1, 2, 3, 4, 5]
        # the last version reaches the samplers on its announcement, after the run ends
        await wait_for(lambda: all(s.sampler.policy.version == 6 for s in samplers))
        # the accounting goes on too: every rollout trained on, across the restart
        assert sum(out["staleness"].values()) == 5 * 4 * 8


async def test_lora_runs_send_only_the_adapters(tmp_path: Path, tiny: Path,
                                                task: Path) -> None:
    async with rl_swarm(tmp_path, tiny, samplers=1) as (training, (sampler,)):
        run = await finished(training, spec(tiny, task, run_id="lora", steps=3,
                                            update="lora", lora_rank=4, lr=0.05))
        await wait_for(lambda: sampler.sampler.policy.version == 3)
        held = training.weights.manifest("lora", 3)
        assert held is not None and held.kind == "lora"
        assert {t.name.rsplit(".", 1)[1] for t in held.tensors} == {"lora_A", "lora_B"}
        assert run.to_json()["step"] == 3


async def test_a_run_without_samplers_fails_saying_what_it_looked_for(
        tmp_path: Path, tiny: Path, task: Path) -> None:
    async with rl_swarm(tmp_path, tiny, samplers=0) as (training, _):
        run = await training.start_run(spec(tiny, task, run_id="alone", sampler_wait_s=2.0))
        with trio.fail_after(60):
            await run.ended.wait()
        assert run.state == "failed"
        assert "no sampler" in run.error and "--rollout" in run.error


async def test_a_sampler_takes_up_the_next_run_once_the_last_is_quiet(
        tmp_path: Path, tiny: Path, task: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("peerd.rl.sampler.RUN_IDLE_S", 0.5)
    async with rl_swarm(tmp_path, tiny, samplers=1) as (training, (sampler,)):
        await finished(training, spec(tiny, task, run_id="one", steps=2))
        await wait_for(lambda: sampler.sampler.policy.version == 2)
        await trio.sleep(0.6)
        two = await finished(training, spec(tiny, task, run_id="two", steps=2))
        assert sampler.sampler.run_id == "two"
        await wait_for(lambda: sampler.sampler.policy.version == 2)
        assert two.to_json()["staleness"] == {"0": 2 * 4 * 8}


async def test_a_sampler_on_old_weights_that_says_it_is_current_is_caught(
        tmp_path: Path, tiny: Path, task: Path) -> None:
    """The users' complaint "samplers silently generating with old weights": a sampler
    that takes each version's number but not its weights is found out by its
    log-probs, dropped, and the run finishes on the honest one."""
    async with rl_swarm(tmp_path, tiny) as (training, (_honest, stale)):
        policy = stale.sampler.policy

        async def number_only(version: int, **_: Any) -> None:
            policy.version = version  # the tag moves; the weights do not

        policy.apply = number_only
        run = await finished(training, spec(tiny, task, run_id="old", steps=4, lr=0.05))
        out = run.to_json()
        assert stale.node.peer_id in out["dropped"], out
        assert training.node.offences[stale.node.peer_id]["rl_lie"] == 1
        assert out["step"] == 4


async def test_pushes_nobody_ordered_are_refused_by_reason(
        tmp_path: Path, tiny: Path, task: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before any rollout is read, honest or junk (256 of 24 kB with bad
    signatures: each was decoded and counted an offence), and not an offence: a late
    push of an order that timed out is honest."""
    import peerd.rl.rollouts as rollouts

    pushed: set[bytes] = set()  # the bodies pushed (the run's own requests verify theirs)
    checked: list[object] = []
    real = rollouts.verified

    def counted(signed: SignedRollout, **kw: Any) -> Any:
        if signed.body in pushed:
            checked.append(signed)
        return real(signed, **kw)

    monkeypatch.setattr(rollouts, "verified", counted)
    junk = [SignedRollout(body=b"\x00" * 24_000, sig=b"\x00" * 64)] * 256
    async with rl_swarm(tmp_path, tiny, samplers=1) as (training, (sampler,)):
        node, trainer = sampler.node, training.node.peer_id
        order = RolloutRequest(run_id="r", prompts=("Say a number (0)",), group=8,
                               temperature=1.0, top_p=1.0, max_tokens=3, seed=1, version=0,
                               mode="async")
        made = await sampler.sampler.produce(order, trainer)
        pushed.update(s.body for s in [*made, *junk])
        ack = await push_rollouts(node, trainer, "r", made)  # no such run here
        assert (ack.admitted, ack.refused) == (0, {"no_such_run": 8})
        ack = await push_rollouts(node, trainer, "r", junk)
        assert (ack.admitted, ack.refused) == (0, {"no_such_run": 256})
        run = await training.start_run(spec(tiny, task, run_id="r", steps=2))
        await wait_for(lambda: run.trainer is not None)
        ack = await push_rollouts(node, trainer, "r", made)  # a sync run orders nothing
        assert (ack.admitted, ack.refused) == (0, {"unasked": 8})
        ack = await push_rollouts(node, trainer, "r", junk)
        assert (ack.admitted, ack.refused) == (0, {"unasked": 256})
        assert checked == [] and not training.node.offences.get(node.peer_id)
        with trio.fail_after(60):
            await run.ended.wait()
        # (groups refused, times the group size)
        assert run.state == "done" and run.to_json()["refused"].get("unasked") == 2 * 8


async def test_a_stopped_run_checkpoints_where_it_stopped_and_resumes_there(
        tmp_path: Path, tiny: Path, task: Path) -> None:
    async with rl_swarm(tmp_path, tiny, samplers=1) as (training, _):
        run = await training.start_run(spec(tiny, task, run_id="st", steps=50,
                                            checkpoint_every=100))
        await wait_for(lambda: run.to_json()["step"] >= 2, timeout_s=60)
        run.stop()
        with trio.fail_after(60):
            await run.ended.wait()
        out = run.to_json()
        assert run.state == "stopped" and 2 <= out["step"] < 50
        saved = sorted(p.name for p in (run.dir / "checkpoints").iterdir())
        assert saved[-1] == f"step-{out['step']:08d}"
        again = await finished(training, spec(tiny, task, run_id="st", steps=out["step"] + 1,
                                              resume=True, out=str(run.dir)))
        assert again.to_json()["step"] == out["step"] + 1


async def test_an_older_version_tag_is_checked_under_that_version(
        tmp_path: Path, tiny: Path, task: Path) -> None:
    """Async: a sampler that tags its rollouts one version older than the weights it
    used (they are then off-policy, and only the check of older versions, scoring them
    under the version they name, can tell) is found out and dropped. Staleness 2: at 1,
    a tag one older than the truth is admitted only while the trainer is still at the
    version that made it, and a sampler running a step ahead rarely is (its groups are
    then refused as stale, which keeps them out but names no liar)."""
    async with rl_swarm(tmp_path, tiny) as (training, (_honest, mistagged)):
        policy = mistagged.sampler.policy
        honest = policy.generate_many

        async def older(*args: Any, **kw: Any) -> Generation:
            got = await honest(*args, **kw)
            return Generation(max(0, got.version - 1), got.groups)

        policy.generate_many = older
        run = await finished(training, spec(tiny, task, run_id="tag", steps=12, lr=0.05,
                                            mode="async", staleness=2, verify_old=32))
        out = run.to_json()
        assert mistagged.node.peer_id in out["dropped"], out
        assert out["verified_old"] > 0 and out["step"] == 12


async def test_a_sampler_that_never_answers_is_timed_out_and_dropped(
        tmp_path: Path, tiny: Path, task: Path) -> None:
    async with rl_swarm(tmp_path, tiny) as (training, (_honest, mute)):
        async def never(*args: Any, **kw: Any) -> Generation:
            await trio.sleep_forever()
            raise AssertionError("unreachable")

        mute.sampler.policy.generate_many = never
        run = await training.start_run(spec(tiny, task, run_id="mute", steps=1000,
                                            sampler_timeout_s=0.5))
        # three deadlines in a row, and it is dropped; the other carries the run
        await wait_for(lambda: mute.node.peer_id in run.to_json()["dropped"], timeout_s=30)
        # its requests ran out of time (under load its weight pull may fail too, and
        # the drop then names that as the last failure)
        failed = [e.data["error"] for e in training.node.events.recent()
                  if e.type == "rl.sampler_failed" and e.data["peer_id"] == mute.node.peer_id]
        assert any("TooSlowError" in why for why in failed), failed
        step = run.to_json()["step"]
        await wait_for(lambda: run.to_json()["step"] >= step + 2, timeout_s=30)
        run.stop()
        with trio.fail_after(30):
            await run.ended.wait()
        assert run.state == "stopped"


async def test_a_run_forgets_trained_slots_and_an_ended_run_lets_go_of_its_model(
        tmp_path: Path, tiny: Path, task: Path) -> None:
    """What the trainer keeps by slot is of the slots still to train, at most a step's
    slots for each step it may run ahead and the one in hand (it was every slot of the
    run); once a run ends its learner (the model, the optimiser state) is let go, its
    weight store keeps its last version only, and GET and /metrics still give its
    counts."""
    batch, ahead, steps = 4, 1, 10
    async with rl_swarm(tmp_path, tiny) as (training, _):
        run = await training.start_run(spec(tiny, task, run_id="light", batch=batch,
                                            steps=steps, mode="async", staleness=ahead))
        sizes: Counter[str] = Counter()
        learner: weakref.ref[Any] | None = None
        with trio.fail_after(180):
            while not run.ended.is_set():
                t = run.trainer
                if t is not None and t.learner is not None:
                    learner = learner or weakref.ref(t.learner.learner)
                    for name, kept in (("problems", t._problems),
                                       ("prompt_ids", t._prompt_ids),
                                       ("attempts", t.attempts),
                                       ("sampler_of", t.sampler_of)):
                        sizes[name] = max(sizes[name], len(kept))
                await trio.sleep(0.005)
        assert run.state == "done", run.to_json()
        print("most kept", dict(sizes))
        assert sizes["problems"] >= batch and max(sizes.values()) <= batch * (ahead + 2)
        assert learner is not None
        gc.collect()
        assert learner() is None  # nothing holds the model once the run has ended
        # nor more than its last version in the weight store (WeightStore.retire)
        assert [h.announce.version for h in training.weights.held.values()
                if h.announce.run_id == "light"] == [steps]
        app = create_app(training.node, "t0ken")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://peerd",
                                     headers={"Authorization": "Bearer t0ken"}) as client:
            got = (await client.get("/v1/rl/runs/light")).json()
            assert (got["state"], got["step"], got["version"]) == ("done", steps, steps)
            assert sum(got["staleness"].values()) == steps * batch * 8
            metrics = (await client.get("/metrics")).text
            assert f'peerd_rl_steps_total{{run="light"}} {float(steps)}' in metrics


async def test_only_the_newest_ended_runs_are_kept(tmp_path: Path, tiny: Path, task: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training_module, "KEEP_ENDED", 2)
    async with rl_swarm(tmp_path, tiny, samplers=1) as (training, _):
        for run_id in ("a", "b", "c", "d"):
            await finished(training, spec(tiny, task, run_id=run_id, steps=1, batch=1))
        assert list(training.runs) == ["c", "d"]
        await finished(training, spec(tiny, task, run_id="c", steps=2, batch=1,
                                      out=str(training.root / "c"), resume=True))
        assert list(training.runs) == ["d", "c"]  # a run of an id kept: now the newest


async def test_a_run_keeps_scecs_in_the_memory_without_moving_its_baseline(
        tmp_path: Path, tiny: Path, task: Path) -> None:
    """One SCEC per trained group (its first rollout), at most `memory_scecs` a run, kept
    as admission tasks; a policy sampling at temperature 1 is not the served model's
    greedy baseline, so the baseline does not move."""
    from peerd.inference.model.source import resolve
    from peerd.memory.scec import decode_scec
    from peerd.memory.scoring import number
    from peerd.memory.service import Memory
    from peerd.rl.policy import completion_seed

    async with rl_swarm(tmp_path, tiny, samplers=1) as (training, _):
        memory = Memory(training.node, None, tmp_path / "mem", embedder="hashing")
        await training.node.start(memory)
        training.scored = memory
        run = await finished(training, spec(tiny, task, run_id="kept", group=2, batch=2,
                                            steps=3, memory_scecs=4))
        assert run.to_json()["memory_scecs"] == {"kept": 4, "failed": 0}
        assert run.trainer is not None
        store = memory.live_store()
        vector = (await store.embed(["Say a number"]))[0]
        found = await store.similar_scecs(vector, 10, "seven")
        assert len(found) == 4  # 6 groups trained, the cap kept 4
        seeds = {completion_seed(run.trainer.seed(slot), 0, 0) for slot in range(6)}
        for stored, _ in found:
            scec = decode_scec(stored.body)
            assert scec.prompt.startswith("Say a number (") and scec.answer == "7"
            assert scec.model == resolve(str(tiny)).model_id  # the policy's model
            assert scec.version.startswith("kept@") and scec.memory == ()
            assert (scec.temperature, scec.top_p, scec.max_tokens) == (1.0, 1.0, 3)
            assert scec.seed in seeds and scec.scorer == "number"
            # the reward (0, 0.1, 1 or 1.1) as the SCEC's [0, 1] score: its correctness,
            # what the scorer gives on a replay of the same output
            assert scec.score == number(scec.output, "7")
        assert memory.baseline.snapshot() == {}  # nothing moved
        # the cap is the run's, not each start's: resumed, it keeps nothing more
        again = await finished(training, spec(tiny, task, run_id="kept", group=2, batch=2,
                                              steps=5, memory_scecs=4, resume=True,
                                              out=str(run.dir)))
        assert again.to_json()["step"] == 5
        assert again.to_json()["memory_scecs"] == {"kept": 4, "failed": 0}
        assert len(await store.similar_scecs(vector, 10, "seven")) == 4


async def test_a_run_on_a_peer_without_a_memory_keeps_nothing(
        tmp_path: Path, tiny: Path, task: Path) -> None:
    async with rl_swarm(tmp_path, tiny, samplers=1) as (training, _):
        run = await finished(training, spec(tiny, task, run_id="plain", group=2, batch=2,
                                            steps=1))
        assert "memory_scecs" not in run.to_json()


@pytest.mark.parametrize(("text", "reward", "score"), [
    ("7", 1.1, 1.0), ("It is 7.", 1.0, 1.0), ("8", 0.1, 0.0), ("no", 0.0, 0.0)])
def test_a_groups_scec_scores_the_rewards_correctness(text: str, reward: float,
                                                      score: float) -> None:
    """number_reward's 0.1 for a bare (wrong) number is no part of the SCEC's score: it
    is the `number` scorer's on the output, which a replay reproduces."""
    from peerd.memory.scoring import number
    from peerd.rl.scecs import group_scec
    from peerd.rl.tasks import Problem, number_reward
    from peerd.rl.types import Rollout

    assert number_reward(text, "7") == reward
    rollout = Rollout("r", 0, "0.1", (1, 2, 3), (4,), (-0.5,), 3, "peer", text, reward)
    scec = group_scec(RunSpec(model="m", run_id="r", max_tokens=3), "m", "seven",
                      Problem("Say a number", "7"), 11, (rollout, rollout))
    assert scec.score == score == number(text, "7")
    assert (scec.version, scec.prompt_tokens, scec.output) == ("r@3", 3, text)
