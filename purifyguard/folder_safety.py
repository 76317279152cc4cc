"""Folder safety: what a purifier folder may contain before anything in it is read.

A purifier folder (local, or a Hub repository fetched through the Hub cache) has a fixed layout:
purifier_config.json at the top and the component folders unet/, scheduler/ and guidance/. These
checks run before a file of it is parsed: a pickle checkpoint in the layout's folders is refused
(unpickling can run arbitrary code), a link may not lead out of the folder (a Hub snapshot's links
into the cache's blobs/ are allowed) and a missing file is named with the layout it belongs to.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download

from purifyguard.files import check_inside

PURIFIER_CONFIG = "purifier_config.json"
UNET_DIR = "unet"
SCHEDULER_DIR = "scheduler"
GUIDANCE_DIR = "guidance"
LAYOUT_DIRS = (UNET_DIR, SCHEDULER_DIR, GUIDANCE_DIR)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def resolve_folder(
    repo_id_or_dir: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    local_files_only: bool = False,
    allow_patterns: list[str] | None = None,
) -> Path:
    """A local folder as it is, or a Hub repo id through snapshot_download (cache, revision,
    HF_HUB_OFFLINE)."""
    if not isinstance(repo_id_or_dir, (str, Path)) or not str(repo_id_or_dir).strip():
        raise ValueError(
            "expected a purifier folder or a Hub repo id of the form 'user/name', got "
            f"{repo_id_or_dir!r}"
        )
    path = Path(repo_id_or_dir).expanduser()
    if path.is_dir():
        return path
    name = str(repo_id_or_dir)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(
            f"{name!r} is not a folder, nor a Hub repo id of the form 'user/name'"
        )
    from purifyguard.version import __version__

    return Path(snapshot_download(
        name, revision=revision, cache_dir=cache_dir, token=token,
        local_files_only=local_files_only, allow_patterns=allow_patterns,
        library_name="purifyguard", library_version=__version__,
    ))


def refuse_pickles(folder: Path, dirs: tuple[str, ...] = LAYOUT_DIRS) -> None:
    """ValueError if the folder or one of its component folders (`dirs`, the purifier layout's
    by default) holds a pickle checkpoint: purifyguard reads safetensors only. Only the layout's
    own folders are looked at, never the whole tree under the folder."""
    for part in (folder, *(folder / name for name in dirs)):
        if not part.is_dir():
            continue
        for path in sorted(part.iterdir()):
            if path.suffix.lower() in PICKLE_SUFFIXES and path.is_file():
                raise ValueError(pickle_message(path.relative_to(folder), folder))


def check_layout_inside(folder: Path, dirs: tuple[str, ...] = LAYOUT_DIRS) -> None:
    """ValueError if a file of the layout (the folder's and its component folders', `dirs`) is a
    link that leads out of the folder. A Hub snapshot's files link into the cache's blobs/
    folder, which is allowed (link_root)."""
    root = link_root(folder)
    for part in (folder, *(folder / name for name in dirs)):
        if part.exists():
            check_inside(part, root, "folder")
        if part.is_dir():
            for path in part.iterdir():
                check_inside(path, root)


def require_file(path: Path, *, purifier_folder: bool = False, holds: str | None = None) -> Path:
    """The path, or FileNotFoundError naming the missing file and what the folder should hold
    (`holds`; by default, a purifier folder's layout). purifier_folder=True, for the file that
    makes a folder a purifier folder (purifier_config.json): the message also says what the
    folder holds instead (empty, a classifier or network folder, a PurifiedModel folder, a
    diffusers model, pickles, or its first entries)."""
    if path.is_file():
        return path
    where = f"missing file {path.parent.name}/{path.name} (expected at {path})"
    if purifier_folder:
        raise FileNotFoundError(
            f"{where}: {path.parent} is not a purifier folder, {describe_folder(path.parent)}; "
            f"{PURIFIER_FOLDER_HOLDS}"
        )
    raise FileNotFoundError(f"{where}; {holds or PURIFIER_FOLDER_HOLDS}")


PURIFIER_FOLDER_HOLDS = (
    f"a purifier folder holds {PURIFIER_CONFIG}, {UNET_DIR}/, {SCHEDULER_DIR}/ and optionally "
    f"{GUIDANCE_DIR}/ (Purifier.save_pretrained writes one; see docs/hub.md)"
)
# What a network folder (a classifier, or a purifier's guidance/) holds.
NETWORK_FOLDER_HOLDS = (
    "a network folder (a classifier, or a purifier's guidance/) holds config.json and "
    "model.safetensors in timm's Hub format (timm.models.save_for_hf(model, folder, "
    "safe_serialization=True) or `purifyguard train guidance` writes one)"
)
# At most this many entries of a folder are named in a message.
LISTED_ENTRIES = 8


class PickleInsteadError(FileNotFoundError, ValueError):
    """A folder holds pickle weights where its safetensors file should be: the file is missing
    (FileNotFoundError, as before) and what is there is refused (ValueError, as every refusal)."""


def find_pickles(folder: Path) -> list[Path]:
    """The pickle checkpoints (PICKLE_SUFFIXES) directly in a folder, sorted."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir()
                  if path.suffix.lower() in PICKLE_SUFFIXES and path.is_file())


def describe_folder(folder: Path) -> str:
    """What a folder that is not the expected kind holds, in a few words, from the names of its
    top-level entries only (nothing is read or followed): "it is empty", "it holds config.json
    and model.safetensors: a network folder in timm's format (a classifier) ...", ..."""
    if not folder.is_dir():
        return "it does not exist" if not folder.exists() else "it is not a folder"
    try:
        names = sorted(path.name for path in folder.iterdir())
    except OSError as error:
        return f"it cannot be listed ({error.strerror or error})"
    present = set(names)
    if not names:
        return "it is empty"
    if "purified_model.json" in present:
        return ("it holds purified_model.json: a PurifiedModel folder (load it with "
                "PurifiedModel.from_pretrained; its purifier is its purifier/ subfolder)")
    if "model_index.json" in present or "diffusion_pytorch_model.safetensors" in present:
        return ("it holds a diffusers model (model_index.json or diffusion_pytorch_model."
                "safetensors): load it with Purifier.from_diffusers(folder, t_star)")
    if "config.json" in present and "model.safetensors" in present:
        return ("it holds config.json and model.safetensors: a network folder in timm's format "
                "(a classifier or a guidance network; give it as the classifier, e.g. "
                "--classifier, not as the purifier)")
    pickles = [name for name in names if Path(name).suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        return (f"it holds the pickle file(s) {', '.join(pickles[:LISTED_ENTRIES])}, which "
                "purifyguard refuses (unpickling can run arbitrary code)")
    shown = ", ".join(names[:LISTED_ENTRIES])
    more = f" and {len(names) - LISTED_ENTRIES} more" if len(names) > LISTED_ENTRIES else ""
    return f"it holds {shown}{more}"


def in_snapshot(folder: Path) -> bool:
    """Whether the folder lies in a Hub cache snapshot (whose files link into its blobs/)."""
    return any(parent.name == "snapshots" for parent in folder.parents)


def link_root(folder: Path) -> Path:
    """Where the files of a folder may link to: the folder itself, or, for a folder in a Hub
    cache snapshot (snapshots/<commit>/, or a subfolder of one such as guidance/ or purifier/),
    the cached repository that holds snapshots/ and blobs/, into which its files link."""
    for parent in folder.parents:
        if parent.name == "snapshots" and (parent.parent / "blobs").is_dir():
            return parent.parent
    return folder


def pickle_message(relative: Path, folder: Path) -> str:
    """The refusal of a pickle checkpoint, with how to re-save it."""
    return (
        f"refusing pickle checkpoint {relative.as_posix()} in {folder}: purifyguard loads "
        "safetensors only, because unpickling can run arbitrary code. Re-save the weights "
        "with safetensors (e.g. unet.save_pretrained(dir, safe_serialization=True)) and "
        "remove the pickle file"
    )
