"""Environments: the built-in tabletop suite (LIBERO suites later), and vectorised stepping."""
from .registry import (TaskSpec, UnknownTaskError, check_ready, get_task, list_tasks, make_env, make_training_env,
                       split_size)
from .render import RenderBackendError, select_backend
from .vector import InProcessVectorEnv, VectorEnv, choose_backend

__all__ = ["TaskSpec", "UnknownTaskError", "check_ready", "get_task", "list_tasks", "make_env", "make_training_env",
           "split_size",
           "RenderBackendError", "select_backend", "VectorEnv", "InProcessVectorEnv", "choose_backend"]
