"""What the web demo runs for one image: the model's answer and where it looked.

No web framework here: `Predictor.predict` takes the bytes of an image file and returns a
JSON-ready dict, so the server, the tests and a script all call the same code. The model only
ever reads (eval mode, no grad), so one `Predictor` serves concurrent requests from several
threads; each call builds its own tensors and result.
"""

from __future__ import annotations

import base64
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gapnet import cam, checkpoint, data, inference
from gapnet.compare import DEMO, robust_config
from gapnet.models import GapNet, eval_mode
from gapnet.train import TrainConfig, train

MAX_PIXELS = 4_000_000  # images over this are refused before they are decoded (2000x2000)
CAM_THRESHOLD = 0.2  # CAM box threshold on the normalised map, as `gapnet cam`'s default
CAM_REGION = "largest"  # the CAM paper's rule: the largest connected region above it
BOX_COLOR = (255, 64, 64)
DEFAULT_TOP_K = 3


class InputError(ValueError):
    """An upload the model cannot take: not an image, corrupt, too large or too small."""


def model_input(model: GapNet, x: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """`gapnet.inference.model_input`, its ValueError as an `InputError` (a 422 answer)."""
    try:
        return inference.model_input(model, x)
    except ValueError as e:
        raise InputError(str(e)) from None


def _png_data_url(img: Any) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Predictor:
    """A trained model and its class names, answering one image at a time.

    Args:
        model: a `GapNet` (moved to the CPU, eval mode).
        classes: class names; label i is classes[i].
        source: where the model came from (shown by /api/health and the page).
        max_pixels: refuse images with more pixels, before decoding them.

    Example:
        >>> from PIL import Image
        >>> from gapnet.models import create
        >>> buf = io.BytesIO(); Image.new("L", (45, 30)).save(buf, "PNG")
        >>> p = Predictor(create("convnet-tiny"), [str(i) for i in range(10)], source="untrained")
        >>> out = p.predict(buf.getvalue())
        >>> out["input"], len(out["top_k"]), round(sum(out["probs"]), 5), out["cam"]["box"][:2]
        ([1, 30, 45], 3, 1.0, [0, 0])
    """

    def __init__(
        self,
        model: GapNet,
        classes: list[str],
        *,
        source: str,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        if not isinstance(model, GapNet):
            raise TypeError(f"Predictor needs a gapnet GapNet, got {type(model).__name__}")
        if len(classes) != model.num_classes:
            raise ValueError(
                f"Predictor: the model has {model.num_classes} classes, got {len(classes)} names"
            )
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise ValueError(f"Predictor: max_pixels must be an int >= 1, got {max_pixels!r}")
        self.model = model.cpu().eval()
        self.classes, self.source, self.max_pixels = list(classes), source, max_pixels
        self.has_cam = model.has_cam

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS
    ) -> Predictor:
        """The model of a checkpoint (or its run folder); safetensors and JSON, no pickle."""
        model, ckpt = checkpoint.load_model(path)
        return cls(model, ckpt.class_names(), source=str(ckpt.path), max_pixels=max_pixels)

    def info(self) -> dict[str, Any]:
        """The model as /api/health and the page describe it."""
        config = self.model.config
        fixed = self.model.input_size
        return {
            "source": self.source, "arch": config.arch, "head": config.head,
            "classes": self.classes, "in_chans": config.in_chans,
            "min_input_size": self.model.backbone.min_input_size, "fixed_size": fixed,
            "cam": self.has_cam, "max_pixels": self.max_pixels,
        }  # fmt: skip

    def predict(
        self, image: bytes, *, name: str = "image", top_k: int = DEFAULT_TOP_K
    ) -> dict[str, Any]:
        """The model's answer for one image file, JSON-ready.

        Args:
            image: the file's bytes (PNG, JPEG, ... any size and mode).
            name: what to call it in errors.
            top_k: how many of the most likely classes to list (at most all of them).

        Returns:
            ``top_k`` ([{"class", "name", "prob"}], most likely first), ``probs`` (every
            class, summing to 1), ``image`` (size, mode, inverted), ``input`` ([C, H, W] the
            model saw), ``resized`` (None, or why it was), ``cam`` (class, box (x0, y0, x1, y1)
            ends exclusive, overlay as a PNG data URL; None for an fc head, with
            ``cam_note``) and ``seconds``.

        Raises:
            InputError: the image cannot be read, or the model cannot take it.
            ValueError: top_k is not an int >= 1.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        start = time.perf_counter()
        chans = self.model.config.in_chans
        try:
            x, info = data.read_image(
                image, chans, invert="auto", max_pixels=self.max_pixels, name=name
            )
        except data.ImageError as e:
            raise InputError(str(e)) from None
        x, resized = model_input(self.model, x)  # (C, H, W)
        logits, heat = self._run(x)
        probs = logits.float().softmax(0)  # (K,)
        top = probs.topk(min(top_k, len(probs)))
        out: dict[str, Any] = {
            "top_k": [
                {"class": int(c), "name": self.classes[int(c)], "prob": float(p)}
                for p, c in zip(top.values, top.indices, strict=True)
            ],
            "probs": [float(p) for p in probs],
            "image": {"name": name, "size": list(info.size), "mode": info.mode,
                      "inverted": info.inverted},
            "input": list(x.shape),
            "resized": resized,
            "cam": None if heat is None else self._cam(x, heat, int(top.indices[0])),
            "cam_note": None if heat is not None else (
                f"a {self.model.config.head} head has no class activation map: a fully "
                "connected layer mixes every location into every logit"
            ),
        }  # fmt: skip
        out["seconds"] = time.perf_counter() - start
        return out

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (K,) and, with a CAM, the predicted class's normalised map (H, W)."""
        if not self.has_cam:
            with eval_mode(self.model):
                return self.model(x[None])[0], None
        res = cam.class_activation_maps(self.model, x[None])  # one forward pass for both
        return res.logits[0], res.maps[0]

    def _cam(self, x: torch.Tensor, heat: torch.Tensor, cls: int) -> dict[str, Any]:
        box = [int(v) for v in cam.cam_boxes(heat[None], CAM_THRESHOLD, CAM_REGION)[0]]
        img = cam.overlay(x, heat, boxes=[(box, BOX_COLOR)])
        return {"class": cls, "box": box, "overlay": _png_data_url(img)}


# ----------------------------------------------------------------------------- the demo model


def demo_config() -> TrainConfig:
    """The TrainConfig of the demo's size-robust model (trained into runs/demo/gem-robust)."""
    return robust_config(DEMO.spec, DEMO.out)


def demo_checkpoint(cfg: TrainConfig | None = None, *, progress: bool = True) -> Path:
    """The demo model's checkpoint, trained first (with a progress bar) when it is missing.

    Args:
        cfg: the TrainConfig to use (default `demo_config()`; tests pass a tiny one).
        progress: show training progress on stderr.
    """
    cfg = demo_config() if cfg is None else cfg
    path = cfg.run_dir / checkpoint.CHECKPOINT
    if path.is_file() and checkpoint.load(path).state.get("complete"):
        return path
    print(
        f"gapnet serve: no trained model in {cfg.run_dir}: training the demo's {cfg.head} model "
        f"first ({cfg.epochs} epochs on {cfg.data})",
        file=sys.stderr,
    )
    train(cfg, progress=progress, resume=path.is_file())
    return path


def load_predictor(
    source: str | os.PathLike[str] | None = None,
    *,
    max_pixels: int = MAX_PIXELS,
    demo: Any = None,
    progress: bool = True,
) -> Predictor:
    """The `Predictor` of a checkpoint or run folder; None: the demo's model (`demo_checkpoint`).

    Args:
        source: a checkpoint file or run folder; not an .onnx file (the CAM needs PyTorch).
        max_pixels: as `Predictor`.
        demo: the TrainConfig of the default model (default `demo_config()`).
        progress: show training progress if the default model must be trained.
    """
    if source is not None and Path(source).suffix == ".onnx":
        raise ValueError(
            f"gapnet serve needs a checkpoint, got the ONNX file {str(source)!r}: the page's class "
            "activation map is computed by the PyTorch model"
        )
    path = demo_checkpoint(demo, progress=progress) if source is None else source
    return Predictor.from_checkpoint(path, max_pixels=max_pixels)
