"""Echo: RL post-training with the swarm as samplers.

Samplers are ordinary peers serving the model; they generate version-tagged rollouts
(with the per-token behaviour log-probs they sampled from) for a trainer peer, which
admits them under a staleness bound, scores them with the task's reward, optimises
the policy with GRPO and publishes new versions. The pure rules live in `grpo`
(loss and advantages), `buffer` (staleness admission, replay buffer) and `tasks`
(problems and rewards); `types` holds the Rollout every part exchanges.
"""
