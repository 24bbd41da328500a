"""Tests for gapnet.export: ONNX files with free sizes, their parity with PyTorch, explicit pads.

Every check runs the exported file in onnxruntime (CPU) and compares it with the gapnet model
or layer run in PyTorch on the same random input; exports take seconds each, so the pooling
layers of a table share one graph.
"""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from cases import AVG_POOL_CASES, GLOBAL_CASES, MAX_POOL_CASES, Case
from PIL import Image
from torch import nn

from gapnet import data, export, models
from gapnet import nn as gnn
from gapnet.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZES = [(28, 28), (57, 57), (112, 112), (40, 71)]  # the three squares and a non-square
TOL = 1e-4  # float32, logits and class maps


def perturbed(model, seed):
    """`model` with random BatchNorm statistics and affine weights (a fresh model's are 0 and
    1, which would leave the folding of BN into the convolutions untested), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(1 + 0.3 * torch.randn(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


def graph_inputs(path):
    """[(name, [dim_param or dim_value, ...]), ...] of an ONNX file's inputs."""
    proto = onnx.load(str(path))
    return [
        (i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
        for i in proto.graph.input
    ]


# ----------------------------------------------------------------------------- model heads

HEAD_CASES = [
    # NiN's head: 1x1 conv to class maps, then GAP (ReduceMean); the maps are the conv output
    ("gap", "ReduceMean"),
    # ResNet's head: GAP, then a Linear; maps are W·features
    ("gap-fc", "ReduceMean"),
    # GeM with its learnable p (moved off 3 so that p is really read from the file)
    ("gem", "Pow"),
    # average and max concatenated: 2C features into the Linear
    ("catavgmax", "ReduceMax"),
]


@pytest.mark.parametrize("head, op", HEAD_CASES)
def test_heads_match_pytorch_at_any_size(tmp_path, head, op):
    model = perturbed(models.create("convnet-tiny", head=head), seed=len(head))
    if head == "gem":
        model.head.global_pool.p.data.fill_(2.5)
    path = tmp_path / f"{head}.onnx"
    result = export.export(model, path, cams=True, sizes=SIZES)
    assert [row.size for row in result.parity] == SIZES
    assert result.fixed_size is None and result.ok
    # the file again, run on other images than export's own check
    onnx_model = export.load(path)
    g = torch.Generator().manual_seed(1)
    for h, w in SIZES:
        x = torch.rand(3, 1, h, w, generator=g)
        got = onnx_model.run(x)
        with torch.no_grad():
            want_logits, want_maps = model(x), model.class_maps(x)
        assert (got["logits"] - want_logits).abs().max() <= TOL, (head, h, w)
        assert (got["cams"] - want_maps).abs().max() <= TOL, (head, h, w)
    # batch, height and width are free, channels fixed; only standard ONNX ops
    assert graph_inputs(path) == [("images", ["batch", 1, "height", "width"])]
    nodes = onnx.load(str(path)).graph.node
    assert {n.domain for n in nodes} <= {""}
    assert op in {n.op_type for n in nodes}
    assert onnx_model.classes == [str(i) for i in range(10)]
    assert onnx_model.config == model.config


def test_scale_space_exports_at_any_size(tmp_path):
    # the demo's robust model: its halvings (AveragePool, ceil mode) and the nearest Resize of
    # each level back to level 0's grid are standard ops, so the file takes any size too
    model = perturbed(models.create("convnet-tiny", head="gem", ceil_mode=True, levels=4), seed=3)
    path = tmp_path / "scale_space.onnx"
    result = export.export(model, path, cams=True, sizes=SIZES)
    assert result.ok and result.fixed_size is None
    assert max(max(r.logits_diff, r.cams_diff) for r in result.parity) <= TOL
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"AveragePool", "Resize", "Max"} <= ops
    # trained (a widest stroke recorded, so large strokes start at coarse levels): the file
    # runs the trained levels only, PyTorch's further eval halvings reach 1 px, where the
    # exporter cannot keep the size dynamic; parity holds against that, the model is left as is
    model.backbone.widest_stroke.fill_(0.05)
    result = export.export(model, tmp_path / "trained.onnx", sizes=SIZES)
    assert result.ok and model.backbone.extra_levels == models.EXTRA_LEVELS


def test_fc_head_exports_at_its_one_size(tmp_path):
    model = perturbed(models.create("convnet-tiny", head="fc"), seed=0)
    path = tmp_path / "fc.onnx"
    result = export.export(model, path, sizes=SIZES)
    # parity at 28x28 only, and the description says why
    assert result.fixed_size == 28 and [row.size for row in result.parity] == [(28, 28)]
    assert result.ok
    text = "\n".join(export.describe(result))
    assert "one input size only: exported at 28x28" in text
    assert graph_inputs(path) == [("images", ["batch", 1, 28, 28])]
    onnx_model = export.load(path)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert (onnx_model(x) - model(x)).abs().max() <= TOL
    with pytest.raises(ValueError, match="one input size 28x28; got 29x28"):
        onnx_model(torch.rand(1, 1, 29, 28))
    with pytest.raises(ValueError, match="no class activation maps"):
        export.export(model, tmp_path / "fc-cams.onnx", cams=True)


# ----------------------------------------------------------------------------- pooling layers

EXPORT_CASES = [
    # "same" with dilation and stride 2: the padding covers the dilated extent, per residue
    Case((9, 9), {"kernel_size": 3, "stride": 2, "dilation": 2, "padding": "same"}),
    # "same" with stride > dilated kernel: the padding is 0 or 1 depending on H mod 5
    Case((9, 9), {"kernel_size": 2, "stride": 5, "dilation": 2, "padding": "same"}),
    # "same" with a per-axis dilation and stride
    Case((9, 9), {"kernel_size": (3, 2), "stride": (1, 3), "dilation": (2, 1), "padding": "same"}),
]
AVG_EXPORT_CASES = [
    # average "same" with stride > kernel: no padding on some sizes, one cell on others
    Case((9, 9), {"kernel_size": 2, "stride": 3, "padding": "same"}),
    # average "same", a 1x1 kernel with stride 3: plain subsampling
    Case((9, 9), {"kernel_size": 1, "stride": 3, "padding": "same"}),
    # divisor_override on ceil_mode windows past the padding (ONNX AveragePool has none)
    Case((9, 9), {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True,
                  "divisor_override": 4}),
]  # fmt: skip
# Input sizes every layer takes: residues 0, 1, 2 mod 3 and 0..4 mod 5 on both axes
POOL_SIZES = [(9, 10), (10, 11), (11, 9), (12, 13), (13, 12), (16, 19), (19, 14)]
LAYERS = (
    [(f"max-{c}", gnn.MaxPool2d(**c.kwargs)) for c in MAX_POOL_CASES + EXPORT_CASES]
    + [(f"avg-{c}", gnn.AvgPool2d(**c.kwargs)) for c in AVG_POOL_CASES + AVG_EXPORT_CASES]
    + [(f"global-{c}", gnn.GlobalPool2d(**c.kwargs)) for c in GLOBAL_CASES]
)


class Every(nn.Module):
    """Every layer of the tables on the same input: one export for all of them."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        return tuple(layer(x) for layer in self.layers)


@pytest.fixture(scope="module")
def pools_onnx(tmp_path_factory):
    """(the layers in PyTorch, the onnxruntime session of their one exported graph)."""
    layers = Every([layer for _, layer in LAYERS])
    names = [f"out{i}" for i in range(len(LAYERS))]
    example = torch.randn(2, 3, 13, 17)
    graph = export.to_onnx(export.torch_ops(layers), example, min_size=9, output_names=names)
    path = tmp_path_factory.mktemp("pools") / "pools.onnx"
    path.write_bytes(graph)
    return layers, path


def test_every_padding_form_matches_pytorch_at_every_size(pools_onnx):
    layers, path = pools_onnx
    sess = export.session(path, threads=1)
    g = torch.Generator().manual_seed(0)
    wrong = []
    for h, w in POOL_SIZES:
        x = torch.randn(2, 3, h, w, generator=g)
        outputs = sess.run(None, {"images": x.numpy()})
        with torch.no_grad():
            expected = layers(x)
        for (name, _), got, want in zip(LAYERS, outputs, expected, strict=True):
            if got.shape != tuple(want.shape) or not np.allclose(got, want.numpy(), atol=1e-5):
                wrong.append(f"{name} at {h}x{w}")
    assert not wrong, wrong


def test_every_padding_is_explicit_pads(pools_onnx):
    _, path = pools_onnx
    nodes = onnx.load(str(path)).graph.node
    pools = [n for n in nodes if n.op_type in ("MaxPool", "AveragePool")]
    assert len(pools) >= len(MAX_POOL_CASES) + len(EXPORT_CASES)
    for node in pools:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("auto_pad", b"NOTSET") == b"NOTSET", node.name
        assert "pads" in attrs, node.name
    # "same" windows are padded by Pad nodes: with stride 1 the amounts do not depend on the
    # size and are constants, with a larger stride the graph computes them from H and W
    pads = [n.input[1] for n in nodes if n.op_type == "Pad"]
    constants = {i.name for i in onnx.load(str(path)).graph.initializer}
    computed = {out for n in nodes for out in n.output if n.op_type == "Concat"}
    assert {"constant", "computed"} == {"computed" if p in computed else "constant" for p in pads}
    assert all(p in computed or p in constants for p in pads)
    assert graph_inputs(path) == [("images", ["batch", 3, "height", "width"])]


# ----------------------------------------------------------------------------- bad input

BAD_LAYERS = [
    # ONNX pooling is NCHW: a channels-last layer is refused, naming it
    (gnn.MaxPool2d(2, layout="NHWC"), "layout='NHWC'"),
    # ONNX MaxPool's indices count over the whole tensor, PyTorch's per plane
    (gnn.MaxPool2d(2, return_indices=True), "return_indices=True"),
    # adaptive pooling to a size other than 1 has no ONNX op that takes any input size
    (gnn.AdaptiveAvgPool2d(3), "AdaptiveAvgPool2d"),
]


@pytest.mark.parametrize("layer, message", BAD_LAYERS)
def test_layers_onnx_cannot_express_are_refused_by_name(layer, message):
    with pytest.raises(ValueError, match=message):
        export.torch_ops(nn.Sequential(layer))


def test_load_refuses_files_that_are_not_gapnet_exports(tmp_path):
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(export.to_onnx(nn.Conv2d(1, 2, 3), torch.randn(2, 1, 9, 11)))
    with pytest.raises(ValueError, match="not a gapnet export"):
        export.load(plain)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        export.load(junk)
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx"):
        export.load(tmp_path / "missing.onnx")


def test_importing_export_loads_no_onnx():
    code = (
        "import sys, gapnet.export; print([m for m in ('onnx', 'onnxruntime') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory):
    """A test digit as a 45x37 grayscale PNG."""
    x = data.rescale(data.load("mnist-5k").test.images[:1], (37, 45))[0, 0]
    path = tmp_path_factory.mktemp("img") / "digit.png"
    Image.fromarray((x.clamp(0, 1) * 255).round().byte().numpy(), "L").save(path)
    return path


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_export_then_predict_and_eval_on_the_onnx_file(
    capsys, tmp_path, tiny_gap_run, digit_png
):
    out = tmp_path / "gap.onnx"
    code, text, err = cli(capsys, "export", tiny_gap_run, out, "--cams")
    assert code == 0, err
    assert "any H, W >= 4" in text and "40x71" in text
    largest = float(text.split("largest difference ")[1].split()[0])
    assert largest <= TOL
    # predict: the same top class and probabilities on the .onnx as on the checkpoint
    runs = {}
    for source in (tiny_gap_run, out):
        code, text, err = cli(capsys, "predict", digit_png, "-c", source, "--json")
        assert code == 0, err
        runs[source] = json.loads(text)[0]
    ckpt, onnx_run = runs[tiny_gap_run], runs[out]
    assert onnx_run["top_k"][0]["class"] == ckpt["top_k"][0]["class"]
    assert np.abs(np.array(onnx_run["probs"]) - ckpt["probs"]).max() <= TOL
    assert onnx_run["input"] == ckpt["input"] == [1, 37, 45]  # at the image's own size
    # eval: the same accuracy and loss, here on 56x56 canvases
    evals = []
    for source in (tiny_gap_run, out):
        code, text, err = cli(capsys, "eval", "-c", source, "--canvas", "56", "--n", "100",
                              "--json")  # fmt: skip
        assert code == 0, err
        evals.append(json.loads(text))
    assert evals[0]["acc"] == evals[1]["acc"]
    assert abs(evals[0]["loss"] - evals[1]["loss"]) <= TOL
    # cam needs the PyTorch model and says so
    code, _, err = cli(capsys, "cam", digit_png, "-c", out)
    assert code == 2 and "needs the checkpoint" in err
