"""Watch Triton launches: which CUDA device was current, or which ``launch_on`` guards were open.

``LaunchSpy(kernel, probe)`` stands in for a ``@triton.jit`` kernel (``kernel[grid](...)``), calls
``probe()`` at every launch and keeps the answers in ``seen``. ``recording_guard`` replaces
``vlarl_fast.kernels._device.launch_on`` with one that keeps the devices of the open guards in a list,
so a CPU run under TRITON_INTERPRET=1 can check that a launch happened inside the guard.
"""
import contextlib
import importlib


class LaunchSpy:
    def __init__(self, kernel, probe):
        self.kernel, self.probe, self.seen = kernel, probe, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.seen.append(self.probe())
            return launch(*args, **kwargs)
        return run


def recording_guard(monkeypatch) -> list:
    """Patch launch_on; returns the live list of the devices of the guards open right now."""
    dev_mod = importlib.import_module("vlarl_fast.kernels._device")
    real, open_now = dev_mod.launch_on, []

    @contextlib.contextmanager
    def guard(t):
        open_now.append(t.device)
        with real(t):
            yield
        open_now.pop()

    monkeypatch.setattr(dev_mod, "launch_on", guard)
    return open_now
