"""task=export: TorchScript, torch.export and ONNX files reproduce the leader without its head."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import ffsd.models as M
from ffsd.config import ConfigError
from ffsd.tasks.export import Exporter, ExportError, check_export, onnx_initializers

from .checkpoints import run_task, write_release
from .conftest import make_cfg, write_tiny_cifar100

ATOL = 1e-4


def export_cfg(out: Path, checkpoint: Path, *overrides: str):
    return make_cfg(
        "task=export",
        f"checkpoint={checkpoint}",
        "model=resnet20",
        "dataset=synthetic",
        f"trainer.output_dir={out}",
        *overrides,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 3-student release leader exported to every format through the task entry point."""
    tmp = tmp_path_factory.mktemp("export")
    leader = write_release(tmp / "modelleader_best.pth", num_classes=10, num_students=3)
    cfg = export_cfg(
        tmp / "out",
        tmp / "modelleader_best.pth",
        "task.formats=[torchscript,exported_program,onnx]",
        "task.batch_size=4",
    )
    worst = run_task(cfg)
    return tmp / "out", leader, worst


def test_every_format_is_written_checked_and_recorded(exported, capsys):
    out, _, worst = exported
    report = json.loads((out / "export.json").read_text())
    assert set(report["formats"]) == {"torchscript", "exported_program", "onnx"}
    for rec in report["formats"].values():
        assert Path(rec["path"]).is_file() and rec["checked_batch_sizes"] == [4, 1]
        assert 0 <= rec["max_abs_diff"] <= ATOL and rec["within_tolerance"] is True
        assert rec["max_abs_logit"] > 0
    assert worst == max(r["max_abs_diff"] for r in report["formats"].values())
    assert report["inferred"]["num_students"] == 3 and report["network"] == "leader"
    assert report["trans_fusion_head"] is False
    assert report["parameters"] == M.count_parameters(M.resnet20(num_classes=10))
    assert report["input"]["shape"] == ["batch", 3, 32, 32]
    assert sorted(p.name for p in out.glob("resnet20_leader.*")) == [
        "resnet20_leader.onnx",
        "resnet20_leader.pt2",
        "resnet20_leader.torchscript.pt",
    ]


def _original_logits(leader, x):
    with torch.no_grad():
        return leader.eval()(x).logits  # the full leader, head included


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_reproduces_the_leader_and_has_no_head(exported):
    out, leader, _ = exported
    module = torch.jit.load(str(out / "resnet20_leader.torchscript.pt"))
    assert not any("trans_fusion" in k for k in module.state_dict())
    x = torch.randn(3, 3, 32, 32)  # a batch size the export never saw
    with torch.no_grad():
        torch.testing.assert_close(module(x), _original_logits(leader, x), rtol=0, atol=ATOL)


def test_exported_program_reproduces_the_leader_and_has_no_head(exported):
    out, leader, _ = exported
    program = torch.export.load(str(out / "resnet20_leader.pt2"))
    assert program.state_dict and not any("trans_fusion" in k for k in program.state_dict)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = program.module()(x)
    torch.testing.assert_close(got, _original_logits(leader, x), rtol=0, atol=ATOL)


def test_onnx_reproduces_the_leader_with_a_dynamic_batch_and_has_no_head(exported):
    import onnxruntime as ort

    out, leader, _ = exported
    path = out / "resnet20_leader.onnx"
    names = onnx_initializers(path)
    assert names and not any("trans_fusion" in n for n in names)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("images", "logits")
    assert inp.shape[1:] == [3, 32, 32] and isinstance(inp.shape[0], str)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        torch.testing.assert_close(got, _original_logits(leader, x), rtol=0, atol=ATOL)


def test_check_on_test_images_exports_a_student(tmp_path):
    data = write_tiny_cifar100(tmp_path / "data", n_train=4, n_test=6)
    write_release(tmp_path / "model0_best.pth", leader=False, index="0", num_classes=100)
    cfg = make_cfg(
        "task=export",
        f"checkpoint={tmp_path / 'model0_best.pth'}",
        "model=resnet20",
        "dataset=cifar100",
        f"dataset.root={data}",
        "dataset.verify_checksums=false",  # tiny files, not the official ones
        "dataset.loader.num_workers=0",
        f"trainer.output_dir={tmp_path / 'out'}",
        "task.formats=[torchscript]",
        "task.check_inputs=test",
    )
    assert run_task(cfg) <= ATOL
    report = json.loads((tmp_path / "out" / "export.json").read_text())
    assert report["network"] == "student0" and report["check"]["inputs"] == "test"
    assert report["formats"]["torchscript"]["checked_batch_sizes"] == [6, 1]
    assert (tmp_path / "out" / "resnet20_student0.torchscript.pt").is_file()


def test_missing_onnx_extra_fails_before_any_work(tmp_path, monkeypatch):
    write_release(tmp_path / "modelleader_best.pth")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    cfg = export_cfg(
        tmp_path / "out", tmp_path / "modelleader_best.pth", "task.formats=[torchscript,onnx]"
    )
    with pytest.raises(ExportError) as err:
        run_task(cfg)
    assert "onnxruntime" in str(err.value) and 'pip install -e ".[onnx]"' in str(err.value)
    assert "task.formats=[torchscript]" in str(err.value)
    assert not (tmp_path / "out").exists()
    # TorchScript alone still works without the extra
    cfg = export_cfg(
        tmp_path / "out", tmp_path / "modelleader_best.pth", "task.formats=[torchscript]"
    )
    assert run_task(cfg) <= ATOL


class Perturbed(Exporter):
    """A broken exporter: its "file" adds 1e-3 to the logits."""

    suffix = ".perturbed.pt"

    def save(self, model, example, path):
        torch.save(model.state_dict(), path)
        self.model = model

    def load(self, path):
        return lambda x: self.model(x) + 1e-3


def test_an_export_outside_the_tolerance_fails_with_its_difference(tmp_path):
    write_release(tmp_path / "modelleader_best.pth")
    cfg = export_cfg(
        tmp_path / "out",
        tmp_path / "modelleader_best.pth",
        "+task.exporters.perturbed._target_=tests.test_export.Perturbed",
        "task.formats=[perturbed]",
    )
    with pytest.raises(ExportError, match=r"perturbed export differs .* by up to 0\.001"):
        run_task(cfg)
    report = json.loads((tmp_path / "out" / "export.json").read_text())
    assert report["formats"]["perturbed"]["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)


def test_check_uses_atol_plus_rtol_times_the_logit():
    # Logits of 1e4: float32 itself is ~1e-3 from exact there, so 1e-3 off passes with rtol.
    big = torch.nn.Linear(2, 2)
    with torch.no_grad():
        big.weight.fill_(5e3)
        big.bias.zero_()
    x = torch.ones(3, 2)

    def shifted(v):
        return big(v) + 1e-3

    loose = check_export(shifted, big, [x], atol=1e-4, rtol=1e-5)
    assert loose["within_tolerance"] and loose["max_abs_logit"] == pytest.approx(1e4)
    assert loose["max_abs_diff"] == pytest.approx(1e-3, rel=0.05)  # float32 ulp at 1e4: 1e-3
    assert not check_export(shifted, big, [x], atol=1e-4, rtol=0.0)["within_tolerance"]


def test_bad_export_options_name_key_value_and_choices(tmp_path):
    cfg = export_cfg(
        tmp_path / "out",
        tmp_path / "modelleader_best.pth",
        "task.formats=[tflite]",
        "task.batch_size=1",
        "task.check_inputs=train",
    )
    with pytest.raises(ConfigError) as err:
        run_task(cfg)
    msg = str(err.value)
    assert (
        "task.formats=['tflite'] is not valid; choose from: torchscript, exported_program, onnx"
        in msg
    )
    assert "task.batch_size=1 must be an integer >= 2" in msg
    assert "task.check_inputs='train' is not valid; choose one of: random, test" in msg
    cfg = make_cfg("task=export", f"trainer.output_dir={tmp_path}")
    with pytest.raises(ConfigError, match="checkpoint=None: task=export needs"):
        run_task(cfg)
