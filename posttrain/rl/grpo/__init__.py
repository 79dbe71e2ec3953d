"""Online GRPO (``method.name: online_grpo``): scored rollouts from an Atropos trajectory API, the clipped GRPO loss, the trainer."""
