"""LIBERO set-up without prompts or downloads: its config file, its assets folder, its import.

Two habits of the `libero` package get in the way of a library:

- ``import libero.libero`` asks on stdin for a dataset folder unless ``$LIBERO_CONFIG_PATH/config.yaml``
  (default ``~/.libero/config.yaml``) exists; without a terminal that prompt hangs or dies on EOF. So before
  the first import, :func:`import_libero` points ``LIBERO_CONFIG_PATH`` at a config it writes itself
  (atomically: parallel workers may race) in a user folder, or fills in one the user pointed at.
- its environments take assets from ``libero.libero.get_assets_path()``, which downloads from the
  Hugging Face Hub when the package has none, and ignores the config's ``assets`` key. So
  :func:`use_assets` resolves the folder from ``VLARL_LIBERO_ASSETS`` (or an explicit path) and installs it
  as that function's cached answer; when nothing is found it raises :class:`LiberoAssetsError`, which says
  how to get the assets, instead of starting a download.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
from pathlib import Path

ASSETS_ENV = "VLARL_LIBERO_ASSETS"
CONFIG_ENV = "LIBERO_CONFIG_PATH"
# folders every complete copy of LIBERO's assets has (the suites' scenes and objects)
ASSET_MARKERS = ("scenes", "articulated_objects", "stable_scanned_objects", "stable_hope_objects", "turbosquid_objects")
INSTALL_HINT = ('install the libero extra with torch held at its installed build: '
                '`echo "torch==$(python -c \'import torch; print(torch.__version__)\')" > constraints.txt && '
                'pip install -c constraints.txt "vlarl-fast[libero]"`, then `pip uninstall -y torchvision` on a '
                "CPU-only torch (a PyPI torchvision breaks transformers there; LIBERO's envs do not need it)")


class LiberoNotInstalledError(ImportError):
    pass


class LiberoAssetsError(FileNotFoundError):
    pass


def package_dir() -> Path:
    """``libero/libero`` of the installed package (BDDL files, init states), found without importing it
    (the import is what prompts)."""
    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        raise LiberoNotInstalledError(f"LIBERO is not installed: {INSTALL_HINT}")
    root = Path(list(spec.submodule_search_locations)[0]) / "libero"
    if not (root / "bddl_files").is_dir():
        raise LiberoNotInstalledError(f"the installed `libero` package at {root.parent} has no libero/bddl_files "
                                      f"(another package of that name?): {INSTALL_HINT}")
    return root


def _user_config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "vlarl-fast" / "libero"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK)
    except OSError:
        return False


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def ensure_config() -> Path:
    """Make sure ``$LIBERO_CONFIG_PATH/config.yaml`` exists (so importing LIBERO asks nothing) and return
    the folder. A folder the user chose through LIBERO_CONFIG_PATH is used as is, with a default config
    written only where it has none; otherwise vlarl-fast keeps its own under ~/.config/vlarl-fast/libero
    (a temp folder when the home folder is read-only)."""
    import yaml
    pkg = package_dir()
    chosen = os.environ.get(CONFIG_ENV)
    if chosen:
        folder = Path(chosen).expanduser()
        if (folder / "config.yaml").is_file():
            return folder
        if not _writable(folder):
            raise PermissionError(f"{CONFIG_ENV}={chosen} has no config.yaml and is not writable: point "
                                  f"{CONFIG_ENV} at a writable folder, or unset it to let vlarl-fast manage one")
    else:
        folder = _user_config_dir()
        if not _writable(folder):
            folder = Path(tempfile.gettempdir()) / f"vlarl-fast-{os.getuid()}" / "libero"
            folder.mkdir(parents=True, exist_ok=True)
    # LIBERO's own defaults (what its prompt writes when answered "N"): paths inside the package.
    # Only the benchmark helpers read this file; the adapter resolves BDDL files, init states and assets itself.
    config = {"benchmark_root": str(pkg), "bddl_files": str(pkg / "bddl_files"),
              "init_states": str(pkg / "init_files"), "datasets": str(folder / "datasets"),
              "assets": str(pkg / "assets")}
    text = yaml.safe_dump(config, sort_keys=True)
    path = folder / "config.yaml"
    if not path.is_file() or path.read_text() != text:
        _write_atomic(path, text)
    os.environ[CONFIG_ENV] = str(folder)
    return folder


def _quiet_robosuite() -> None:
    # robosuite logs three warnings at import when it has no private macro file (a developer
    # convenience); every worker process would print them.
    logging.getLogger("robosuite_logs").addFilter(lambda record: "macro" not in record.getMessage())


def import_libero():
    """``libero.libero``, imported without a prompt. Raises LiberoNotInstalledError with the install line."""
    if "libero.libero" in sys.modules:
        return sys.modules["libero.libero"]
    ensure_config()
    _quiet_robosuite()
    try:
        import libero.libero as L
    except ImportError as e:
        raise LiberoNotInstalledError(f"LIBERO failed to import ({type(e).__name__}: {e}): {INSTALL_HINT}") from e
    return L


def _looks_like_assets(folder: Path) -> bool:
    return folder.is_dir() and all((folder / m).is_dir() for m in ASSET_MARKERS)


def find_assets(path: str | os.PathLike | None = None) -> Path:
    """The assets folder: ``path`` if given, else ``$VLARL_LIBERO_ASSETS``; either may name the folder that
    holds ``assets/`` or the assets folder itself. With neither set, the copies LIBERO itself would use
    without downloading: the package's own ``libero/libero/assets``, then ``~/.cache/libero/assets``."""
    given = path if path is not None else os.environ.get(ASSETS_ENV) or None
    if given is not None:
        p = Path(given).expanduser()
        for cand in (p / "assets", p):
            if _looks_like_assets(cand):
                return cand.resolve()
        where = "the path given" if path is not None else f"{ASSETS_ENV}={given}"
        raise LiberoAssetsError(
            f"{where} holds no LIBERO assets (expected a folder with {', '.join(ASSET_MARKERS)}, or one holding "
            f"such an `assets` folder). {_assets_howto()}")
    tried = []
    candidates = []
    try:
        candidates.append(package_dir() / "assets")
    except LiberoNotInstalledError:
        pass
    candidates.append(Path(os.path.expanduser("~")) / ".cache" / "libero" / "assets")
    for cand in candidates:
        if _looks_like_assets(cand):
            return cand.resolve()
        tried.append(str(cand))
    raise LiberoAssetsError(f"LIBERO's assets were not found ({ASSETS_ENV} is not set; looked in "
                            f"{', '.join(tried)}). {_assets_howto()}")


def _assets_howto() -> str:
    return (f"LIBERO's pip packages ship without the scene and object assets (about 200 MB). Get them with "
            "`git clone https://github.com/Lifelong-Robot-Learning/LIBERO` (+ `git lfs pull`; the folder is "
            "LIBERO/libero/libero/assets) or `huggingface-cli download lerobot/libero-assets --repo-type dataset "
            f"--local-dir <folder>/assets`, then `export {ASSETS_ENV}=<folder>` (the folder holding `assets`, or "
            "the assets folder itself).")


def use_assets(path: str | os.PathLike | None = None) -> Path:
    """Resolve the assets folder (see :func:`find_assets`) and make LIBERO's environments load from it."""
    folder = find_assets(path)
    L = import_libero()
    # get_assets_path() answers from this cache when it names an existing folder; this is also what
    # keeps it from downloading (it only downloads when the package has no assets of its own).
    L._assets_path_cache = str(folder)
    return folder
