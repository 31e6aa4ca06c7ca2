"""vlarl-fast: online reinforcement learning of vision-language-action models in simulation."""
__version__ = "0.1.0"
