"""gapnet.checkpoint: atomic writes, safetensors + JSON round trips, refusals, old files."""

import hashlib
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from gapnet import checkpoint, models


def test_save_read_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "tied": None}
    tensors["tied"] = tensors["a"]  # shared storage: safetensors refuses it, save clones
    meta = {"epochs": 3, "classes": ["zero", "one"], "nested": {"x": [1, 2.5, None]}}
    path = tmp_path / "x.safetensors"
    checkpoint.save(path, tensors, meta)
    got, got_meta = checkpoint.read(path)
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[k], tensors[k]) for k in got)
    assert {k: got_meta[k] for k in meta} == meta and got_meta["format"] == checkpoint.FORMAT


def test_load_model_rebuilds_the_model_with_its_weights_and_classes(tmp_path):
    model = models.create("convnet-tiny", head="gap", num_classes=3).eval()
    state = {"epoch": 1}
    checkpoint.save(
        tmp_path / checkpoint.CHECKPOINT,
        {f"model.{k}": v for k, v in model.state_dict().items()},
        {"model_config": model.config.to_dict(), "train_config": {}, "state": state,
         "classes": ["a", "b", "c"]},
    )  # fmt: skip
    loaded, ckpt = checkpoint.load_model(tmp_path)  # the run folder works too
    x = torch.rand(2, 1, 30, 26)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert ckpt.classes == ["a", "b", "c"] and ckpt.state == state and not loaded.training


def old_format_checkpoint(path, model):
    """What gapnet wrote before checkpoint.py: JSON strings, plus a bare "torch" version."""
    flat = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    meta = {"format": checkpoint.FORMAT, "train_config": json.dumps({"head": "gap"}),
            "model_config": json.dumps(model.config.to_dict()),
            "state": json.dumps({"epoch": 2}), "torch": "2.13.0+cpu"}  # fmt: skip
    body = safetensors_bytes(flat, meta)
    n = int.from_bytes(body[:8], "little")
    meta["sha256"] = hashlib.sha256(body[8 + n :]).hexdigest()
    path.write_bytes(safetensors_bytes(flat, meta))


def test_checkpoints_written_before_checkpoint_py_still_load(tmp_path):
    model = models.create("convnet-tiny", head="gap").eval()
    path = tmp_path / "old.safetensors"
    old_format_checkpoint(path, model)
    loaded, ckpt = checkpoint.load_model(path)
    assert ckpt.classes is None and ckpt.class_names() == [str(i) for i in range(10)]
    assert ckpt.state == {"epoch": 2}
    x = torch.rand(1, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


class _Exploit:
    """Unpickles as a call that leaves a marker file: what a malicious 'checkpoint' carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# (what the file is, how to make it, the words of the error)
REFUSED = [
    ("a torch.save zip (pickles inside)",
     lambda p, m: torch.save({"x": _Exploit(m)}, p), "truncated or corrupt"),
    ("a raw pickle", lambda p, m: p.write_bytes(pickle.dumps(_Exploit(m))), "truncated or corrupt"),
    ("an empty file", lambda p, m: p.write_bytes(b""), "less than the 8-byte header"),
    ("safetensors, but not gapnet's", lambda p, m: p.write_bytes(
        safetensors_bytes({"w": torch.ones(1)})), "not a gapnet training checkpoint"),
]  # fmt: skip


@pytest.mark.parametrize("make,words", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_files_that_are_not_gapnet_checkpoints_are_refused_without_unpickling(
    tmp_path, make, words
):
    path, marker = tmp_path / "checkpoint.safetensors", tmp_path / "pwned"
    make(path, marker)
    with pytest.raises(ValueError, match=words) as e:
        checkpoint.load(path)
    assert str(path) in str(e.value)
    assert not marker.exists()  # nothing in the file ran


def test_damaged_tensor_data_fails_the_checksum(tmp_path):
    path = tmp_path / "x.safetensors"
    checkpoint.save(path, {"w": torch.ones(64)}, {})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        checkpoint.read(path)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    checkpoint.write_json(target, {"v": 1})
    calls = []

    def crash(src, dst):  # the rename never happens: as if the process died before it
        calls.append(src)
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        checkpoint.write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1} and calls
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind


def test_optimizer_state_round_trip():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, scalars = checkpoint.optimizer_tensors(opt)
    fresh = torch.optim.AdamW(model.parameters())
    checkpoint.load_optimizer(fresh, tensors, json.loads(json.dumps(scalars)))  # via JSON
    a, b = opt.state_dict()["state"], fresh.state_dict()["state"]
    assert a.keys() == b.keys()
    for i in a:
        assert all(torch.equal(torch.as_tensor(a[i][k]), torch.as_tensor(b[i][k])) for k in a[i])
