"""PPO with a critic (``method.name: ppo``): rollouts, reward model and critic, the PPO losses, the trainer."""
