"""Render-device selection as pure functions over made-up machines: GPUs matched to their own EGL devices
whatever order EGL, CUDA and NVML list them in, CUDA_VISIBLE_DEVICES and MUJOCO_GL respected, and clear
errors (or a CPU fallback under 'auto') where a GPU cannot render."""
import os

import pytest

from vlarl_fast.envs import render_devices as R
from vlarl_fast.envs.render_devices import EglDevice, Gpu, RenderDeviceError

NV = ("EGL_NV_device_cuda", "EGL_EXT_device_drm", "EGL_EXT_device_persistent_id")
MESA = EglDevice(0, ("EGL_MESA_device_software", "EGL_EXT_device_drm_render_node"))
UUIDS = ["GPU-aaaaaaaa-0000-0000-0000-000000000000", "GPU-bbbbbbbb-1111-1111-1111-111111111111",
         "GPU-cccccccc-2222-2222-2222-222222222222"]
BUS = ["0000:1a:00.0", "0000:3b:00.0", "0000:88:00.0"]


def _gpus(n=3, names=None):
    return [Gpu(i, UUIDS[i], BUS[i], (names or ["NVIDIA H200"] * n)[i]) for i in range(n)]


def _pci_egl(order):
    """Mesa's software device first, then the GPUs in `order` (NVML indices), identified by PCI bus id only."""
    return [MESA] + [EglDevice(k + 1, NV[:2], f"/dev/dri/card{k + 1}", BUS[g]) for k, g in enumerate(order)]


_plan = R.plan_render_devices


def test_bus_ids_from_nvml_and_sysfs_compare_equal():
    assert R.normalize_bus_id("00000000:3B:00.0") == R.normalize_bus_id("0000:3b:00.0") == "0000:3b:00.0"
    assert R.normalize_bus_id(b"00000000:88:00.0") == "0000:88:00.0"
    assert R.normalize_bus_id("card0") is None and R.normalize_bus_id(None) is None


def test_pci_bus_id_read_through_the_drm_nodes_sysfs_link(tmp_path):
    pci = tmp_path / "devices" / "pci0000:00" / "0000:3b:00.0"
    pci.mkdir(parents=True)
    (tmp_path / "card2").mkdir()
    os.symlink(pci, tmp_path / "card2" / "device")
    assert R.pci_bus_id_of_drm("/dev/dri/card2", sysfs=str(tmp_path)) == "0000:3b:00.0"
    assert R.pci_bus_id_of_drm("/dev/dri/card9", sysfs=str(tmp_path)) is None


def test_reordered_egl_devices_with_mesa_first_map_by_pci_bus():
    # EGL lists Mesa, then GPU 2, GPU 0, GPU 1: the EGL index of a GPU is never its CUDA or NVML index
    gpus = R.visible(_gpus(), None, None)
    envs, note = _plan("cuda", 3, gpus, _pci_egl([2, 0, 1]))
    assert note is None
    assert [e["MUJOCO_EGL_DEVICE_ID"] for e in envs] == ["2", "3", "1"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == UUIDS  # the same GPU, by a name no ordering changes
    assert envs[0]["VLARL_EGL_DEVICE"] == "pci:" + BUS[0]
    assert all(e["MUJOCO_GL"] == e["PYOPENGL_PLATFORM"] == "egl" for e in envs)


def test_match_by_device_uuid_or_cuda_ordinal_without_drm():
    gpus = R.visible(_gpus(2), None, None)
    # an H200 as seen: no DRM node, the device UUID equals NVML's
    by_uuid = [EglDevice(0, NV, uuid=UUIDS[1].removeprefix("GPU-").replace("-", "")),
               EglDevice(1, NV, uuid=UUIDS[0].removeprefix("GPU-").replace("-", ""))]
    assert {g: d.index for g, d in R.match_egl(gpus, by_uuid).items()} == {0: 1, 1: 0}
    by_cuda = [MESA, EglDevice(1, NV[:1], cuda_device=1), EglDevice(2, NV[:1], cuda_device=0)]
    assert {g: d.index for g, d in R.match_egl(gpus, by_cuda).items()} == {0: 2, 1: 1}
    # duplicate ordinals say nothing: no guess
    assert R.match_egl(gpus, [EglDevice(0, NV[:1], cuda_device=0), EglDevice(1, NV[:1], cuda_device=0)]) == {}


def test_cuda_visible_devices_by_index_and_by_uuid():
    # CUDA_VISIBLE_DEVICES=2,0: cuda:0 is NVML GPU 2; the EGL driver reports ordinals in that numbering
    gpus = R.visible(_gpus(), "2,0", None)
    assert [(g.index, g.cuda_index) for g in gpus] == [(2, 0), (0, 1)]
    egl = [EglDevice(0, NV[:1], cuda_device=1), EglDevice(1, NV[:1]), EglDevice(2, NV[:1], cuda_device=0)]
    envs, _ = _plan("cuda:0", 2, gpus, egl)
    assert envs == [R.gpu_vars(gpus[0], egl[2])] * 2 and envs[0]["CUDA_VISIBLE_DEVICES"] == UUIDS[2]
    by_uuid = R.visible(_gpus(), "GPU-bbbb,GPU-aaaaaaaa-0000", None)
    assert [(g.index, g.cuda_index) for g in by_uuid] == [(1, 0), (0, 1)]
    envs, _ = _plan("auto", 2, by_uuid, _pci_egl([0, 1, 2]))
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == [UUIDS[1], UUIDS[0]]  # only the GPUs the user allowed
    assert [e["MUJOCO_EGL_DEVICE_ID"] for e in envs] == ["2", "1"]
    assert R.visible(_gpus(), "", None) == []


def test_mixed_gpu_models_need_pci_order_for_index_entries():
    mixed = _gpus(2, ["NVIDIA H200", "NVIDIA L4"])
    with pytest.raises(RenderDeviceError, match="CUDA_DEVICE_ORDER=PCI_BUS_ID"):
        R.visible(mixed, "1", None)
    assert [g.index for g in R.visible(mixed, "1", "PCI_BUS_ID")] == [1]
    assert [g.cuda_index for g in R.visible(mixed, None, None)] == [None, None]  # fastest first: unknown
    assert [g.cuda_index for g in R.visible(mixed, UUIDS[1], None)] == [0]


def test_workers_spread_over_the_gpus():
    envs, _ = _plan("auto", 5, R.visible(_gpus(2), None, None), _pci_egl([1, 0]))
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == [UUIDS[0], UUIDS[1]] * 2 + [UUIDS[0]]
    envs, _ = _plan([1], 2, R.visible(_gpus(2), None, None), _pci_egl([1, 0]))
    assert [e["MUJOCO_EGL_DEVICE_ID"] for e in envs] == ["1", "1"]


def test_gpu_without_egl_device_cpu_fallback_under_auto_error_when_named():
    gpus = R.visible(_gpus(2), None, None)
    egl = _pci_egl([1])  # GPU 0 has no EGL device
    envs, note = _plan("auto", 2, gpus, egl)
    assert all(e["CUDA_VISIBLE_DEVICES"] == UUIDS[1] for e in envs) and "not rendering on cuda:0" in note
    with pytest.raises(RenderDeviceError) as e:
        _plan("cuda:0", 1, gpus, egl)
    assert "libEGL_nvidia" in str(e.value) and "--env.render-device cpu" in str(e.value)
    # no GPU has one: 'auto' renders with Mesa and says why
    envs, note = _plan("auto", 2, gpus, [MESA], egl_error=None)
    assert envs == [R.cpu_vars([MESA])] * 2 and note.startswith("rendering on the CPU") and "10_nvidia.json" in note


def test_no_nvml_or_no_gpu():
    assert _plan("auto", 3, [], [MESA], nvml_error="NVMLError_LibraryNotFound") == ([{}, {}, {}], None)
    with pytest.raises(RenderDeviceError, match="NVML is unavailable.*--env.render-device cpu"):
        _plan("cuda", 1, [], [MESA], nvml_error="NVMLError_LibraryNotFound")
    with pytest.raises(RenderDeviceError, match="cuda:3 is not a GPU of this process"):
        _plan("cuda:3", 1, R.visible(_gpus(2), None, None), _pci_egl([0, 1]))


def test_cpu_and_a_users_mujoco_gl():
    gpus = R.visible(_gpus(2), None, None)
    envs, _ = _plan("cpu", 2, gpus, _pci_egl([0, 1]))
    assert envs[0] == {"MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl", "MUJOCO_EGL_DEVICE_ID": "0",
                       "VLARL_EGL_DEVICE": "software"}
    assert "CUDA_VISIBLE_DEVICES" not in envs[0]
    assert _plan("cpu", 1, gpus, _pci_egl([0, 1])[1:])[0] == [{"MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}]
    # MUJOCO_GL=osmesa by the user: no GPU variables at all
    assert _plan("auto", 2, gpus, _pci_egl([0, 1]), mujoco_gl="osmesa") == ([{}, {}], None)
    assert _plan("cpu", 1, gpus, _pci_egl([0, 1]), mujoco_gl="osmesa") == ([{}], None)
    with pytest.raises(RenderDeviceError, match="MUJOCO_GL=osmesa.*unset MUJOCO_GL"):
        _plan("cuda", 2, gpus, _pci_egl([0, 1]), mujoco_gl="osmesa")
    assert _plan("auto", 1, gpus, _pci_egl([0, 1]), mujoco_gl="egl")[0][0]["MUJOCO_EGL_DEVICE_ID"] == "1"


def test_render_device_spellings():
    assert R.parse_render_device("AUTO") == "auto" and R.parse_render_device(None) == "cpu"
    assert R.parse_render_device([]) == "cpu" and R.parse_render_device("cuda") == "cuda"
    assert R.parse_render_device("cuda:0,cuda:2") == [0, 2] == R.parse_render_device("0,2")
    assert R.parse_render_device((1, 3)) == [1, 3]
    for bad in ("gpu", "cuda:x", "0,,1", ["a"]):
        with pytest.raises(RenderDeviceError, match="use auto, cpu, cuda"):
            R.parse_render_device(bad)
    with pytest.raises(ValueError, match="2 costs for 3 workers"):
        _plan("auto", 3, [], [], costs=[1.0, 1.0])


def test_worker_looks_its_device_up_again_in_its_own_enumeration(monkeypatch):
    # the manager saw the GPU as EGL device 2; the worker's own list puts it at 0
    worker_list = [EglDevice(0, NV[:2], "/dev/dri/card1", BUS[1]), EglDevice(1, MESA.extensions)]
    monkeypatch.setattr(R, "query_egl_devices", lambda: worker_list)
    env = {"MUJOCO_GL": "egl", "MUJOCO_EGL_DEVICE_ID": "2", "VLARL_EGL_DEVICE": "pci:" + BUS[1]}
    R.resolve_in_worker(env)
    assert env["MUJOCO_EGL_DEVICE_ID"] == "0"
    soft = {"MUJOCO_GL": "egl", "MUJOCO_EGL_DEVICE_ID": "0", "VLARL_EGL_DEVICE": "software"}
    R.resolve_in_worker(soft)
    assert soft["MUJOCO_EGL_DEVICE_ID"] == "1"
    lost = {"MUJOCO_GL": "egl", "MUJOCO_EGL_DEVICE_ID": "5", "VLARL_EGL_DEVICE": "pci:0000:99:00.0"}
    R.resolve_in_worker(lost)  # not found: the manager's index stays
    assert lost["MUJOCO_EGL_DEVICE_ID"] == "5"


def test_renderer_failure_note_names_device_variables_memory_and_fix():
    class FatalError(Exception):  # mujoco.FatalError's name, as MuJoCo raises it
        pass

    assert R.is_render_error(FatalError("Offscreen framebuffer is not complete, error 0x8cdd"))
    assert R.is_render_error(RuntimeError("The MUJOCO_EGL_DEVICE_ID environment variable must be an integer"))
    assert not R.is_render_error(ValueError("image_size must be in [16, 1024]; got 8"))
    assert not R.is_render_error(KeyError("negligible"))
    env = R.gpu_vars(R.visible(_gpus(2), None, None)[1], _pci_egl([0, 1])[2])
    note = R.render_failure_note({**env, "__EGL_VENDOR_LIBRARY_FILENAMES": "/x/10_nvidia.json", "HOME": "/root"},
                                 (256 * 2**20, 140 * 2**30))
    assert f"renders on GPU {BUS[1]} (EGL device 2, CUDA_VISIBLE_DEVICES={UUIDS[1]})" in note
    for var in ("MUJOCO_GL=egl", "MUJOCO_EGL_DEVICE_ID=2", f"CUDA_VISIBLE_DEVICES={UUIDS[1]}", "PYOPENGL_PLATFORM=egl",
                "__EGL_VENDOR_LIBRARY_FILENAMES=/x/10_nvidia.json"):
        assert var in note
    assert "HOME" not in note and "--env.render-device cpu" in note and "MUJOCO_GL=osmesa" in note
    assert "0.25 GiB of 140 GiB free" in note and "torch.cuda.empty_cache()" in note
    assert "too little" not in R.render_failure_note(env, (8 * 2**30, 140 * 2**30))
    assert "the CPU (OSMesa)" in R.render_failure_note({"MUJOCO_GL": "osmesa"})


def test_this_machine_is_read_without_a_gl_context():
    # whatever this machine has, reading it never raises and never selects a render backend
    from vlarl_fast.envs import render
    before = render._selected
    m = R.machine()
    assert set(m) == {"gpus", "egl", "nvml_error", "egl_error"}
    assert all(isinstance(line, str) for line in R.report_lines())
    assert render._selected is before


def test_cached_gpu_memory_is_released_before_gpu_workers_start(monkeypatch):
    """A training process's caching allocator can hold the whole GPU; EGL in a new worker then fails."""
    import torch

    from vlarl_fast.envs.render_devices import release_cached_gpu_memory
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    gpu_worker = {"MUJOCO_GL": "egl", "MUJOCO_EGL_DEVICE_ID": "1", "CUDA_VISIBLE_DEVICES": "GPU-1234"}
    cpu_worker = {"MUJOCO_GL": "egl", "MUJOCO_EGL_DEVICE_ID": "0", "VLARL_EGL_DEVICE": "software"}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert not release_cached_gpu_memory([gpu_worker]) and not calls  # no CUDA context: nothing cached
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert not release_cached_gpu_memory([cpu_worker, {}]) and not calls  # nobody renders on a GPU
    assert release_cached_gpu_memory([cpu_worker, gpu_worker]) and calls == [1]
