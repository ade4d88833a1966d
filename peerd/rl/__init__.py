"""Echo: RL post-training with the swarm as samplers (issue 25)."""
