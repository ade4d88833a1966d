"""Echo on /metrics: the trainer's runs, this peer's sampler and its weights service,
read when scraped.

Like the shard server's and the weights service's collectors, these read the
counters the trainer and the sampler keep anyway (the figures `GET /v1/rl/runs` and
`/status` show), so nothing on the training or sampling path pays for metrics.

The trainer's series carry a `run` label (the run id; a resumed run keeps its id and
its counts, so its counters go on rising). Rollout counts are in completions: the
buffer counts groups, and a group is G completions of one version. What a sampler
spends pulling versions is on the weights service's `peerd_weights_pull_*`.

Staleness is a real histogram (`le` buckets at each whole version up to the run's
bound S, and +Inf): the bound is small, so every bucket is an exact count, and
`histogram_quantile` works on it as on any other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

if TYPE_CHECKING:
    from peerd.rl.rollout_service import Rollouts
    from peerd.rl.training import Run, Training
    from peerd.rl.weights import WeightStore


class TrainingCollector:
    """Every run this peer has trained (or is training), by run id."""

    def __init__(self, training: Training) -> None:
        self.training = training

    def collect(self) -> Iterator[Metric]:
        families = _RunFamilies()
        for run_id, run in list(self.training.runs.items()):
            families.add(run_id, run)
        yield from families.all()


class _RunFamilies:
    """One scrape's families of the trainer's series, filled run by run."""

    def __init__(self) -> None:
        run = ["run"]
        self.info = GaugeMetricFamily(
            "peerd_rl_run_info", "A run on this peer (always 1), with its mode, update "
            "and state", labels=["run", "mode", "update", "state"])
        self.admitted = CounterMetricFamily(
            "peerd_rl_rollouts_admitted", "Rollouts admitted to the replay buffer",
            labels=run)
        self.refused = CounterMetricFamily(
            "peerd_rl_rollouts_refused", "Rollouts not trained on, by reason (stale, "
            "stale_at_train, verification, malformed, ...)", labels=["run", "reason"])
        self.trained = CounterMetricFamily(
            "peerd_rl_rollouts_trained", "Rollouts trained on", labels=run)
        self.skipped = CounterMetricFamily(
            "peerd_rl_skipped_groups", "Groups trained on without a gradient: every "
            "reward equal", labels=run)
        self.staleness = HistogramMetricFamily(
            "peerd_rl_trained_staleness", "Trainer version minus rollout version of each "
            "rollout trained on, measured at training time", labels=run)
        self.steps = CounterMetricFamily("peerd_rl_steps", "Optimiser steps taken",
                                         labels=run)
        self.version = GaugeMetricFamily("peerd_rl_policy_version",
                                         "The trainer's policy version", labels=run)
        self.idle = CounterMetricFamily(
            "peerd_rl_trainer_idle_seconds", "Time the trainer waited for rollouts (their "
            "checks not counted)",
            labels=run)
        self.train = CounterMetricFamily(
            "peerd_rl_train_seconds", "Time spent in optimiser steps", labels=run)
        self.verify = CounterMetricFamily(
            "peerd_rl_verify_seconds", "Time spent re-scoring rollouts to check their "
            "behaviour log-probs", labels=run)
        self.sync = CounterMetricFamily(
            "peerd_rl_weight_sync_seconds", "Time spent exporting and publishing versions "
            "(the trainer's side of a weight sync)", labels=run)
        self.last_sync = GaugeMetricFamily(
            "peerd_rl_last_weight_sync_seconds", "The last step's export and publish time",
            labels=run)
        self.rate = GaugeMetricFamily(
            "peerd_rl_samples_per_second", "Rollouts trained on per second since the run "
            "started", labels=run)

    def all(self) -> list[Metric]:
        return [self.info, self.admitted, self.refused, self.trained, self.skipped,
                self.staleness, self.steps, self.version, self.idle, self.train,
                self.verify, self.sync,
                self.last_sync, self.rate]

    def add(self, run_id: str, run: Run) -> None:
        spec, t = run.spec, run.trainer
        ended = run.state in ("done", "failed", "stopped")
        state = run.state if t is None or ended else t.progress.state
        self.info.add_metric([run_id, spec.mode, spec.update, state], 1.0)
        if t is None:  # still loading: nothing counted yet
            return
        g = spec.group  # the buffer counts groups; these count rollouts
        p, b = t.progress, t.buffer
        self.admitted.add_metric([run_id], float(b.admitted * g))
        for reason, n in sorted((Counter(b.refused) + p.refused).items()):
            self.refused.add_metric([run_id, reason], float(n * g))
        self.trained.add_metric([run_id], float(p.samples))
        self.skipped.add_metric([run_id], float(p.skipped_groups))
        histogram = b.staleness_histogram
        below = 0
        buckets: list[tuple[str, float]] = []
        for s in range(max([t.staleness, *histogram]) + 1):
            below += histogram.get(s, 0) * g
            buckets.append((str(float(s)), float(below)))  # le="0.0", as Histogram
        buckets.append(("+Inf", float(below)))
        self.staleness.add_metric([run_id], buckets, sum_value=float(
            sum(s * n * g for s, n in histogram.items())))
        self.steps.add_metric([run_id], float(p.step))
        self.version.add_metric([run_id], float(t.version))
        self.idle.add_metric([run_id], p.trainer_idle_s)
        self.train.add_metric([run_id], p.train_s)
        self.verify.add_metric([run_id], p.verify_s)
        self.sync.add_metric([run_id], p.sync_s)
        self.last_sync.add_metric([run_id], float(p.last.get("sync_s", 0.0)))
        self.rate.add_metric([run_id], float(p.to_json()["samples_per_s"]))


class SamplerCollector:
    """This peer's rollout sampler (`peerd start --rollout`), once its model is ready."""

    def __init__(self, rollouts: Rollouts) -> None:
        self.rollouts = rollouts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "requests": CounterMetricFamily("peerd_rl_sampler_requests_served",
                                            "Rollout requests answered"),
            "rollouts": CounterMetricFamily("peerd_rl_sampler_rollouts_produced",
                                            "Rollouts generated and signed"),
            "idle": CounterMetricFamily("peerd_rl_sampler_idle_seconds",
                                        "Time no rollout request was generating"),
            "version": GaugeMetricFamily("peerd_rl_sampler_policy_version",
                                         "The version of the policy the sampler generates "
                                         "with"),
            "in_hand": GaugeMetricFamily("peerd_rl_sampler_requests_in_hand",
                                         "Rollout requests generating or queued now"),
        }
        sampler = self.rollouts.sampler
        if sampler is not None:
            for key, value in (("requests", sampler.requests_served),
                               ("rollouts", sampler.rollouts_produced),
                               ("idle", sampler.idle_s()),
                               ("version", sampler.policy.version),
                               ("in_hand", sampler.status()["rollout"]["in_hand"])):
                families[key].add_metric([], float(value))
        yield from families.values()


class WeightsCollector:
    """The store's counters on /metrics, read when scraped."""

    def __init__(self, store: WeightStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        s = self.store
        for name, doc, value in (
                ("peerd_weights_pulls", "Versions pulled", s.pulled["pulls"]),
                ("peerd_weights_pull_seconds", "Time spent pulling versions", s.pull_seconds),
                ("peerd_weights_pulled_bytes", "Chunk bytes fetched", s.pulled["bytes"]),
                ("peerd_weights_served_chunks", "Chunks served to peers", s.served["chunks"]),
                ("peerd_weights_served_bytes", "Chunk bytes served to peers", s.served["bytes"])):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], float(value))
            yield counter
        held = GaugeMetricFamily("peerd_weights_held_bytes", "Chunk bytes held")
        held.add_metric([], float(sum(len(c) for c in s.chunks.values())))
        yield held
        last = GaugeMetricFamily("peerd_weights_last_pull_seconds", "The last pull's time")
        last.add_metric([], s.pull_stats[-1].seconds if s.pull_stats else 0.0)
        yield last
