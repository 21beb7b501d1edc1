"""The image a kernel runs in: its recipe (``kernel-image/``) and the tag derived from its contents.

A session needs only the name (:func:`default_image`); building it is a tool's work
(:mod:`kernelexec.tools.image`). The recipe fixes the paths the host-kernel contract relies on
(the kernel's Python, the sandbox user's home).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import ImageBuildError

__all__ = ["REPO", "default_image", "image_tag", "kernel_image_dir", "recipe_files"]

#: Repository of the kernel image; the tag is the recipe's content hash.
REPO = "kernelexec-kernel"

# Directories of kernel-image/ that are inputs of a particular build, not part of the recipe.
_NOT_RECIPE_DIRS = frozenset({"wheelhouse", "ca", "__pycache__"})
_NOT_RECIPE_SUFFIXES = (".pyc", ".swp", "~", ".md", ".orig", ".rej")


def kernel_image_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The recipe directory: ``override``, ``$KERNELEXEC_IMAGE_DIR``, a checkout's
    ``kernel-image/``, or the copy packaged in the wheel (``kernelexec/_kernel_image``).

    The checkout wins over the packaged copy so that an editable install builds
    what is being edited.
    """
    chosen = override if override is not None else os.environ.get("KERNELEXEC_IMAGE_DIR")
    if chosen:
        path = Path(chosen).expanduser().resolve()
        if not (path / "Dockerfile").is_file():
            raise ImageBuildError(f"{path} is not a kernel image recipe (no Dockerfile in it); "
                                  "fix KERNELEXEC_IMAGE_DIR or unset it")
        return path
    package = Path(__file__).resolve().parent.parent  # kernelexec/
    for candidate in (package.parent / "kernel-image", package / "_kernel_image"):
        if (candidate / "Dockerfile").is_file():
            return candidate
    raise ImageBuildError("the kernel image recipe (kernel-image/) is missing from this installation; "
                          "reinstall kernelexec, or set KERNELEXEC_IMAGE_DIR to a checkout's kernel-image/")


def recipe_files(recipe_dir: Path | None = None) -> list[tuple[str, Path]]:
    """The files that define the image, as (relative POSIX path, path), sorted.

    Everything in the directory counts, so that a file added to the recipe
    changes the tag without anyone having to remember to list it; left out are
    the per-build inputs (``wheelhouse/``, ``ca/``), documentation, and editor
    and Python droppings, which do not change what the image contains.
    """
    root = recipe_dir or kernel_image_dir()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not (d in _NOT_RECIPE_DIRS or d.startswith("."))]
        for name in filenames:
            if name.startswith(".") and name != ".dockerignore":
                continue
            if name.endswith(_NOT_RECIPE_SUFFIXES):
                continue
            path = Path(dirpath) / name
            if path.is_file():
                found.append(((rel_dir / name).as_posix(), path))
    return sorted(found)


def image_tag(recipe_dir: Path | None = None) -> str:
    """``kernelexec-kernel:<first 12 hex of the recipe's sha256>``.

    Paths and contents are both hashed, each length-prefixed, so that renaming
    a file or moving bytes from one file to another also changes the tag.
    """
    h = hashlib.sha256()
    for rel, path in recipe_files(recipe_dir):
        data = path.read_bytes()
        h.update(f"{len(rel)}:{rel}\0{len(data)}:".encode())
        h.update(data)
    return f"{REPO}:{h.hexdigest()[:12]}"


def default_image() -> str:
    """``$KERNELEXEC_IMAGE``, else the image built from this version's recipe."""
    return os.environ.get("KERNELEXEC_IMAGE") or image_tag()
