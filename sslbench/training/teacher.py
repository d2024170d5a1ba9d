"""Building a stage's frozen teacher (``[stages.teacher]``) and hashing its file.

The teacher table has the ``[backbone]`` keys, so any backbone a recipe can build can teach, and any registered
checkpoint format can hold its weights — an official release (``mocov3``, ``timm``, ``mae``, ``data2vec2``) or an
earlier sslbench run's ``checkpoints/backbone.pt`` (``sslbench``, or ``sslbench_ema`` for its EMA). The file's
sha256 is filled into the resolved recipe (``checkpoint_sha256``), which makes it part of the recipe hash: a run
resumed with another teacher file is refused as another recipe, and two leaderboard rows with different teachers
are never one recipe. The teacher is built and loaded once per run (again on resume: it is not in checkpoints).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sslbench.core.errors import RecipeError, UserError
from sslbench.training.spec import TeacherSpec

_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered per (path, size, modification time) for the process: a recipe is
    resolved several times per command and a ViT-L file takes seconds to read."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def teacher_kwargs(spec: TeacherSpec, student, registry) -> dict:
    """``build_backbone`` arguments of a teacher: its keys (image size and channels defaulting to the student's,
    whose views it sees) and what its checkpoint format implies."""
    kwargs = {k: getattr(spec, k) for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")}
    kwargs["img_size"] = spec.img_size or student.img_size
    kwargs["in_chans"] = spec.in_chans or student.in_chans
    kwargs["pos_embed"] = spec.pos_embed
    kwargs["model_args"] = dict(spec.model_args)
    kwargs.update(registry.get("checkpoint_format", spec.checkpoint_format).factory.architecture)
    return kwargs


def build_teacher(spec: TeacherSpec, student, registry, key: str, load: bool | str = True):
    """The :class:`~sslbench.core.teacher.FrozenTeacher` of a stage. ``key`` (``stages[i].teacher``) names it in
    errors. ``load``: True loads the file (it must be the one the recipe hashed); ``"present"`` loads it only if it
    is on this machine (``--dry-run``: random weights otherwise); False builds without weights (``check``)."""
    from sslbench.core.backbone import build_backbone
    from sslbench.core.checkpoints import UntrustedPickle, load_checkpoint
    from sslbench.core.teacher import FrozenTeacher

    try:
        network = build_backbone(spec.model, **teacher_kwargs(spec, student, registry))
    except UserError as exc:            # build_backbone names [backbone] keys; these are the teacher's
        raise RecipeError(key, str(exc).replace("backbone.", f"{key}.")) from None
    path = Path(spec.checkpoint)
    if load == "present":
        load = path.is_file()
    if load:
        if not path.is_file():
            raise RecipeError(f"{key}.checkpoint", f"file not found: {path} (from {Path.cwd()})")
        digest = file_sha256(path)
        if spec.checkpoint_sha256 and digest != spec.checkpoint_sha256.lower():
            raise RecipeError(f"{key}.checkpoint", f"{path} changed since the recipe was resolved (sha256 "
                                                   f"{digest}, expected {spec.checkpoint_sha256})")
        fmt = registry.get("checkpoint_format", spec.checkpoint_format).factory
        try:
            load_checkpoint(network, path, fmt, allow_pickle=spec.checkpoint_trusted)
        except UntrustedPickle as exc:
            raise RecipeError(f"{key}.checkpoint_trusted",
                              f"{exc.path} pickles Python objects besides tensors ({exc.found}); loading it runs "
                              f"code from the file. If you trust its source, set {key}.checkpoint_trusted = true "
                              "(or re-save just its state dict)") from None
        except UserError as exc:
            raise RecipeError(f"{key}.checkpoint", str(exc)) from None
    return FrozenTeacher(network, source=f"{spec.checkpoint} ({spec.checkpoint_format})")
