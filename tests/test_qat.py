"""Quantisation-aware training (students/qat.py) and where static int8 puts its ranges."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from exports.precision import ArrayCalibrationReader, float_prefix_nodes, quantize_int8_static, weighted_nodes
from exports.runtime import load_session
from students.qat import ActivationQuant, LearnedRange, conv_norm_pairs, fold_batchnorm, prepare_qat, trace_calls, uint8_grid


class PaddedConv(nn.Conv2d):
    """EfficientNet-Lite's Conv2dStaticSamePadding: a conv with its padding as a child module."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad = nn.ZeroPad2d(1)

    def forward(self, x):
        return super().forward(self.pad(x))


class TinyBlockNet(nn.Module):
    """EfficientNet-Lite's shape in miniature: conv-BN-ReLU6 twice through one shared ReLU6 module,
    a projection conv-BN, a residual add, pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn1 = PaddedConv(8, 8, 3, groups=8, bias=False), nn.BatchNorm2d(8)
        self.proj, self.bn2 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.act(self.bn0(self.stem(x)))
        y = self.act(self.bn1(self.dw(x)))
        x = x + self.bn2(self.proj(y))
        return self.head(x.mean(dim=(2, 3)))


def _net(seed: int = 0) -> TinyBlockNet:
    torch.manual_seed(seed)
    net = TinyBlockNet()
    for bn in (net.bn0, net.bn1, net.bn2):  # non-trivial statistics, as a trained network has
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def _pixels(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def test_folding_keeps_the_function_and_the_state_dict_keys():
    net, x = _net(), _pixels()
    before, keys = net(x), set(net.state_dict())
    pairs = conv_norm_pairs(trace_calls(net, lambda: net(x)))
    assert [(c, n) for c, n in pairs] == [(net.stem, net.bn0), (net.dw, net.bn1), (net.proj, net.bn2)]
    for conv, norm in pairs:
        fold_batchnorm(conv, norm)
    torch.testing.assert_close(net(x), before, atol=1e-5, rtol=1e-5)
    assert set(net.state_dict()) == keys
    assert torch.all(net.bn1.running_mean == 0) and torch.all(net.bn1.weight == 1)


def test_trace_does_not_touch_running_statistics():
    net, x = _net().train(), _pixels()
    mean = net.bn0.running_mean.clone()
    trace_calls(net, lambda: net(x))
    assert torch.equal(net.bn0.running_mean, mean) and net.training


def test_qat_rounds_forward_trains_the_fp32_weights_and_strips_clean():
    net, x = _net(), _pixels()
    reference = net(x).detach()
    keys = set(net.state_dict())
    handle = prepare_qat(net, lambda: net(x))
    # 5 layers: an input range each; outputs after stem+ReLU6, dw+ReLU6 (the shared ReLU6, one range
    # per call), proj+BN, head
    assert len(handle.layers) == 4 and handle.folded == 3 and len(handle.observers) == 8
    net.train()
    out = net(x)
    assert not torch.allclose(out, reference, atol=1e-6)  # rounded
    assert (out - reference).abs().max() < 0.2 * reference.abs().max()  # but close
    out.sum().backward()
    original = net.stem.parametrizations.weight.original
    assert original.grad is not None and original.grad.abs().sum() > 0  # straight-through
    net.bn0.train()
    assert torch.equal(net.bn0(torch.ones(2, 8, 3, 3)), net.bn0(torch.ones(2, 8, 3, 3) * 1))  # folded norms stay eval
    handle.strip(rounded=False)
    net.eval()
    assert set(net.state_dict()) == keys
    torch.testing.assert_close(net(x), reference, atol=1e-5, rtol=1e-5)  # plain fp32 again (weights unchanged)


def test_strip_leaves_weights_on_their_int8_grid():
    net, x = _net(), _pixels()
    handle = prepare_qat(net, lambda: net(x))
    handle.strip()  # rounded: what static int8 export will quantise without loss
    for layer in (net.stem, net.dw, net.proj, net.head):
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        steps = w / (w.abs().amax(dim=1, keepdim=True) / 127)
        torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)
    assert not hasattr(net.stem, "parametrizations")


def test_float_activations_is_the_model_strip_leaves_and_keeps_the_ranges():
    """qat.consistency's second forward: weights on their int8 grids, activations unrounded and unobserved."""
    net, x = _net(), _pixels()
    handle = prepare_qat(net, lambda: net(x))
    net.train()
    ranges = handle.ranges()
    with handle.float_activations():
        unrounded = net(x * 3)  # with gradients on: an observer would widen its range to these pixels
    assert handle.ranges() == ranges
    rounded = net(x)
    handle.strip()  # weights left on their grids, no activation rounding: what the int8 file is checked against
    net.eval()  # the folded norms' running statistics, as during QAT
    torch.testing.assert_close(unrounded, net(x * 3), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(rounded, net(x), atol=1e-6)  # outside the context the activations were rounded


def test_learned_ranges_start_at_the_first_batch_train_and_round_as_the_export_will():
    """qat.ranges=learned: the first batch's min/max, as an observed range starts; then a scale and zero point that
    the optimiser moves; the bounds ranges() reports (what the export and int8_bits read) round exactly as they did."""
    x = _pixels()
    observed_net, learned_net = _net(), _net()
    observed = prepare_qat(observed_net, lambda: observed_net(x))
    learned = prepare_qat(learned_net, lambda: learned_net(x), learned=True)
    assert learned.range_module is not None and observed.range_module is None
    assert len(list(learned.range_module.parameters())) == 2 * len(learned.observers)
    assert "(learned)" in learned.summary() and "(learned)" not in observed.summary()
    for handle in (observed, learned):
        handle.reset_ranges()
    observed_net.train(), learned_net.train()
    torch.testing.assert_close(learned_net(x), observed_net(x), atol=1e-5, rtol=1e-5)  # the same first range
    for key, (low, high) in observed.ranges().items():
        assert learned.ranges()[key] == pytest.approx([low, high], abs=2e-3 * (high - low))  # zero point on the grid
    before = learned.ranges()
    optimiser = torch.optim.SGD(learned.range_module.parameters(), lr=0.05)
    for _ in range(3):
        optimiser.zero_grad()
        (learned_net(x) ** 2).mean().backward()
        assert any(float(r.scale.grad.abs()) > 0 for r in learned.range_module)
        optimiser.step()
    after = learned.ranges()
    assert after != before and after.keys() == before.keys()
    with torch.no_grad():
        trained = learned_net(x)
    replay_net = _net()  # an observed-range model given the learnt bounds: the int8 graph's rounding
    replay = prepare_qat(replay_net, lambda: replay_net(x))
    for layer, source in zip(replay.layers, learned.layers):
        layer.parametrizations.weight.original.data.copy_(source.parametrizations.weight.original.data)
    replay.set_ranges(after)
    with torch.no_grad():
        torch.testing.assert_close(replay_net(x), trained, atol=1e-5, rtol=1e-5)
    learned.set_ranges(before)  # a resumed run: the learned scale and zero point start from the saved bounds
    assert all(learned.ranges()[k] == pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in before.items())


def test_both_range_kinds_round_to_one_uint8_grid_and_bf16_ranges_to_their_fp32_values():
    """uint8_grid is the one step/zero-point rule: an observed range and a learned range set from the same bounds
    round a tensor alike, and ranges observed in bf16 (autocast) give the grid of their fp32 values."""
    scale, zero = uint8_grid(torch.tensor(-1.0), torch.tensor(3.0))
    assert float(scale) == pytest.approx(4 / 255) and float(zero) == 64.0  # round(1 / (4 / 255)) = round(63.75)
    low, high = torch.tensor(-0.37, dtype=torch.bfloat16), torch.tensor(5.9, dtype=torch.bfloat16)
    assert uint8_grid(low, high)[0].dtype == torch.float32
    for got, want in zip(uint8_grid(low, high), uint8_grid(low.float(), high.float())):
        assert torch.equal(got, want)
    x = torch.linspace(-1.5, 3.5, 101)
    observed = ActivationQuant(low=torch.tensor(-1.0), high=torch.tensor(3.0))
    learned = LearnedRange()
    learned.set(torch.tensor(-1.0), torch.tensor(3.0))
    with torch.no_grad():
        torch.testing.assert_close(learned(x), observed(x), atol=1e-6, rtol=0)
    assert len(torch.unique(observed(x))) < len(x)  # it did round (and clip), not pass through


def test_prepare_qat_refuses_a_model_without_layers():
    net = nn.Sequential(nn.ReLU())
    with pytest.raises(ValueError, match="no Conv2d/Linear"):
        prepare_qat(net, lambda: net(torch.ones(2)))


class _Head(nn.Module):
    """The exported graph: pixel_values -> image_embeds (what quantize_int8_static expects)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, pixel_values):
        return self.net(pixel_values)


def test_qat_simulation_matches_onnxruntime_static_int8(tmp_path):
    """With the ranges of one batch on both sides, the fake-quantised torch forward is what
    onnxruntime's static int8 graph computes: QAT rounds where the export does."""
    net, x = _net(), _pixels(32)
    fp32_path = tmp_path / "fp32.onnx"
    torch.onnx.export(_Head(net), (x,), str(fp32_path), input_names=["pixel_values"], output_names=["image_embeds"],
                      dynamic_axes={"pixel_values": {0: "batch"}}, opset_version=17, dynamo=False)
    int8_path = quantize_int8_static(fp32_path, tmp_path / "int8.onnx",
                                     ArrayCalibrationReader([{"pixel_values": x.numpy()}]), reduce_range=False)
    graph = onnx.load(str(int8_path))
    assert not any(n.op_type == "Clip" for n in graph.graph.node)  # ReLU6 folded into the ranges
    # the file, not this CPU's int8 kernels (which saturate on x86 without VNNI): computed in float
    int8 = load_session(int8_path, optimization="disable").run(None, {"pixel_values": x.numpy()})[0]
    fp32 = net(x).detach().numpy()
    prepare_qat(net, lambda: net(x))  # first ranges from this same batch: what calibration saw
    with torch.no_grad():
        simulated = net(x).numpy()
    assert np.abs(simulated - int8).max() < 0.25 * np.abs(fp32 - int8).max()


def test_qat_ranges_reach_the_int8_graph_instead_of_calibrated_ones(tmp_path):
    """The ranges QAT trained under are matched to the fp32 graph's tensors by value and override
    calibration: the int8 graph computes what the fake-quantised student did, although the calibration
    images (3x brighter) would have given other ranges."""
    from exports.qat_ranges import ActivationRanges
    from students.qat import site_values

    net, x, cal = _net(), _pixels(32), 3 * _pixels(32, seed=2)
    handle = prepare_qat(net, lambda: net(x))
    with torch.no_grad():
        simulated = net(x).numpy()
    ranges = handle.ranges()
    assert len(ranges) == len(handle.observers)  # one key per range: none overwrites another
    handle.strip()
    fp32_path = tmp_path / "fp32.onnx"
    torch.onnx.export(_Head(net), (x,), str(fp32_path), input_names=["pixel_values"], output_names=["image_embeds"],
                      dynamic_axes={"pixel_values": {0: "batch"}}, opset_version=17, dynamo=False)
    sites = {k: (v, *ranges[k]) for k, v in site_values(net, x.numpy(), ranges).items()}
    learnt = ActivationRanges(probe={"pixel_values": x.numpy()}, sites=sites)
    outputs = {}
    for name, kwargs in (("qat", {"ranges": learnt}), ("calibrated", {})):
        path = quantize_int8_static(fp32_path, tmp_path / f"{name}.onnx",
                                    ArrayCalibrationReader([{"pixel_values": cal.numpy()}]), reduce_range=False, **kwargs)
        outputs[name] = load_session(path, optimization="disable").run(None, {"pixel_values": x.numpy()})[0]
    assert all(learnt.matched.values()), learnt.matched
    assert np.abs(outputs["qat"] - simulated).max() < 1e-3 < np.abs(outputs["calibrated"] - simulated).max()


def test_saved_qat_ranges_are_checked_on_load(tmp_path):
    from students.qat import QAT_RANGES_FILE, load_ranges, save_ranges

    assert load_ranges(tmp_path) is None
    save_ranges({"in:stem": [-1.0, 2.0]}, tmp_path)
    assert load_ranges(tmp_path) == {"in:stem": [-1.0, 2.0]}
    (tmp_path / QAT_RANGES_FILE).write_text('{"in:stem": [2.0, -1.0]}')
    with pytest.raises(ValueError, match=r"qat_ranges.json: expected .*low <= high; bad entries \['in:stem'\]"):
        load_ranges(tmp_path)
    (tmp_path / QAT_RANGES_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="qat_ranges.json: not valid JSON"):
        load_ranges(tmp_path)


def test_static_int8_uses_7_bit_weights_exactly_on_cpus_whose_kernels_saturate(tmp_path, monkeypatch):
    """reduce_range=None: 7-bit weights on x86 without VNNI (onnxruntime's advice there), 8-bit elsewhere."""
    from onnx import numpy_helper

    import exports.precision as precision

    net, x = _net(), _pixels(8)
    fp32_path = tmp_path / "fp32.onnx"
    torch.onnx.export(_Head(net), (x,), str(fp32_path), input_names=["pixel_values"], output_names=["image_embeds"],
                      opset_version=17, dynamo=False)
    widest = {}
    for dot in ("avx2 without vnni: u8s8 int8 may saturate", "vnni (avx512_vnni)"):
        monkeypatch.setattr(precision, "cpu_int8_dot", lambda dot=dot: dot)
        path = quantize_int8_static(fp32_path, tmp_path / f"{dot[:4]}.onnx",
                                    ArrayCalibrationReader([{"pixel_values": x.numpy()}]))
        weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.data_type == 3]
        widest[dot[:4]] = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert widest["avx2"] <= 64 < widest["vnni"] <= 127


def test_every_convolution_of_efficientnet_lite_is_found(tiny_clip):
    """The real student: its convs are Conv2dStaticSamePadding (a padding child); all 49 and the head
    are quantised and all 49 norms folded, and the folded fp32 network computes what it did."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs the reference extra")
    from students import build_student

    student = build_student("efficientnet-lite0-64", teacher=tiny_clip).eval()
    tower, x = student.image_tower, torch.randn(2, 3, 64, 64)
    convs = sum(isinstance(m, nn.Conv2d) for m in tower.modules())
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in tower.modules())
    with torch.no_grad():
        before = tower(x)
    handle = prepare_qat(tower, lambda: tower(x))
    assert convs == 49 and len(handle.layers) == convs + 1 and handle.folded == norms
    handle.strip(rounded=False)
    with torch.no_grad():
        after = tower(x)
    torch.testing.assert_close(getattr(after, "pooler_output", after), getattr(before, "pooler_output", before),
                               atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------- in the trainer


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_clip):
    """A tiny teacher on disk, labelled images and a saved image-only student to go on from."""
    from clipcore.testing import make_tiny_clip
    from students import build_student, save_student
    from tests.datagen import write_labelled

    root = tmp_path_factory.mktemp("qat-train")
    teacher_dir = make_tiny_clip(root / "teacher", seed=1)
    from clipcore.loading import load_teacher

    teacher = load_teacher(str(teacher_dir))
    save_student(build_student("test-tiny-resnet", teacher=teacher), root / "start")
    write_labelled(root / "data", n=16)
    (root / "empty.yaml").write_text("{}\n")
    return root, teacher_dir, teacher


def _overrides(saved, out, *extra):
    root, teacher_dir, _ = saved
    return [f"teacher.name_or_path={teacher_dir}", f"data.train={root / 'data'}", "data.templates=simple",
            "student.arch=test-tiny-resnet", f"student.init={root / 'start'}", "qat.enabled=true",
            "optim.batch_size=4", "optim.warmup_steps=1", "optim.max_steps=2", "progress=false",
            f"output_dir={out}", f"cache.dir={out.parent / 'cache'}", *extra]


def test_init_from_a_student_of_another_arch_and_qat_of_a_clip_student_are_refused(saved, tmp_path):
    from distill.config import ConfigError, load_config
    from distill.student_init import attach_qat, initial_student, with_text_student
    from students import build_student

    root, _, teacher = saved
    cfg = load_config(None, _overrides(saved, tmp_path / "o", "student.arch=test-tiny"))
    with pytest.raises(ConfigError, match=r"student.init=.*'test-tiny-resnet'.*student.arch='test-tiny'"):
        initial_student(cfg, teacher)
    with pytest.raises(ConfigError, match="qat.enabled=true: test-tiny has no image_tower"):
        attach_qat(cfg, build_student("test-tiny", teacher=teacher))
    with pytest.raises(ConfigError, match=r"export.text_student=.*nowhere.*no student.json"):
        with_text_student(load_config(None, _overrides(saved, tmp_path / "o", f"export.text_student={root / 'nowhere'}")),
                          build_student("test-tiny-resnet", teacher=teacher))
    with pytest.raises(ConfigError, match=r"export.text_student=.*a 'frozen_text' model, not a text student"):
        with_text_student(load_config(None, _overrides(saved, tmp_path / "o", f"export.text_student={root / 'start'}")),
                          build_student("test-tiny-resnet", teacher=teacher))
    with pytest.raises(ConfigError, match=r"qat.enabled=true trains in fp32: mixed_precision='bf16'"):
        load_config(None, _overrides(saved, tmp_path / "o", "mixed_precision=bf16"))
    with pytest.raises(ConfigError, match=r"qat.momentum=0.0"):
        load_config(None, _overrides(saved, tmp_path / "o", "qat.momentum=0"))
    with pytest.raises(ConfigError, match=r"qat.ranges='lsq'; expected 'observed' or 'learned'"):
        load_config(None, _overrides(saved, tmp_path / "o", "qat.ranges=lsq"))


def test_a_run_from_a_qat_student_drops_its_saved_ranges(saved, tmp_path):
    """Saved ranges describe the saved weights: a run that starts from them retrains the weights, so neither
    a plain fine-tune nor a second QAT run exports with the old ranges."""
    import shutil

    from distill.config import load_config
    from distill.student_init import initial_student
    from students import load_student
    from students.qat import save_ranges

    root, _, teacher = saved
    start = shutil.copytree(root / "start", tmp_path / "qat-start")
    save_ranges({"in:stem": [-1.0, 1.0]}, start)
    assert load_student(str(start), teacher=teacher).image_tower.qat_ranges == {"in:stem": [-1.0, 1.0]}
    cfg = load_config(None, _overrides(saved, tmp_path / "o", f"student.init={start}", "qat.enabled=false"))
    assert not getattr(initial_student(cfg, teacher).image_tower, "qat_ranges", None)


def test_qat_self_target_learns_the_fp32_students_own_outputs(saved, tmp_path):
    """qat.target=self: the targets are the frozen fp32 student's embeddings of the same pixels, so the
    fake-quantised student starts near them; the teacher's (a random tiny CLIP) are far."""
    import json

    from distill.config import ConfigError, load_config
    from distill.student_init import qat_self_reference
    from distill.train import main as train

    from students import load_student

    root = saved[0]
    first = {}
    export = ["export.enabled=true", "export.variants=fp32,int8", "export.parity_limit=8", "export.calibration_limit=8",
              "export.fail_on_gate=false", "export.int8_float_layers=1"]
    for target in ("teacher", "self"):
        out = tmp_path / target
        train(["--config", str(root / "empty.yaml"),
               *_overrides(saved, out, f"qat.target={target}", "optim.max_steps=1", "log_every=1", "optim.lr=1e-9"),
               *(export if target == "self" else [])])
        first[target] = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert first["self"]["feature_image_loss"] < 0.005 < 0.2 < first["teacher"]["feature_image_loss"]
    assert first["self"]["kl_class_loss"] < first["teacher"]["kl_class_loss"]
    # the parity report measures agreement against the fp32 student it started from, not the QAT'd one
    start, final = load_student(str(root / "start"), teacher=saved[2]), load_student(str(tmp_path / "self" / "final"))
    report = json.loads((tmp_path / "self" / "export" / "parity.json").read_text())
    assert report["student"]["agreement_reference"]["fingerprint"] == start.fingerprint() != final.fingerprint()
    assert report["student"]["fingerprint"] == final.fingerprint()
    assert float(final.logit_scale.detach()) == float(start.logit_scale.detach())  # frozen: one temperature for both
    rows = {r["name"]: r for r in report["subjects"]}
    assert rows["fp32"]["metrics"]["emb_max_abs_diff"] > 1e-4  # the fp32 export of the QAT'd weights differs
    assert "agreement measured against" in (tmp_path / "self" / "export" / "parity.md").read_text()
    # the ranges it trained under are saved with it and replace calibration in the int8 export
    assert set(final.image_tower.qat_ranges) == set(json.loads((tmp_path / "self" / "final" / "qat_ranges.json").read_text()))
    assert "activation ranges from QAT" in rows["int8"]["reason"]
    assert "the first 1 weighted layers fp32" in rows["int8"]["reason"]  # export.int8_float_layers reached it
    with pytest.raises(ConfigError, match="export.int8_float_layers must be >= 0, got -1"):
        load_config(None, _overrides(saved, tmp_path / "n", "export.int8_float_layers=-1"))
    assert "qat_ranges.json" not in [p.name for p in (root / "start").iterdir()]  # only QAT students carry them
    cfg = load_config(None, _overrides(saved, tmp_path / "o", "qat.target=self"))
    from distill.task import DistillTask
    from students import load_student

    student = load_student(str(root / "start"), teacher=saved[2]).train()
    task = DistillTask(student, saved[2], cfg.loss, None, None, self_reference=qat_self_reference(cfg, student)).train()
    assert task.training and not task.student.training  # no dropout or drop-connect against the fp32 self
    assert DistillTask(student, saved[2], cfg.loss, None, None).train().student.training  # target=teacher: as before
    with pytest.raises(ConfigError, match=r"qat.target=self learns a trained student's own outputs: student.init='imagenet'"):
        qat_self_reference(load_config(None, _overrides(saved, tmp_path / "o", "qat.target=self", "student.init=imagenet")),
                           None)
    with pytest.raises(ConfigError, match=r"qat.target='fp32'; expected 'teacher' or 'self'"):
        load_config(None, _overrides(saved, tmp_path / "o", "qat.target=fp32"))


def test_qat_consistency_adds_the_rounded_vs_unrounded_loss(saved, tmp_path):
    """qat.consistency: a second forward with activations unrounded; the loss is weight x (1 - cosine) between
    the two embeddings, logged, summed into the total, and the student trains in eval mode (same network twice)."""
    import json

    from distill.config import ConfigError, load_config
    from distill.task import DistillTask
    from distill.train import main as train

    from students import load_student

    root = saved[0]
    rows = {}
    for weight in (0, 1000):
        out = tmp_path / f"w{weight}"
        train(["--config", str(root / "empty.yaml"),
               *_overrides(saved, out, f"qat.consistency={weight}", "optim.max_steps=1", "log_every=1")])
        rows[weight] = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert "qat_consistency_loss" not in rows[0]
    assert 0 < rows[1000]["qat_consistency_loss"] < 1000  # rounding moves the embedding, a little
    others = sum(v for k, v in rows[1000].items() if k.endswith("_loss") and k != "qat_consistency_loss")
    assert rows[1000]["loss"] == pytest.approx(others + rows[1000]["qat_consistency_loss"], rel=1e-5)
    cfg = load_config(None, _overrides(saved, tmp_path / "o", "qat.consistency=1"))
    student = load_student(str(root / "start"), teacher=saved[2]).train()
    task = DistillTask(student, saved[2], cfg.loss, None, None, qat_cfg=cfg.qat).train()
    assert task.training and not task.student.training
    with pytest.raises(ConfigError, match=r"qat.consistency=-1.0: a weight >= 0"):
        load_config(None, _overrides(saved, tmp_path / "o", "qat.consistency=-1"))
    with pytest.raises(ConfigError, match=r"qat.consistency=2.0: .* only with qat.enabled=true"):
        load_config(None, _overrides(saved, tmp_path / "o", "qat.consistency=2", "qat.enabled=false"))


def test_qat_consistency_on_classes_is_the_kl_between_the_two_class_distributions(saved, tmp_path):
    """qat.consistency_on=classes: KL(unrounded || rounded) of the class distributions over the class KL's head at the
    student's logit scale, held fixed; it trains, is logged and summed, and is refused without a head."""
    import json
    from dataclasses import replace

    import torch.nn.functional as F

    from distill.config import ConfigError, load_config
    from distill.student_init import attach_qat
    from distill.task import DistillTask
    from distill.train import main as train

    from students import load_student

    root, _, teacher = saved
    cfg = load_config(None, _overrides(saved, tmp_path / "o", "qat.consistency=5", "qat.consistency_on=classes"))
    student = load_student(str(root / "start"), teacher=teacher)
    handle = attach_qat(cfg, student)
    head = F.normalize(torch.randn(7, teacher.embed_dim, generator=torch.Generator().manual_seed(3)), dim=-1)
    task = DistillTask(student, teacher, cfg.loss, None, head, qat_cfg=cfg.qat).train()
    task.qat = handle
    pixels = torch.randn(4, 3, *student.image_transform.output_size, generator=torch.Generator().manual_seed(4))
    s_img = student.encode_image(pixels)  # the first batch sets the activation ranges
    got = task._qat_consistency(pixels, s_img)
    with torch.no_grad(), handle.float_activations():
        s_float = student.encode_image(pixels)
    scale = student.log_logit_scale.exp()
    p = torch.softmax(scale * F.normalize(s_float, dim=-1) @ head.T, dim=-1)
    q = torch.softmax(scale * F.normalize(s_img, dim=-1) @ head.T, dim=-1)
    want = 5.0 * (p * (p.log() - q.log())).sum(dim=-1).mean()
    assert got.item() > 0
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    got.backward()
    assert student.log_logit_scale.grad is None or student.log_logit_scale.grad.abs().item() == 0  # scale held fixed
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.image_tower.parameters())
    task.qat_cfg = replace(cfg.qat, consistency_scale=100.0)  # a fixed sharper scale instead of the student's
    p = torch.softmax(100 * F.normalize(s_float, dim=-1) @ head.T, dim=-1)
    q = torch.softmax(100 * F.normalize(s_img, dim=-1) @ head.T, dim=-1)
    torch.testing.assert_close(task._qat_consistency(pixels, s_img),
                               5.0 * (p * (p.log() - q.log())).sum(dim=-1).mean(), atol=1e-6, rtol=1e-4)

    out = tmp_path / "classes"
    train(["--config", str(root / "empty.yaml"), *_overrides(saved, out, "qat.consistency=1000",
                                                             "qat.consistency_on=classes", "optim.max_steps=1",
                                                             "log_every=1")])
    row = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert row["qat_consistency_loss"] > 0
    others = sum(v for k, v in row.items() if k.endswith("_loss") and k != "qat_consistency_loss")
    assert row["loss"] == pytest.approx(others + row["qat_consistency_loss"], rel=1e-5)
    with pytest.raises(ConfigError, match=r"qat.consistency_on='logits'; expected 'embedding' or 'classes'"):
        load_config(None, _overrides(saved, tmp_path / "o", "qat.consistency=1", "qat.consistency_on=logits"))
    with pytest.raises(ConfigError, match=r"qat.consistency_scale=-1.0: a logit scale > 0, or 0 for the student's own"):
        load_config(None, _overrides(saved, tmp_path / "o", "qat.consistency_scale=-1"))
    with pytest.raises(ConfigError, match=r"qat.consistency_on=classes compares class distributions .*kl_on_classes"):
        train(["--config", str(root / "empty.yaml"), *_overrides(saved, tmp_path / "nohead", "qat.consistency=1",
                                                                 "qat.consistency_on=classes",
                                                                 "loss.kl_on_classes=false")])


@pytest.mark.parametrize("ranges", ["observed", "learned"])
def test_qat_on_two_cpu_processes(saved, tmp_path, ranges):
    """torchrun, gloo: each process rounds alike (observed ranges are per process, learned ones are parameters
    that DDP keeps equal); the saved student loads."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from clipcore.testing import free_port

    root = saved[0]
    out = tmp_path / "ddp"
    train = Path(__file__).resolve().parents[1] / "distill" / "train.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(train), "--config", str(root / "empty.yaml"), *_overrides(saved, out, "cpu=true", f"qat.ranges={ranges}")]
    proc = subprocess.run(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    learned = " (learned)" if ranges == "learned" else ""
    assert proc.stderr.count(f"QAT: 7 conv/linear layers with int8 weights, 14 uint8 activation ranges{learned}, "
                             "6 batch norms folded") == 2  # both processes
    assert "QAT removed" in proc.stderr
    start, final = load_file(str(root / "start" / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert set(start) == set(final)


def test_a_resumed_qat_run_keeps_the_activation_ranges_it_had_reached(saved, tmp_path):
    """The ranges are attributes, not in any state_dict: each checkpoint writes them (in its manifest), a resume
    puts them back. Before, a run resumed at its last step exported with ranges set afresh by one evaluation batch
    (the general student's int8 agreement fell from 95.4 to 88.6 %)."""
    import json
    import shutil

    from distill.checkpoint import read_manifest
    from distill.config import ConfigError
    from distill.train import main as train
    from students.qat import QAT_RANGES_FILE

    root, out = saved[0], tmp_path / "run"
    args = ["--config", str(root / "empty.yaml"), *_overrides(saved, out, "save_every=1", "log_every=1")]
    train(args)
    last = out / "checkpoints" / "step-2"
    saved_ranges = json.loads((last / QAT_RANGES_FILE).read_text())
    assert QAT_RANGES_FILE in read_manifest(last)["files"] and len(saved_ranges) > 2
    final = json.loads((out / "final" / QAT_RANGES_FILE).read_text())
    assert final == saved_ranges

    (out / "final" / QAT_RANGES_FILE).unlink()
    train([*args, "resume=latest"])  # at max_steps: no step runs, the student is saved and exported again
    assert json.loads((out / "final" / QAT_RANGES_FILE).read_text()) == saved_ranges

    older = tmp_path / "older"  # a checkpoint written before ranges were checkpointed
    shutil.copytree(out, older)
    (older / "checkpoints" / "step-2" / QAT_RANGES_FILE).unlink()
    manifest = read_manifest(older / "checkpoints" / "step-2")
    del manifest["files"][QAT_RANGES_FILE]
    (older / "checkpoints" / "step-2" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"step-2 holds no qat_ranges.json .*start the QAT fine-tune afresh"):
        train(["--config", str(root / "empty.yaml"), *_overrides(saved, older, "save_every=1"), "resume=latest"])


def test_learned_ranges_are_trained_by_the_run_and_saved_on_their_grid(saved, tmp_path):
    """The trainer's optimiser (built over the task) holds the learned ranges: they move, and the saved bounds
    are those of a uint8 grid (an integer zero point), which the int8 export writes as they are."""
    import json

    from distill.train import main as train
    from students.qat import QAT_RANGES_FILE

    root = saved[0]
    runs = {}
    for ranges in ("observed", "learned"):
        out = tmp_path / ranges
        train(["--config", str(root / "empty.yaml"), *_overrides(saved, out, f"qat.ranges={ranges}", "optim.lr=0.01",
                                                                 "optim.max_steps=3")])
        runs[ranges] = json.loads((out / "final" / QAT_RANGES_FILE).read_text())
    assert runs["learned"].keys() == runs["observed"].keys() and runs["learned"] != runs["observed"]
    for low, high in runs["learned"].values():
        scale = (high - low) / 255
        assert low <= 0 <= high and -low / scale == pytest.approx(round(-low / scale), abs=1e-3)


def test_set_ranges_refuses_sites_the_model_does_not_have():
    from students.qat import prepare_qat

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6())
    x = torch.randn(2, 3, 8, 8)
    handle = prepare_qat(net, lambda: net(x))
    handle.set_ranges(handle.ranges())
    with pytest.raises(ValueError, match=r"ckpt/qat_ranges.json: QAT ranges for sites this model does not have: \['out:nowhere'\]"):
        handle.set_ranges({"out:nowhere": [0.0, 1.0]}, source="ckpt/qat_ranges.json")


def test_int8_float_layers_keep_a_prefix_of_the_graph_fp32(tmp_path):
    """``float_layers``: the first weighted layers (with their ReLU6) stay fp32, their weights unquantised, and the
    rest is int8; every layer fp32 gives the fp32 graph's outputs; a count past the graph's layers is refused."""
    net, x = _net(), _pixels(32)
    fp32_path = tmp_path / "fp32.onnx"
    torch.onnx.export(_Head(net), (x,), str(fp32_path), input_names=["pixel_values"], output_names=["image_embeds"],
                      dynamic_axes={"pixel_values": {0: "batch"}}, opset_version=17, dynamo=False)
    layers = weighted_nodes(onnx.load(str(fp32_path)).graph)
    assert [len(group) for group, _ in layers] == [2, 2, 1, 1]  # stem + ReLU6, dw + ReLU6, proj, head
    assert float_prefix_nodes(onnx.load(str(fp32_path)).graph, 1) == layers[0][0]
    calibration = [{"pixel_values": x.numpy()}]
    fp32 = load_session(fp32_path).run(None, {"pixel_values": x.numpy()})[0]

    def mixed(k: int) -> tuple[onnx.GraphProto, np.ndarray]:
        path = quantize_int8_static(fp32_path, tmp_path / f"first{k}.onnx", ArrayCalibrationReader(calibration),
                                    reduce_range=False, float_layers=k)
        out = load_session(path, optimization="disable").run(None, {"pixel_values": x.numpy()})[0]
        return onnx.load(str(path)).graph, out

    def quantised_weights(graph: onnx.GraphProto) -> list[str]:
        dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        return [n.name for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in dq_outputs]

    names = [group[0] for group, _ in layers]
    for k in (0, 2):
        graph, _ = mixed(k)
        assert quantised_weights(graph) == names[k:]
        assert sum(n.op_type == "Clip" for n in graph.node) == k  # a float ReLU6 stays; an int8 one is its range
    graph, out = mixed(len(layers))
    assert quantised_weights(graph) == [] and not any(n.op_type == "QuantizeLinear" for n in graph.node)
    np.testing.assert_allclose(out, fp32, atol=1e-5)
    with pytest.raises(ValueError, match="int8_float_layers=5: expected 0 to 4"):
        mixed(5)
