"""What the online GRPO and the PPO trainer share: the policy and its optimizer, the weight bridge, checkpoints, metrics sinks."""
