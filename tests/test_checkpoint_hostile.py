"""Crafted checkpoints in a model folder: each is refused in one line naming the file, before
memory is spent on it (a zip bomb, a network of 16384 features declared by the embedded
config), never running pickled code; non-finite weights are refused; the digests a prediction
reports are those of the bytes it loaded."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from uumamba.errors import DataError, UserError
from uumamba.inference import Predictor
from uumamba.model_folder.checkpoints import read_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "model_v0_1"
BEST = "checkpoint_best.pt"


@pytest.fixture
def model(tmp_path) -> Path:
    root = tmp_path / "model"
    shutil.copytree(FIXTURE, root)
    return root


def _state(root: Path) -> dict:
    return torch.load(root / "fold_0" / BEST, weights_only=True)


def _refused(root: Path, error=DataError, match: str = "") -> str:
    with pytest.raises(error, match=match) as info:
        Predictor.from_model_dir(root, device="cpu")
    text = str(info.value)
    assert "\n" not in text and str(root / "fold_0" / BEST) in text
    return text


def test_a_zip_bomb_is_refused_before_it_is_unpacked(model):
    """torch.save stores entries uncompressed: a deflated one (64 MiB from 64 kB) is refused
    from the directory, before anything is unpacked."""
    path = model / "fold_0" / BEST
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}))
        archive.writestr("archive/data/0", b"\0" * (64 << 20))  # 64 MiB from ~64 kB
    path.write_bytes(buffer.getvalue())
    assert path.stat().st_size < 1 << 20
    _refused(model, match="entry archive/data.pkl is compressed")
    # a damaged zip directory (torch's reader would skip it) is refused, not handed on
    damaged = io.BytesIO()
    with zipfile.ZipFile(damaged, "w") as archive:
        info = zipfile.ZipInfo("archive/junk")
        info.extra = b"\x34\x12\x64\x00"  # an extra field claiming 100 bytes, 0 present
        archive.writestr(info, b"")
        archive.writestr("archive/data.pkl", pickle.dumps({}))
    path.write_bytes(damaged.getvalue())
    _refused(model, match="zip directory is damaged")


@pytest.mark.parametrize("content", [b"r\0\0\0\0", b"h\x05", b"PK\x03\x04garbage", b"\x80\x02]q\0."])
def test_crafted_bytes_are_one_line_errors(model, content):
    (model / "fold_0" / BEST).write_bytes(content)
    _refused(model, match="cannot read checkpoint|not a uumamba checkpoint")


def test_a_symlink_to_a_system_file_is_refused_without_its_content(model):
    path = model / "fold_0" / BEST
    path.unlink()
    os.symlink("/etc/passwd", path)
    text = _refused(model, match="cannot read checkpoint")
    assert "root:" not in text


def test_a_malicious_pickle_never_runs_and_gets_no_unsafe_advice(model, tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = _state(model)
    state["model"] = Evil()
    torch.save(state, model / "fold_0" / BEST)
    text = _refused(model, match="the safe loader refused it: not tensors and plain containers only")
    assert not marker.exists() and "weights_only=False" not in text


def test_a_model_entry_that_is_not_tensors_is_refused(model):
    state = _state(model)
    state["model"] = "weights"
    torch.save(state, model / "fold_0" / BEST)
    _refused(model, match="'model' is not a mapping")


@pytest.mark.parametrize("kind", ["complex", "float8", "sparse", "meta", "qint8"])
def test_weights_of_another_kind_are_refused_in_one_line(model, kind):
    """complex weights would be cast to real (NaN included) with a warning only; the others
    raised tracebacks from isfinite or load_state_dict."""
    state = _state(model)
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.dim() > 1)
    w = state["model"][name]
    state["model"][name] = {
        "complex": lambda: torch.full(w.shape, complex(float("nan"), 0)),
        "float8": lambda: w.to(torch.float8_e4m3fn),
        "sparse": lambda: w.to_sparse(),
        "meta": lambda: w.to("meta"),
        "qint8": lambda: torch.quantize_per_tensor(w, 0.1, 0, torch.qint8),
    }[kind]()
    if kind == "meta":  # torch.save cannot write meta tensors' data: a crafted state in memory
        with pytest.raises(DataError, match=f"weights {name} are not a dense tensor"):
            from uumamba.model_folder.checkpoints import _check_model
            _check_model(model / "x.pt", state["model"])
        return
    torch.save(state, model / "fold_0" / BEST)
    _refused(model, match=f"weights {name} are not a dense tensor of a real dtype")


def test_a_checkpoint_over_the_size_limit_is_refused_unread(model, monkeypatch):
    import uumamba.model_folder.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "MAX_CHECKPOINT_BYTES", 1000)
    _refused(model, match=r"more than 1000 \(the limit\); refused unread")


def test_integer_weights_for_a_float_parameter_are_refused(model):
    state = _state(model)
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.dim() > 1)
    state["model"][name] = state["model"][name] > 0  # bool: load_state_dict would cast it
    torch.save(state, model / "fold_0" / BEST)
    _refused(model, error=UserError, match=f"first: {name}: torch.bool for torch.float32")


def test_non_finite_weights_are_refused(model):
    state = _state(model)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    torch.save(state, model / "fold_0" / BEST)
    _refused(model, match=f"weights {name} hold NaN or Inf")


def test_a_huge_network_in_the_embedded_config_allocates_nothing(model):
    state = _state(model)
    state["config"]["model"]["features"] = [4096, 8192, 16384]
    torch.save(state, model / "fold_0" / BEST)
    # refused on the meta device: a real build would need about 15 GB
    _refused(model, error=UserError, match="weights do not fit the network of its config")


def test_the_digest_is_of_the_bytes_loaded(model):
    path = model / "fold_0" / BEST
    predictor = Predictor.from_model_dir(model, device="cpu")
    loaded = hashlib.sha256(path.read_bytes()).hexdigest()
    (digest,) = predictor.weights
    assert (digest.fold, digest.file, digest.sha256) == ("fold_0", f"fold_0/{BEST}", loaded)
    assert digest.size_bytes == path.stat().st_size
    state = _state(model)
    state["iteration"] = 99
    torch.save(state, path)  # replaced after loading (a training still writing)
    assert predictor.weights[0].sha256 == loaded != hashlib.sha256(path.read_bytes()).hexdigest()
    _, sha, size = read_checkpoint(path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() and size == path.stat().st_size


def test_latest_without_folds_names_a_fold_that_has_only_a_best(model):
    shutil.copytree(model / "fold_0", model / "fold_1")
    (model / "fold_1" / "checkpoint_latest.pt").unlink()
    with pytest.raises(UserError, match="fold_1 has no checkpoint_latest.pt, only checkpoint_best"):
        Predictor.from_model_dir(model, device="cpu", checkpoint="latest")
    assert Predictor.from_model_dir(model, folds="0", device="cpu",
                                    checkpoint="latest").fold_names == ["fold_0"]


def test_the_meta_network_check_stays_cheap():
    """check_weights builds the network on the meta device for every fold a prediction loads:
    the initialisations skip it there, so it never imports torch's compiler (1.5 s of start-up
    per process)."""
    import subprocess
    import sys

    code = ("import sys, torch; from uumamba.model_folder import ModelFolder; "
            "from uumamba.nn import build_network; "
            f"f = ModelFolder({str(FIXTURE)!r}); plans = f.load_plans(); "
            "m = f.load_config().model; cfgs = [m, m.model_copy(update={'name': 'umamba_enc'})]\n"
            "with torch.device('meta'):\n"
            "    [build_network(c, plans) for c in cfgs]\n"
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
