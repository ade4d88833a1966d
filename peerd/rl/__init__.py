"""Echo: RL post-training with the swarm as samplers (issue 25).

The sampler side (a versioned local policy, generation with behaviour log-probs, the
rollout service) and the trainer side (GRPO, the replay buffer, weight versions) plug
into a node through the Service shape, like every system.
"""
