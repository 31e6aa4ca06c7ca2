"""LIBERO (the `libero` extra): suites libero_spatial, libero_object, libero_goal, libero_10, libero_90.

``make_env("libero_spatial/0")`` builds one task as a gymnasium env (:class:`LiberoEnv`); assets come
from ``VLARL_LIBERO_ASSETS`` (see :mod:`.bootstrap`). Importing this package imports nothing of LIBERO;
LIBERO itself is imported, without its interactive prompt, on first use.
"""
from __future__ import annotations

from .bootstrap import (ASSETS_ENV, LiberoAssetsError, LiberoNotInstalledError, ensure_config, find_assets,
                        import_libero, use_assets)
from .env import LiberoEnv
from .images import to_policy_image
from .suites import MAX_EPISODE_STEPS, SUITES, LiberoTask, find_task, get_task, list_tasks, load_init_states


def make_env(task_id: str, *, image_size: int = 224, seed: int | None = None, **options):
    """A :class:`LiberoEnv` for ``task_id`` (``<suite>/<index>``, ``<suite>/<name>`` or a task name).

    Options: render_size (256), wrist (False), center_crop (None; OpenVLA: 0.9), jpeg_quality (None;
    OpenVLA: 95), settle_steps (10), max_episode_steps (the suite's), hard_reset (True), reward ('sparse'),
    assets (a path; default VLARL_LIBERO_ASSETS), render_gpu_device_id (-1)."""
    return LiberoEnv(get_task(task_id), image_size=image_size, seed=seed, **options)


__all__ = ["ASSETS_ENV", "LiberoAssetsError", "LiberoEnv", "LiberoNotInstalledError", "LiberoTask", "MAX_EPISODE_STEPS",
           "SUITES", "ensure_config", "find_assets", "find_task", "get_task", "import_libero", "list_tasks",
           "load_init_states", "make_env", "to_policy_image", "use_assets"]
