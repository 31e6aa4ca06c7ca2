"""The built-in tabletop suite: MuJoCo scenes generated in code, scripted experts."""
from .env import STATE_DIM, TabletopEnv
from .tasks import TASKS, TaskSpec

__all__ = ["STATE_DIM", "TabletopEnv", "TASKS", "TaskSpec"]
