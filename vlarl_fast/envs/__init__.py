"""Environments: the built-in tabletop suite (LIBERO suites later), and vectorised stepping."""
from .registry import TaskSpec, UnknownTaskError, get_task, list_tasks, make_env
from .render import RenderBackendError, select_backend
from .vector import InProcessVectorEnv, VectorEnv, choose_backend

__all__ = ["TaskSpec", "UnknownTaskError", "get_task", "list_tasks", "make_env", "RenderBackendError",
           "select_backend", "VectorEnv", "InProcessVectorEnv", "choose_backend"]
