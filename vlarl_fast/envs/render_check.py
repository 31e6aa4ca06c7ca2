"""Which rendering settings work on this machine: ``python -m vlarl_fast.envs.render_check``.

Each combination of settings runs in a FRESH process, started either as the env workers start
(``multiprocessing`` spawn, variables set in the child before its first GL context) or as a plain
``subprocess`` (variables set at exec). The child builds ``make_env("tabletop/reach_red",
image_size=S)`` and renders one observation. One line per combination, then a summary naming the
settings that every failure shares. Factors:

  size          image side in pixels (--sizes)
  launcher      spawn | subprocess
  egl_id        set (MUJOCO_EGL_DEVICE_ID = the EGL device of the first visible GPU) | unset
  cuda_visible  unset | uuid (CUDA_VISIBLE_DEVICES=<its UUID>, as workers get) | index (=<its NVML index>)
  triton        first (imported before the first GL context, as render.py does) | skip (never imported)
  torch_cuda    init (a CUDA context before the first GL context) | no
  offsamples    MuJoCo's multisampling of the offscreen buffer: 4 (MuJoCo's default) | 0 (the scene's)

``--factor NAME=V1,V2`` narrows or overrides a factor's values (``--factor launcher=spawn``);
``--jobs`` children run at once (``--jobs 1`` rules out concurrency as a cause); ``--parent cuda,render``
first gives this process a CUDA context and a GL context of its own, as a training run has when its
workers start (children inherit the environment that leaves behind).

Then, on a GPU, ``--jobs`` worker-like children start at once while this process holds all but
``--free-mib`` MiB of the GPU's memory: NVIDIA's EGL reports a GPU that is out of memory only as
"Offscreen framebuffer is not complete, error 0x8cdd" (seen with 16 workers at 224 px and 0.25 GiB free).
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

TASK = "tabletop/reach_red"
MODULE = "vlarl_fast.envs.render_check"  # __name__ is "__main__" under -m
CLEARED = ("MUJOCO_EGL_DEVICE_ID", "CUDA_VISIBLE_DEVICES")


def factors(sizes: list[int], machine: dict, backend: str) -> dict[str, list]:
    """Default values of each factor on this machine: GPU-only values are left out without a GPU."""
    gpus = machine["gpus"]
    return {"size": sizes, "launcher": ["spawn", "subprocess"],
            "egl_id": ["set", "unset"] if backend == "egl" else ["unset"],
            "cuda_visible": ["unset", "uuid" if gpus else "index"],
            "triton": ["first", "skip"], "torch_cuda": ["init", "no"] if gpus else ["no"],
            "offsamples": [4, 0]}


def child_env(combo: dict, base: dict, backend: str, egl_id: int, gpu: dict | None) -> dict:
    """The process environment of one combination (the rendering variables as a worker gets them)."""
    env = {k: v for k, v in base.items() if k not in CLEARED}
    env.update({"MUJOCO_GL": backend, "PYOPENGL_PLATFORM": backend, "LP_NUM_THREADS": "1"})
    if combo["egl_id"] == "set":
        env["MUJOCO_EGL_DEVICE_ID"] = str(egl_id)
    if combo["cuda_visible"] == "index":
        env["CUDA_VISIBLE_DEVICES"] = str(gpu["index"] if gpu else 0)
    elif combo["cuda_visible"] == "uuid" and gpu:
        env["CUDA_VISIBLE_DEVICES"] = gpu["uuid"]
    return env


def render_once(combo: dict) -> dict:
    """In the child: build the env under `combo` and render one observation."""
    t0 = time.perf_counter()
    try:
        from . import render
        if combo["triton"] == "skip":
            render._load_triton_first = lambda: None
        if combo["torch_cuda"] == "init":
            import torch
            torch.zeros(1, device="cuda")
        from .registry import make_env
        from .tabletop import env as tabletop
        tabletop._model().vis.quality.offsamples = int(combo["offsamples"])
        env = make_env(TASK, image_size=int(combo["size"]), seed=0)
        img = env.reset(seed=0)[0]["image"]
        if img.shape != (combo["size"], combo["size"], 3) or not img.any():
            raise RuntimeError(f"rendered an empty or misshapen image {img.shape}")
        return {"ok": True, "s": time.perf_counter() - t0, "renderer": _gl_renderer()}
    except BaseException as e:
        return {"ok": False, "s": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}".strip()}


def _parent_cuda() -> dict:
    try:
        import torch
        torch.zeros(1, device="cuda")
        return {"ok": True}
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def _gl_renderer() -> str:
    try:  # the renderer's context is current after a render
        from OpenGL import GL
        return GL.glGetString(GL.GL_RENDERER).decode()
    except Exception:
        return "?"


def _spawn_target(combo: dict, env: dict, conn) -> None:
    # as worker_main does: the variables are set in the child, after its interpreter started
    for k in CLEARED:
        os.environ.pop(k, None)
    os.environ.update(env)
    conn.send(render_once(combo))


def run_combo(combo: dict, env: dict, timeout: float) -> dict:
    if combo["launcher"] == "spawn":
        ctx = mp.get_context("spawn")
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_spawn_target, args=(combo, env, send), daemon=True)
        p.start()
        send.close()
        got = recv.poll(timeout)
        res = recv.recv() if got else None
        p.join(5 if got else 0)
        if p.is_alive():
            p.kill()
            p.join()
        return res or {"ok": False, "s": timeout, "error": f"no answer (exit code {p.exitcode})"}
    try:
        r = subprocess.run([sys.executable, "-m", MODULE, "--child", json.dumps(combo)], env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "s": timeout, "error": f"timed out after {timeout:.0f} s"}
    lines = r.stdout.strip().splitlines()
    if r.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"ok": False, "s": 0.0, "error": f"exit code {r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}"}


WORKER_LIKE = {"launcher": "spawn", "egl_id": "set", "cuda_visible": "uuid", "triton": "first", "torch_cuda": "no",
               "offsamples": 0}


def memory_check(levels_mib: list[int], size: int, workers: int, env_of, timeout: float) -> list[tuple[int, dict]]:
    """Start `workers` worker-like children at once (a VectorEnv's start) while this process leaves only each
    level of GPU memory free; one child alone needs far less than a VectorEnv's many."""
    import torch
    out = []
    combo = {"size": size, **WORKER_LIKE}
    for mib in levels_mib:
        hog = torch.empty(max(0, torch.cuda.mem_get_info()[0] - mib * 2**20), dtype=torch.uint8, device="cuda")
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda _: run_combo(combo, env_of(combo), timeout), range(workers)))
        del hog
        torch.cuda.empty_cache()
        bad = [r for r in results if not r["ok"]]
        res = bad[0] if bad else results[0]
        print(f"{'FAIL' if bad else 'PASS'}  size={size}, {workers} workers at once, {mib} MiB of GPU memory free: "
              f"{workers - len(bad)} rendered  " + (res["error"][:300] if bad else res.get("renderer", "")), flush=True)
        out.append((mib, res))
    return out


def shared_by_failures(rows: list[tuple[dict, dict]]) -> tuple[dict, int]:
    """Settings every failed combination has in common (where some passing one differs), and how many
    passing combinations have all of them too (0: those settings alone explain the failures)."""
    fails = [c for c, r in rows if not r["ok"]]
    passes = [c for c, r in rows if r["ok"]]
    if not fails:
        return {}, 0
    common = {k: v for k, v in fails[0].items() if all(c[k] == v for c in fails) and any(c[k] != v for c in passes)}
    return common, sum(all(c[k] == v for k, v in common.items()) for c in passes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlarl_fast.envs.render_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64,224", help="image sizes to try (comma-separated)")
    ap.add_argument("--factor", action="append", default=[], metavar="NAME=V1,V2", help="values of one factor")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="children at once")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per child")
    ap.add_argument("--parent", default="", help="first, in this process: cuda (torch CUDA context), render (one "
                    "frame at the largest size), or both, comma-separated")
    ap.add_argument("--free-mib", default="2048,512,128",
                    help="GPU memory left free for the memory check, MiB (comma-separated; empty: skip)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(render_once(json.loads(args.child))))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    for what in filter(None, args.parent.split(",")):
        if what not in ("cuda", "render"):
            ap.error(f"--parent {what!r}: use cuda, render or cuda,render")
        res = render_once({"size": max(sizes), **WORKER_LIKE}) if what == "render" else _parent_cuda()
        print(f"parent {what}: {'ok' if res['ok'] else res['error']}")
    from .render import user_mujoco_gl
    from .render_devices import machine, match_egl, report_lines
    backend = (user_mujoco_gl() or "egl").lower()
    m = machine()
    print("rendering devices:", *report_lines(), sep="\n  ")
    gpu = m["gpus"][0] if m["gpus"] else None
    dev = match_egl([gpu], m["egl"]).get(gpu.index) if gpu else None
    soft = [d.index for d in m["egl"] if d.software]
    egl_id = dev.index if dev else (soft[0] if soft else 0)
    space = factors(sizes, m, backend)
    for f in args.factor:
        name, _, vals = f.partition("=")
        if name not in space or not vals:
            ap.error(f"--factor {f!r}: use NAME=V1,V2 with NAME one of {', '.join(space)}")
        space[name] = [int(v) if v.isdigit() else v for v in vals.split(",")]
    combos = [dict(zip(space, vals)) for vals in itertools.product(*space.values())]
    gpu_rec = {"index": gpu.index, "uuid": gpu.uuid} if gpu else None
    print(f"MUJOCO_GL={backend}, EGL device {egl_id} when set, {len(combos)} combinations, {args.jobs} at once\n")
    t0 = time.perf_counter()

    def env_of(c):
        return child_env(c, dict(os.environ), backend, egl_id, gpu_rec)

    def one(c):
        res = run_combo(c, env_of(c), args.timeout)
        print(f"{'PASS' if res['ok'] else 'FAIL'}  " + " ".join(f"{k}={v}" for k, v in c.items())
              + f"  {res['s']:.1f}s  " + (res.get("renderer", "") if res["ok"] else res["error"][:300]), flush=True)
        return c, res

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(one, combos))
    fails = sum(not r["ok"] for _, r in rows)
    print(f"\nsummary: {len(rows) - fails} passed, {fails} failed in {time.perf_counter() - t0:.0f} s")
    common, also_pass = shared_by_failures(rows)
    if fails and common:
        desc = " ".join(f"{k}={v}" for k, v in common.items())
        print(f"every failure has {desc}; " + (f"{also_pass} combinations with those settings pass, so the cause "
              "needs more than them" if also_pass else "no combination with those settings passes"))
    elif fails:
        print("no setting is shared by every failure"
              + (" (try --jobs 1 to rule out concurrency)" if args.jobs > 1 else ""))
    levels = [int(v) for v in args.free_mib.split(",") if v.strip()]
    if gpu and levels and backend == "egl":
        print(f"\nfree GPU memory (this process holds the rest; {args.jobs} spawned workers render at "
              f"{max(sizes)} px):")
        try:
            mem = memory_check(levels, max(sizes), max(1, args.jobs), env_of, args.timeout)
        except Exception as e:  # torch missing, or a CPU build of it
            print(f"skipped: {type(e).__name__}: {e}")
            mem = []
        low = [mib for mib, r in mem if not r["ok"]]
        if low:
            print(f"rendering fails with {max(low)} MiB or less free: workers need GPU memory left for EGL")
        fails += len(low)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
