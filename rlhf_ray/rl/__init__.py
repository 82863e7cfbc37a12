"""Reinforcement learning from the reward model: PPO, GRPO and RLOO."""
