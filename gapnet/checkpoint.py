"""Every file gapnet writes: atomic writes, and checkpoints as safetensors with JSON inside.

A checkpoint (``checkpoint.safetensors``) holds tensors (model weights under ``model.``,
optimizer state, RNG states, ...) and JSON metadata: the model's config, the training config,
the train state, the class names. Nothing is pickled, so loading a checkpoint never runs code;
a sha256 of the tensor data is stored beside them, so a damaged file is refused by name.

Every file goes through `atomic_write` (temp file in the same folder, fsync, rename): a crash
or Ctrl-C leaves the old file or the new one, never half of one.

Example:
    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "x.safetensors"
    >>> save(path, {"w": torch.ones(2)}, {"note": {"epochs": 3}})
    >>> tensors, meta = read(path)
    >>> tensors["w"].tolist(), meta["note"]
    ([1.0, 1.0], {'epochs': 3})
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor

from gapnet.models import GapNet, ModelConfig

CHECKPOINT = "checkpoint.safetensors"  # in a run folder
CONFIG_JSON = "config.json"  # the same configs as the checkpoint's, for humans
METRICS = "metrics.jsonl"  # one JSON object per epoch
FORMAT = "gapnet.checkpoint/1"  # the metadata tag that marks a gapnet checkpoint

PathLike = str | os.PathLike[str]


def atomic_write(path: PathLike, data: bytes) -> None:
    """Replace `path` with `data` all at once: a crash leaves the old file or the new one.

    Args:
        path: the file; its folder is created if needed.
        data: the whole new content.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "a" / "b.txt"
        >>> atomic_write(target, b"hi"); target.read_bytes()
        b'hi'
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write needs bytes, got {type(data).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not on every OS)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json(path: PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """`obj` as JSON (with a final newline), written atomically."""
    atomic_write(path, (json.dumps(obj, indent=indent) + "\n").encode())


def write_jsonl(path: PathLike, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line, written atomically."""
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


# --------------------------------------------------------------------------- safetensors


def save(path: PathLike, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> None:
    """Write tensors and JSON-able metadata as a gapnet safetensors file, atomically.

    Args:
        path: the file.
        tensors: name -> tensor (moved to the CPU; shared storage is cloned, as safetensors
            refuses it).
        metadata: name -> any JSON-serialisable value; "format" and "sha256" are set here.
    """
    flat: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        if t.numel() and key in seen:  # e.g. tied weights
            t = t.clone()
        seen.add(key)
        flat[name] = t
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    meta["format"] = FORMAT
    body = save_bytes(flat, meta)
    header_len = int.from_bytes(body[:8], "little")
    digest = hashlib.sha256(memoryview(body)[8 + header_len :]).hexdigest()
    atomic_write(path, save_bytes(flat, {**meta, "sha256": digest}))


def read(path: PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of a file `save` wrote.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is truncated or corrupt, or not a gapnet checkpoint (the message
            names the file and what is wrong).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    data = path.read_bytes()

    def damaged(why: str) -> ValueError:
        return ValueError(f"checkpoint {str(path)!r} is truncated or corrupt: {why}")

    if len(data) < 8:
        raise damaged(f"{len(data)} bytes, less than the 8-byte header length")
    header_len = int.from_bytes(data[:8], "little")
    if 8 + header_len > len(data):
        raise damaged(f"its header claims {header_len} bytes, the file has {len(data)} in all")
    try:
        header = json.loads(data[8 : 8 + header_len])
        raw = header.pop("__metadata__", None) or {}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise damaged(f"unreadable safetensors header ({e})") from None
    if 8 + header_len + end > len(data):
        raise damaged(f"expected {8 + header_len + end} bytes, the file has {len(data)}")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is a safetensors file but not a gapnet training checkpoint "
            f"(its metadata has no 'format': {FORMAT!r})"
        )
    digest = hashlib.sha256(memoryview(data)[8 + header_len :]).hexdigest()
    if raw.get("sha256") != digest:
        raise damaged("the sha256 of its tensor data does not match the one it was saved with")
    try:
        tensors = load_bytes(data)
    except Exception as e:  # safetensors raises its own error types
        raise damaged(str(e)) from None
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("format", "sha256"):
            meta[key] = value
            continue
        try:
            meta[key] = json.loads(value)
        except ValueError:  # checkpoints before 0.2 stored "torch" as a bare version string
            meta[key] = value
    return tensors, meta


def prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors whose names start with `prefix`, with it removed (a state dict)."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """A training checkpoint as read from disk.

    Args:
        path: the file.
        model_config: the model's architecture.
        train_config: the run's TrainConfig as a dict (`gapnet.train.TrainConfig.from_dict`).
        state: where the run was: epoch, step, metrics, complete, ...
        classes: class names, label i is classes[i]; None in checkpoints from before they
            were stored (`class_names` then numbers them).
        tensors: every tensor in the file (weights under "model.").
    """

    path: Path
    model_config: ModelConfig
    train_config: dict[str, Any]
    state: dict[str, Any]
    classes: list[str] | None
    tensors: dict[str, Tensor] = field(repr=False)

    def class_names(self) -> list[str]:
        """`classes`, or "0", "1", ... where the checkpoint does not name them."""
        return self.classes or [str(i) for i in range(self.model_config.num_classes)]

    def build_model(self, device: str | torch.device = "cpu") -> GapNet:
        """The model with its saved weights, in eval mode."""
        model = GapNet(self.model_config)
        try:
            model.load_state_dict(prefixed(self.tensors, "model."))
        except RuntimeError as e:
            raise ValueError(
                f"checkpoint {str(self.path)!r}: weights do not fit its model config: {e}"
            ) from e
        return model.to(device).eval()


def resolve(path: PathLike) -> Path:
    """A checkpoint file, or the run folder holding ``checkpoint.safetensors``."""
    p = Path(path)
    if not p.is_file() and (p.is_dir() or not p.suffix):
        p = p / CHECKPOINT
    return p


def load(path: PathLike) -> Checkpoint:
    """Read a training checkpoint (a file, or the run folder holding one).

    Reads no pickle and runs no code from the file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: truncated, corrupt, or not a gapnet checkpoint.

    Example:
        >>> load("no/such/run")
        Traceback (most recent call last):
        ...
        FileNotFoundError: checkpoint 'no/such/run/checkpoint.safetensors' not found
    """
    p = resolve(path)
    tensors, meta = read(p)
    try:
        model_config = ModelConfig.from_dict(meta["model_config"])
        train_config, state = meta["train_config"], meta["state"]
        if not isinstance(train_config, dict) or not isinstance(state, dict):
            raise TypeError("train_config and state must be JSON objects")
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"checkpoint {str(p)!r} is corrupt: bad metadata ({e})") from None
    classes = meta.get("classes")
    return Checkpoint(p, model_config, train_config, state, classes, tensors)


def load_model(path: PathLike, *, device: str | torch.device = "cpu") -> tuple[GapNet, Checkpoint]:
    """The model saved in a checkpoint (eval mode, on `device`) and the checkpoint itself."""
    ckpt = load(path)
    return ckpt.build_model(device), ckpt


# --------------------------------------------------------------------------- run state


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer's per-parameter state as tensors ("optim.<index>.<key>") and JSON scalars."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, param_state in optimizer.state_dict()["state"].items():
        for key, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{key}"] = value
            elif value is not None:
                scalars[f"{index}.{key}"] = value
    return tensors, scalars


def load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], scalars: dict[str, Any]
) -> None:
    """Restore what `optimizer_tensors` saved into an optimizer over the same parameters."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in prefixed(tensors, "optim.").items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = t
    for name, v in scalars.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = v
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, Tensor]:
    """torch's global RNG states (CPU, and each CUDA device once CUDA is in use)."""
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


def restore_rng(tensors: dict[str, Tensor]) -> None:
    """Set torch's global RNG states from `rng_tensors`' output (CUDA where the count matches)."""
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = prefixed(tensors, "rng.cuda.")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([cuda_states[str(i)] for i in range(len(cuda_states))])
