"""
Tests for the whole repo (CPU, no network, seconds each). Run: python -m pytest -q test_methods.py

Sections, one banner per file: common.py (networks, samplers, data, checkpoints, faults, DDP,
FID); asfm.py; integration_flow.py; consistency_func.py; scoreflow.py; toy2d.py; then what holds
for all four scripts (real digits, one training step per method, --help and run folders).
"""
import argparse
import contextlib
import errno
import glob
import hashlib
import math
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import asfm
import common
import consistency_func
import integration_flow
import scoreflow
import toy2d

HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = {"asfm": asfm, "integration_flow": integration_flow, "consistency_func": consistency_func,
           "scoreflow": scoreflow, "toy2d": toy2d}
SCRIPTS = ("asfm", "integration_flow", "consistency_func", "scoreflow")  # the four method scripts
torch.set_num_threads(min(2, torch.get_num_threads()))


# ---- shared helpers: arguments, tiny data, DDP spawners --------------------------

def make_args(argv=(), method="test"):
    argv = list(argv)
    if "--out-dir" not in argv:  # never write into the repo
        argv += ["--out-dir", tempfile.mkdtemp(prefix="test-run-")]
    parser = common.add_common_args(argparse.ArgumentParser())
    return common.finish_args(parser.parse_args(argv), method=method)


def write_pngs(folder, n, size=20, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"{i:03d}.png"))


def tiny_run(tmp_path, *extra):
    args = make_args(["--dataset", "moons", "--device", "cpu", "--out-dir", str(tmp_path / "run"),
                      "--width", "16", "--depth", "1", *extra])
    return args, common.Run(args)


def points_file(tmp_path, n=256, seed=0):
    """A small 2-D data set (8 gaussians) so that epochs are a few steps long."""
    path = tmp_path / "pts.npy"
    x, _ = common.toy_sample("8gaussians", n, torch.Generator().manual_seed(seed))
    np.save(path, x.numpy())
    return str(path), x


# ---- DDP: two gloo processes on one CPU ----

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two_ranks(fn, tmp_path, *args):
    """Run fn(rank, 2, port, str(tmp_path), *args) in 2 processes (gloo on CPU)."""
    mp.spawn(fn, args=(2, free_port(), str(tmp_path), *args), nprocs=2)


def torchrun(script, args, tmp_path):
    """Run `script` under torchrun with 2 gloo processes on CPU; returns the completed process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), script] + args
    res = subprocess.run(cmd, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


#################################################################################
#                                   common.py                                   #
#################################################################################

def test_a_method_copied_out_needs_only_common_parts_1_to_3():
    # issue 22: the method classes (losses, sampling rules) use only common.py's first three
    # parts (networks, samplers, EMA and the optimizer step), which come first in the file; the
    # rest is this repo's plumbing (data, metrics, runs, CLI) that a copier can leave behind
    import ast
    src = open(common.__file__).read()
    part4 = next(i for i, line in enumerate(src.splitlines(), 1) if re.match(r"#\s+4\. Data\s+#", line))
    where = {t.id if isinstance(t, ast.Name) else t: n.lineno for n in ast.parse(src).body
             for t in ([n.name] if hasattr(n, "name") else getattr(n, "targets", []))}
    classes = {"asfm": ["RectifiedFlow", "TrainingMemory", "ASFM"],
               "integration_flow": ["IntegrationFlow", "AnchorBank"],
               "consistency_func": ["ConsistencyTraining"], "scoreflow": ["ScoreFlow"]}
    seen = set()
    for script, names in classes.items():
        tree = ast.parse(open(MODULES[script].__file__).read())
        for node in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in names):
            used = {a.attr for a in ast.walk(node) if isinstance(a, ast.Attribute)
                    and isinstance(a.value, ast.Name) and a.value.id == "common"}
            assert all(where[u] < part4 for u in used), (script, node.name, sorted(used))
            seen |= used
    assert {"integrate", "FuncGenerator"} <= seen and 300 < part4 < 800  # a few hundred lines


# ---- networks ------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["unet", "ddpmpp", "dit"])
def test_image_nets_shapes_zero_init_and_conditioning(arch):
    args = make_args(["--dataset", "folder", "--preset", "tiny", "--arch", arch])
    net = common.build_net(args, (3, 16, 16), num_classes=10, extra_ch=3)
    x, t = torch.randn(4, 3, 16, 16), torch.rand(4)
    e = torch.randn(4, 3, 16, 16)
    out = net(x, t, torch.tensor([0, 1, 2, 10]), extra=e)
    assert out.shape == (4, 3, 16, 16)
    assert out.abs().max() == 0  # zero-initialized output layer (DiT: adaLN-Zero final layer)
    if arch == "dit":
        assert all(b.ada[-1].weight.abs().max() == 0 for b in net.blocks)  # adaLN-Zero gates
    for p in net.parameters():  # after a perturbation labels and t must change the output
        p.data.add_(0.05 * torch.randn_like(p))
    y0, y1 = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    o1, o2 = net(x, t, y0, e), net(x, t, y1, e)
    assert not torch.allclose(o1, o2) and not torch.allclose(o1, net(x, t + 0.3, y0, e))
    assert not torch.allclose(o1, net(x, t, y0, e + 1))


def test_parameter_counts():
    cifar = make_args(["--dataset", "cifar10"])
    assert cifar.width == 128 and tuple(cifar.ch_mult) == (1, 2, 2, 2)
    n = common.count_params(common.build_net(cifar, (3, 32, 32)))
    assert 35e6 < n < 40e6  # DDPM CIFAR-10 U-Net (35.7M) + scale/shift modulation
    tiny = make_args(["--dataset", "folder", "--preset", "tiny"])
    assert common.count_params(common.build_net(tiny, (3, 16, 16))) < 0.5e6
    dit = make_args(["--dataset", "cifar10", "--arch", "dit"])
    assert 30e6 < common.count_params(common.build_net(dit, (3, 32, 32))) < 35e6  # DiT-S/2
    # RF's DDPM++ (NCSN++ code, RF's CIFAR-10 config): 4 blocks per level, dropout 0.15, ~62M
    ddpmpp = make_args(["--dataset", "cifar10", "--arch", "ddpmpp"])
    assert (ddpmpp.width, ddpmpp.depth, ddpmpp.dropout) == (128, 4, 0.15)
    net = common.build_net(ddpmpp, (3, 32, 32))
    assert common.count_params(net) == 61_804_419
    assert sum(isinstance(m, common.BigGANBlock) and (m.up or m.down) for m in net.modules()) == 6


def test_mlp_with_labels_and_extra_input():
    net = common.MLP(2, 32, 2, num_classes=3, extra_dim=2)
    out = net(torch.randn(5, 2), torch.rand(5), torch.tensor([0, 1, 2, 3, 3]), torch.randn(5, 2))
    assert out.shape == (5, 2)
    # y=None is the null class (index num_classes)
    x, t = torch.randn(5, 2), torch.rand(5)
    e = torch.zeros(5, 2)
    assert torch.allclose(net(x, t, None, e), net(x, t, torch.full((5,), 3), e))


# ---- samplers ------------------------------------------------------------------

def test_euler_exact_on_constant_field():
    c = torch.tensor([[1.5, -2.0]])
    x1, info = common.integrate(lambda x, t: c.expand_as(x), torch.zeros(3, 2), 1, "euler")
    assert torch.allclose(x1, c.expand(3, 2)) and info["nfe"] == 1


def test_euler_velocity_sees_time_grid():
    # dx/dt = t: Euler with N steps gives sum_{k<N} (k/N)(1/N) = (N-1)/(2N)
    x1, _ = common.integrate(lambda x, t: t[:, None].expand_as(x), torch.zeros(2, 1), 4, "euler")
    assert torch.allclose(x1, torch.full((2, 1), 3 / 8))


def test_rk45_on_rotation_and_backward():
    # dx/dt = A x with A a rotation generator: x(1) = R(1) x(0)
    rot = lambda x, t: torch.stack([-x[:, 1], x[:, 0]], 1)  # noqa: E731
    x0 = torch.tensor([[1.0, 0.0], [0.3, -2.0]], dtype=torch.float64)
    c, s = math.cos(1.0), math.sin(1.0)
    exact = x0 @ torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
    x1, info = common.integrate(rot, x0, None, "rk45")
    assert torch.allclose(x1, exact, atol=1e-4)
    back, _ = common.integrate(rot, x1, None, "rk45", t0=1.0, t1=0.0)  # inversion
    assert torch.allclose(back, x0, atol=2e-4)
    calls = []
    common.integrate(lambda x, t: calls.append(1) or rot(x, t), x0, None, "rk45")
    assert info["nfe"] == len(calls) and 7 <= info["nfe"] < 200


def test_rk45_linear_growth_and_trajectory():
    x0 = torch.ones(2, 3, dtype=torch.float64)
    x1, info = common.integrate(lambda x, t: 0.7 * x, x0, None, "rk45", rtol=1e-7, atol=1e-9,
                                return_traj=True)
    assert torch.allclose(x1, x0 * math.exp(0.7), rtol=1e-6)
    assert torch.equal(info["traj"][0], x0) and torch.equal(info["traj"][-1], x1)


def test_euler_trajectory_and_bad_nfe():
    _, info = common.integrate(lambda x, t: x, torch.ones(1, 2), 5, "euler", return_traj=True)
    assert len(info["traj"]) == 6
    with pytest.raises(common.UserError, match="positive"):
        common.integrate(lambda x, t: x, torch.ones(1, 2), 0, "euler")
    for bad in ["0", "-2", "1,x"]:
        with pytest.raises(common.UserError, match="--nfe"):
            common.parse_nfe(bad)
    assert common.parse_nfe("1, 2,rk45") == [1, 2, "rk45"]


def test_nan_or_stiff_field_stops_rk45_and_euler_with_one_line_error():
    calls = [0]

    def nan_after(k):
        def v(x, t):
            calls[0] += 1
            return x * float("nan") if calls[0] > k else -x
        return v
    for k in (0, 20):  # NaN at the first evaluation, and midway through the solve
        calls[0] = 0
        with pytest.raises(common.UserError, match="rk45: .*NaN/inf at t = .*earlier checkpoint"):
            common.integrate(nan_after(k), torch.ones(4, 2), None, "rk45")
        assert calls[0] <= k + 7  # caught within one step, not an ever-shrinking step size
    calls[0] = 0
    stiff = lambda x, t: calls.__setitem__(0, calls[0] + 1) or -1e7 * x  # noqa: E731
    with pytest.raises(common.UserError, match="too stiff.*Euler"):
        common.integrate(stiff, torch.ones(4, 2), None, "rk45", max_nfe=600)
    assert calls[0] <= 600
    with pytest.raises(common.UserError, match="euler: .*NaN/inf"):
        common.integrate(nan_after(0), torch.ones(4, 2), 3, "euler")


def test_straightness_zero_for_straight_flow_positive_for_curved():
    z = torch.randn(64, 2)
    assert common.straightness(lambda x, t: torch.ones_like(x), z) < 1e-10
    assert common.straightness(lambda x, t: torch.stack([-x[:, 1], x[:, 0]], 1), z) > 0.1


def test_toy_metrics_distinguish_distributions():
    g = torch.Generator().manual_seed(0)
    a, _ = common.toy_sample("8gaussians", 2000, g)
    b, _ = common.toy_sample("8gaussians", 2000, g)
    far = torch.randn(2000, 2, generator=g)
    same, diff = common.toy_metrics(a, b), common.toy_metrics(a, far)
    assert same["sw2"] < 0.15 < diff["sw2"] and same["energy"] < 0.01 < diff["energy"]
    for name in common.TOY_DATASETS[:-1]:
        x, y = common.toy_sample(name, 100, g)
        assert x.shape == (100, 2) and y.shape == (100,) and x.abs().max() < 6


# ---- data ----------------------------------------------------------------------

def test_image_folder_flat_and_with_class_subfolders(tmp_path):
    write_pngs(tmp_path / "flat", 5)
    args = make_args(["--dataset", "folder", "--preset", "tiny", "--data-dir", str(tmp_path / "flat")])
    data = common.load_data(args)
    x, y, i = data.dataset[3]
    assert data.shape == (3, 16, 16) and x.shape == (3, 16, 16) and (y, i) == (-1, 3)
    assert -1 <= x.min() and x.max() <= 1 and data.num_classes == 0
    write_pngs(tmp_path / "cls" / "cat", 3)
    write_pngs(tmp_path / "cls" / "dog", 4, seed=1)
    data = common.load_data(args, data_dir=str(tmp_path / "cls"))
    assert data.num_classes == 2 and len(data) == 7 and data.dataset[6][1] == 1


def test_cifar10_format_through_torchvision(tmp_path, monkeypatch):
    # a tiny CIFAR-10 in the real on-disk format; torchvision checks md5s, so point its
    # checksum table at our files (the download is skipped because integrity passes)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    files = {}
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        entry = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": list(range(4))}
        (folder / name).write_bytes(pickle.dumps(entry))
        files[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    C = torchvision.datasets.CIFAR10
    monkeypatch.setattr(C, "train_list", [[n, files[n]] for n in files if n != "test_batch"])
    monkeypatch.setattr(C, "test_list", [["test_batch", files["test_batch"]]])
    monkeypatch.setattr(C, "meta", dict(C.meta, md5=hashlib.md5((folder / "batches.meta").read_bytes()).hexdigest()))
    args = make_args(["--dataset", "cifar10", "--data-dir", str(tmp_path)])
    data = common.load_data(args)
    assert len(data) == 20 and data.shape == (3, 32, 32) and data.num_classes == 10
    x, y, i = data.dataset[5]
    raw = torch.from_numpy(np.vstack([pickle.loads((folder / f"data_batch_{k}").read_bytes())["data"]
                                      for k in range(1, 6)]).reshape(-1, 3, 32, 32))
    assert torch.equal(common.to_uint8(x), raw[5]) and y == 1 and i == 5  # exact pixels, [-1, 1] scaling
    small = common.load_data(make_args(["--dataset", "cifar10", "--data-dir", str(tmp_path),
                                        "--preset", "tiny"]))
    assert small.dataset[0][0].shape == (3, 16, 16)


def test_cifar10_missing_offline_is_one_line_error(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise urllib.error.URLError("no network in tests")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    with pytest.raises(common.UserError, match="cifar-10-batches-py"):
        common.load_data(make_args(["--dataset", "cifar10", "--data-dir", str(tmp_path)]))


def test_celeba_folder_fallback_and_missing(tmp_path):
    write_pngs(tmp_path / "celeba" / "img_align_celeba", 3, size=40)
    args = make_args(["--dataset", "celeba", "--preset", "tiny", "--data-dir", str(tmp_path)])
    data = common.load_data(args)  # no annotation files: plain folder of aligned faces
    assert len(data) == 3 and data.dataset[0][0].shape == (3, 16, 16)
    with pytest.raises(common.UserError, match="CelebA not found.*Google Drive"):
        common.load_data(args, data_dir=str(tmp_path / "nothing"))


def test_bad_data_inputs(tmp_path):
    with pytest.raises(common.UserError, match="unknown dataset 'mnist'"):
        make_args(["--dataset", "mnist"])
    (tmp_path / "empty").mkdir()
    for where in [tmp_path / "empty", tmp_path / "missing"]:
        with pytest.raises(common.UserError, match="--data-dir"):
            common.load_data(make_args(["--dataset", "folder", "--data-dir", str(where)]))
    np.save(tmp_path / "bad.npy", np.zeros((10, 3)))
    with pytest.raises(common.UserError, match=r"\[N, 2\]"):
        common.load_data(make_args(["--dataset", "points", "--data-dir", str(tmp_path / "bad.npy")]))
    np.save(tmp_path / "ok.npy", np.random.randn(50, 2))
    data = common.load_data(make_args(["--dataset", "points", "--data-dir", str(tmp_path / "ok.npy")]))
    assert data.x.shape == (50, 2)


def test_bad_arch_and_patch_size(capsys):
    with pytest.raises(SystemExit):  # argparse: invalid choice, one line
        make_args(["--arch", "resnet"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'resnet'" in err
    with pytest.raises(common.UserError, match="divisible by the DiT patch"):
        make_args(["--dataset", "folder", "--arch", "dit", "--image-size", "15"])
    with pytest.raises(common.UserError, match="2-D data uses --arch mlp"):
        make_args(["--dataset", "moons", "--arch", "unet"])


def test_digits_loader_split_scaling_and_no_flips():
    from sklearn.datasets import load_digits
    args = make_args(["--dataset", "digits"])
    assert (args.preset, args.image_size, args.hflip) == ("tiny", 16, False)  # no flips for digits
    assert make_args(["--dataset", "digits", "--hflip"]).hflip is True  # unless asked for
    train, held = common.load_data(args), common.load_data(args, train=False)
    assert train.shape == (1, 16, 16) and train.num_classes == 10
    assert (len(train), len(held)) == (1500, 297) and train.x.shape == (1500, 1, 16, 16)
    assert train.x.min() >= -1 and train.x.max() <= 1 and set(train.y.tolist()) == set(range(10))
    x, y, i = train.dataset[7]  # the Dataset view agrees with the in-memory tensors
    assert torch.equal(x, train.x[7]) and y == int(train.y[7]) and i == 7
    # at 8x8 the pixels are scikit-learn's ink 0..16 mapped to [-1, 1]; the split is a partition
    raw = load_digits()
    d8 = [common.load_data(make_args(["--dataset", "digits", "--image-size", "8"]), train=t)
          for t in (True, False)]
    xs, ys = torch.cat([d.x for d in d8]), torch.cat([d.y for d in d8])
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    expected = torch.from_numpy(raw.images).float()[order] / 8 - 1
    assert torch.equal(xs[:, 0], expected) and torch.equal(ys, torch.from_numpy(raw.target)[order])
    assert torch.equal(common.load_data(args).x, train.x)  # the same split every time
    with pytest.raises(common.UserError, match="--image-size 8 or larger"):
        common.load_data(make_args(["--dataset", "digits", "--image-size", "4"]))


def test_digits_without_scikit_learn_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(common.UserError, match="pip install scikit-learn"):
        common.load_data(make_args(["--dataset", "digits"]))


def test_photos_are_patches_of_the_two_photographs_split_by_whole_blocks():
    from sklearn.datasets import load_sample_images
    args = make_args(["--dataset", "photos"])
    assert (args.preset, args.image_size, args.hflip) == ("tiny", 16, True)
    train, held = common.load_data(args), common.load_data(args, train=False)
    assert train.shape == (3, 16, 16) and train.num_classes == 18
    assert (len(train), len(held)) == (2080, 520) and set(train.y.tolist()) == set(range(18))
    assert train.x.min() >= -1 and train.x.max() <= 1
    # by hand: the first training block is block order[104] of the 2 x 13 x 20 blocks of 32x32
    # pixels; its 5 patches are the four 16x16 quarters and the block's 2x2 average
    photos = [torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 127.5 - 1
              for p in load_sample_images().images]
    k = int(torch.randperm(520, generator=torch.Generator().manual_seed(0))[104])
    photo, (row, col) = k // 260, divmod(k % 260, 20)
    block = photos[photo][:, 32 * row: 32 * row + 32, 32 * col: 32 * col + 32]
    quarters = [block[:, i:i + 16, j:j + 16] for i in (0, 16) for j in (0, 16)]
    assert all(torch.equal(train.x[q], quarters[q]) for q in range(4))
    assert torch.allclose(train.x[4], block.view(3, 16, 2, 16, 2).mean((2, 4)), atol=1e-6)
    assert (train.y[:5] == 9 * photo + 3 * (3 * row // 13) + 3 * col // 20).all()
    # held-out blocks are whole: no held-out patch is a training patch
    assert not (held.x.flatten(1)[:, None] == train.x.flatten(1)[None]).all(-1).any()
    with pytest.raises(common.UserError, match="--image-size 4 to 213"):
        common.load_data(make_args(["--dataset", "photos", "--image-size", "300"]))


def test_resumable_batches_cover_epoch_and_restart_midway():
    args = make_args(["--dataset", "moons", "--batch-size", "100", "--device", "cpu"])
    run = common.Run(args)
    data = common.load_data(args)
    stream = iter(common.ResumableBatches(data, 100, run, seed=3))
    per_epoch = len(data) // 100
    first = [next(stream)[2] for _ in range(per_epoch + 3)]
    assert torch.equal(torch.cat(first[:per_epoch]).sort()[0], torch.arange(len(data)))
    assert not torch.equal(first[0], first[per_epoch])  # reshuffled next epoch
    late = common.ResumableBatches(data, 100, run, seed=3, start_step=per_epoch + 1)
    assert late.epoch == 1
    batch = next(iter(late))
    assert torch.equal(batch[2], first[per_epoch + 1]) and torch.equal(batch[0], data.x[batch[2]])


# ---- checkpoints, faults, GPU path ---------------------------------------------

def test_checkpoint_round_trip_and_clean_keys(tmp_path):
    args, run = tiny_run(tmp_path, "--compile")
    net = common.MLP(2, 16, 1)
    ema, opt = common.EMA(net, 0.9), torch.optim.Adam(net.parameters())
    model = run.wrap(net)  # torch.compile wrapper; checkpoints come from the raw net
    loss = model(torch.randn(8, 2), torch.rand(8)).pow(2).mean()
    common.optimize(opt, loss, net, args, 0)
    ema.update(net, 0)
    run.save(7, net=net, ema=ema, opt=opt, extra=torch.arange(3))
    ckpt = torch.load(run.ckpt_path, weights_only=True)
    assert ckpt["step"] == 7 and ckpt["config"]["dataset"] == "moons"
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["state"]["net"])
    net2 = common.MLP(2, 16, 1)
    ema2, opt2 = common.EMA(net2, 0.9), torch.optim.Adam(net2.parameters())
    args.resume = True
    step, ck, _ = run.resume(net=net2, ema=ema2, opt=opt2)
    assert step == 7 and torch.equal(ck["state"]["extra"], torch.arange(3))
    for a, b in zip(ema.model.parameters(), ema2.model.parameters()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["step"] == 1


def test_ema_update_rule_and_warmup():
    net = nn.Linear(2, 1)
    ema = common.EMA(net, 0.9)
    old = ema.model.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, 1000)  # past the warm-up: decay_k = min(0.9, 1001/1010) = 0.9
    assert torch.allclose(ema.model.weight, 0.9 * old + 0.1 * net.weight)
    assert not ema.model.training and not ema.model.weight.requires_grad
    # warm-up: decay_k = (1 + k) / (10 + k): 0.1 at k = 0, 0.5 at k = 8, capped by decay
    ema = common.EMA(net, 0.999)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(8) == pytest.approx(0.5)
    assert ema.decay_at(10**6) == 0.999 and ema.decay_at(8990) == pytest.approx(0.999)
    old = ema.model.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, 0)
    assert torch.allclose(ema.model.weight, 0.1 * old + 0.9 * net.weight)


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    args, run = tiny_run(tmp_path)
    net = common.MLP(2, 16, 1)
    run.save(1, net=net)
    real_save = torch.save

    def dies_midway(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")  # the process is killed here
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        run.save(2, net=net)
    monkeypatch.setattr(torch, "save", real_save)
    assert common.load_checkpoint(run.ckpt_path)["step"] == 1
    assert not [f for f in os.listdir(os.path.dirname(run.ckpt_path)) if ".tmp" in f]  # no leftovers


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    args, run = tiny_run(tmp_path)
    run.save(1, net=common.MLP(2, 16, 1), ema=common.EMA(common.MLP(2, 16, 1), 0.9))
    with pytest.raises(common.UserError, match="--width 16"):
        common.load_weights(common.MLP(2, 32, 1), run.ckpt_path)
    with open(run.ckpt_path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(common.UserError, match="corrupt"):
        common.load_checkpoint(run.ckpt_path)
    with pytest.raises(common.UserError, match="no checkpoint"):
        common.load_checkpoint(str(tmp_path / "nope.pt"))


def test_checkpoint_of_another_method_or_run_is_refused(tmp_path):
    out = str(tmp_path / "r")
    toy = ["--width", "16", "--device", "cpu", "--out-dir", out]
    asfm.main(["--stage", "rf", "--steps", "2"] + toy)
    with pytest.raises(common.UserError, match=r"already holds a checkpoint \(asfm-rf, step 2\): "
                       r"pass --resume to continue it, --overwrite to start over"):
        asfm.main(["--stage", "rf", "--steps", "3"] + toy)
    asfm.main(["--stage", "rf", "--steps", "1", "--overwrite"] + toy)
    assert common.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 1
    with pytest.raises(common.UserError, match="written by asfm-rf, not asfm-reflow: --resume"):
        asfm.main(["--stage", "reflow", "--steps", "3", "--resume", "--init", "none"] + toy)
    with pytest.raises(common.UserError, match="written by asfm-rf, not cm: use the script"):
        consistency_func.main(["--mode", "sample", "--ckpt", os.path.join(out, "ckpt.pt"),
                               "--device", "cpu"])
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(common.UserError, match="holds a list, not one of our checkpoints"):
        common.load_checkpoint(str(tmp_path / "list.pt"))


def test_first_line_lists_the_values_in_force(tmp_path, capsys):
    # issue 22: --help lists each preset's values; the run's first line (and log.txt's) lists
    # the ones in force, key=value
    asfm.main(["--stage", "rf", "--dataset", "moons", "--steps", "1", "--out-dir", str(tmp_path / "r")])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("asfm-rf --mode train: ")
    values = dict(w.split("=", 1) for w in first.split(": ", 1)[1].split())
    assert (values["preset"], values["width"], values["lr"], values["steps"]) == ("toy", "256", "0.001", "1")
    assert "out_dir" not in values and "mode" not in values  # how to run now is not a value of the run
    assert (tmp_path / "r" / "log.txt").read_text().splitlines()[0] == first
    assert "mem_size" not in values and "reflow_pairs" not in values  # other stages' flags: not in force
    # issue 33: sampling lists the checkpoint's data and network, not its training (lr=... was read as in force)
    asfm.main(["--mode", "sample", "--ckpt", str(tmp_path / "r" / "ckpt.pt"), "--n", "4", "--nfe", "1"])
    first = capsys.readouterr().out.splitlines()[0]
    values = dict(w.split("=", 1) for w in first.split(": ", 1)[1].split())
    assert first.startswith("asfm-rf --mode sample: ") and (values["dataset"], values["width"]) == ("moons", "256")
    assert not {"lr", "steps", "ema_decay", "warmup", "log_every", "dropout", "grad_clip"} & set(values)


@pytest.mark.parametrize("script", SCRIPTS)
def test_sampling_reads_the_checkpoint_once(script, tmp_path, monkeypatch):
    # issue 22: flags, method check and weights come from one (memory-mapped) read; and the
    # checkpoint's config fills the flags the command line leaves out
    train = ["--stage", "rf"] if script == "asfm" else []
    MODULES[script].main(train + ["--steps", "2", "--width", "16", "--batch-size", "16",
                                  "--dataset", "moons", "--out-dir", str(tmp_path / "r")])
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or load(f, *a, **k))
    monkeypatch.setattr(common, "_READ", {})
    ckpt = str(tmp_path / "r" / "ckpt.pt")
    MODULES[script].main(["--mode", "sample", "--ckpt", ckpt, "--n", "4", "--nfe", "1",
                          "--samples-out", str(tmp_path / "s")])
    assert reads == [ckpt]
    args = common.parse_args(common.add_common_args(argparse.ArgumentParser()), ["--mode", "eval", "--ckpt", ckpt])
    assert (args.dataset, args.width, args.out_dir, args.given) == ("moons", 16, str(tmp_path / "r"), {"mode", "ckpt"})


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    args, run = tiny_run(tmp_path, "--log-every", "5")
    net = common.MLP(2, 16, 1)
    run.save(3, net=net)
    run.log(4, torch.tensor(float("nan")))  # not a log step: no host sync, no error yet
    with pytest.raises(common.UserError, match="NaN.*last good checkpoint"):
        run.log(5, torch.tensor(1.0))
    with pytest.raises(common.UserError, match="NaN"):
        run.save(5, net=net)
    assert common.load_checkpoint(run.ckpt_path)["step"] == 3


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path):
    write_pngs(tmp_path / "img", 4)
    args = make_args(["--dataset", "folder", "--preset", "tiny", "--data-dir", str(tmp_path / "img"),
                      "--amp", "bf16", "--channels-last", "--device", "cpu",
                      "--out-dir", str(tmp_path / "run")])
    run = common.Run(args)
    data = common.load_data(args)
    net = common.build_net(args, data.shape)
    model = run.wrap(net)
    x, _, _ = next(iter(common.ResumableBatches(data, 4, run, workers=0)))
    assert x.is_contiguous(memory_format=torch.channels_last)
    with run.autocast:
        out = model(x, torch.rand(4))
    assert out.dtype == torch.bfloat16
    assert isinstance(common.Run(make_args(["--device", "cpu"])).autocast, type(common.nullcontext()))


def test_evaluation_precision_fp32_tf32_off_and_nesting(tmp_path):
    args, run = tiny_run(tmp_path, "--amp", "bf16")
    net = common.MLP(2, 16, 1)
    teach = asfm.generator(net, (2,), 2, "cpu", run.sampling)
    torch.backends.cuda.matmul.allow_tf32 = True
    with run.autocast:  # online reflow draws teacher pairs inside the training autocast
        with run.sampling():
            assert not torch.is_autocast_enabled("cpu") and not torch.backends.cuda.matmul.allow_tf32
        assert torch.is_autocast_enabled("cpu")
        _, x1 = teach(4)
        assert torch.is_autocast_enabled("cpu") and net(x1, torch.rand(4)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu") and torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    assert x1.dtype == torch.float32 and run.eval_precision == "fp32"
    assert common.Run(make_args(["--device", "cpu", "--eval-amp", "bf16"])).eval_precision == "bf16"


def test_inception_weights_checked_at_start(tmp_path):
    write_pngs(tmp_path / "img", 4)
    img = ["--dataset", "folder", "--data-dir", str(tmp_path / "img"), "--preset", "tiny",
           "--device", "cpu", "--out-dir", str(tmp_path / "r"), "--eval-every", "1000"]
    for bad, msg in [(tmp_path / "missing.pth", "no such file"), (tmp_path / "img" / "000.png", "cannot read")]:
        with pytest.raises(common.UserError, match=f"--inception-weights .*{msg}"):
            common.Run(make_args(img + ["--inception-weights", str(bad)]))


def test_sample_export_format(tmp_path):
    imgs = torch.rand(3, 3, 8, 8) * 2 - 1
    common.export_samples(str(tmp_path / "i.npz"), imgs, 4)
    with np.load(tmp_path / "i.npz") as f:
        assert f["samples"].dtype == np.uint8 and f["samples"].shape == (3, 8, 8, 3)
        assert np.array_equal(f["samples"], common.to_uint8(imgs).permute(0, 2, 3, 1).numpy()) and f["nfe"] == 4
    common.export_samples(str(tmp_path / "p.npz"), torch.randn(5, 2, dtype=torch.float64), 1)
    with np.load(tmp_path / "p.npz") as f:
        assert f["samples"].dtype == np.float32 and f["samples"].shape == (5, 2)


def test_cli_prints_one_line_error(capsys):
    def main(argv):
        raise common.UserError("something is wrong: do this")
    with pytest.raises(SystemExit) as e:
        common.run_cli(main, [])
    assert e.value.code == 2 and capsys.readouterr().err == "error: something is wrong: do this\n"


FLAG_CASES = [(["--n", "0"], "--n 0 is out of range: use a number >= 1"),
              (["--fid-n", "0"], "--fid-n 0 is out of range"),
              (["--lr", "nan"], "--lr nan is out of range"),
              (["--ema-decay", "1.5"], r"--ema-decay 1.5 is out of range: use a number in \[0, 1\)"),
              (["--dropout", "-1"], "--dropout -1.0 is out of range"),
              (["--device", "meta"], "--device meta: only cpu and cuda"),
              (["--device", "gpu7"], "--device gpu7: not a device"),
              (["--out-dir", "{tmp}/file.txt/run"], "--out-dir .*: cannot write there"),
              (["--dataset", "points", "--data-dir", "{tmp}/words.npy"], "holds <U.* not numbers"),
              (["--dataset", "points", "--data-dir", "{tmp}/nan.npy"], "has 1 NaN/inf values"),
              (["--dataset", "points", "--data-dir", "{tmp}/bad.npy"], "cannot read .* as a .npy"),
              (["--dataset", "folder", "--data-dir", "{tmp}/file.txt"], "is a file, not a folder"),
              (["--dataset", "folder", "--data-dir", "{tmp}/img", "--image-size", "15"],
               "15: the U-Net halves it 1 times, so use a multiple of 2|size 15 is not divisible by patch size 2"),
              (["--dataset", "folder", "--data-dir", "{tmp}/img", "--eval-every", "5",
                "--inception-weights", "{tmp}/nope.pth"], "--inception-weights .*: no such file"),
              (["--mode", "sample", "--ckpt", "{tmp}/list.pt"], "holds a list, not one of our"),
              (["--dataset", "folder", "--data-dir", "{tmp}/broken", "--workers", "1"],
               "cannot read image .*truncated.*remove or replace the file"),
              (["--seed", "-1"], r"--seed -1 is out of range: use a number in \[0, 4294967295\]"),
              (["--nfe", "1,20000"], "--nfe 20000 is out of range: use at most 10000"),
              (["--nfe", ""], "--nfe '': use positive integers separated by commas"),
              (["--hflip"], r"--hflip does not apply to this run: it is for images \(2-D points"),
              (["--mode", "sample", "--amp", "bf16"], r"--amp does not apply to this run: .*--eval-amp"),
              (["--ckpt", "{tmp}/list.pt"], r"--ckpt does not apply to this run: it is for sampling"),
              (["--resume", "--overwrite"], "--resume continues <out-dir>/ckpt.pt and --overwrite starts over"),
              (["--mode", "sample", "--samples-out", "{tmp}/file.txt"], "--samples-out .* is a file, not a folder")]
SCRIPT_CASES = [("asfm", ["--mode", "edit", "--dataset", "folder", "--data-dir", "{tmp}/img",
                          "--ckpt", "{tmp}/img_run/ckpt.pt", "--edit-index", "0,99"],
                 r"--edit-index 0,99: indices must be in 0..3"),
                ("asfm", ["--stage", "asfm", "--init", "none", "--steps", "3", "--mem-size", "3",
                          "--resume", "--out-dir", "{tmp}/asfm_run"],
                 r"--resume: .*asfm_run/ckpt.pt was trained with --mem-size 2, this run has --mem-size 3: "
                 r"pass the same flags, or --allow-changed mem-size"),
                ("consistency_func", ["--dataset", "folder", "--data-dir", "{tmp}/img", "--mode",
                                      "sample", "--sample-res", "0"], "--sample-res \\[0\\]: sizes must be positive"),
                ("toy2d", ["--data", "{tmp}/words.npy"], "holds <U.* not numbers"),
                ("consistency_func", ["--nfe", "1,rk45"], "--nfe rk45 does not apply: .*model steps"),
                ("consistency_func", ["--pretrain", "recon"], "--pretrain does not apply to this run: it is for images"),
                ("consistency_func", ["--sampler", "ode"], "--sampler: invalid choice: 'ode'"),
                ("consistency_func", ["--dataset", "folder", "--data-dir", "{tmp}/img", "--arch", "dit",
                                      "--inr-head", "patch"], "--inr-head does not apply to this run: it is for --arch func"),
                ("consistency_func", ["--dataset", "folder", "--data-dir", "{tmp}/img", "--inr-head", "patch",
                                      "--no-local-read"], "--local-read does not apply to this run: it is for "
                                                          "--arch func --inr-head tokens"),
                ("consistency_func", ["--dataset", "folder", "--data-dir", "{tmp}/img", "--mode", "sample",
                                      "--sampler", "edm", "--sample-res", "32"], "--sample-res does not apply"),
                ("integration_flow", ["--nfe", "rk45"], "--nfe rk45 does not apply: .*anchor iterations"),
                ("asfm", ["--steps", "0"], "--steps 0 trains nothing"),
                ("integration_flow", ["--steps", "0"], "--steps 0 trains nothing"),
                ("scoreflow", ["--steps", "0"], "--steps 0 trains nothing"),
                ("toy2d", ["--setups", "c"], "--setups c: use a, b"),
                ("toy2d", ["--out", "{tmp}/file.txt/x"], "--out .*: cannot write there")]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "file.txt").write_text("not a folder")
    np.save(tmp / "words.npy", np.array([["a", "b"], ["c", "d"]]))
    np.save(tmp / "nan.npy", np.array([[0.0, 1.0], [np.nan, 2.0], [3.0, 4.0]]))
    (tmp / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    torch.save([1, 2], tmp / "list.pt")
    write_pngs(tmp / "img", 4)
    write_pngs(tmp / "broken", 4)
    png = (tmp / "broken" / "001.png").read_bytes()
    (tmp / "broken" / "001.png").write_bytes(png[: len(png) // 2])  # truncated
    small = ["--width", "16", "--device", "cpu", "--batch-size", "32"]
    asfm.main(["--stage", "asfm", "--init", "none", "--steps", "2", "--mem-size", "2",
               "--out-dir", str(tmp / "asfm_run")] + small)
    asfm.main(["--stage", "rf", "--dataset", "folder", "--data-dir", str(tmp / "img"), "--steps", "1",
               "--batch-size", "4", "--workers", "0", "--width", "16", "--device", "cpu",
               "--out-dir", str(tmp / "img_run")])
    integration_flow.main(["--steps", "1", "--n-conv", "8", "--conv-iters", "1", "--fid-n", "50",
                           "--out-dir", str(tmp / "if_run")] + small)
    scoreflow.main(["--steps", "1", "--fid-n", "50", "--n", "8", "--nfe", "1", "--out-dir", str(tmp / "sf_run")]
                   + small)  # class-conditional: --class-cond left to its default
    (tmp / "corrupt_run").mkdir()
    (tmp / "corrupt_run" / "ckpt.pt").write_bytes((tmp / "if_run" / "ckpt.pt").read_bytes()[:500])  # truncated
    return tmp


def training(argv):
    """Whether argv trains (the tests' shared prefixes add training flags only then)."""
    return "--mode" not in argv or argv[argv.index("--mode") + 1] == "train"


@pytest.mark.parametrize("script, argv, msg", [(s, a, m) for s in SCRIPTS for a, m in FLAG_CASES]
                         + SCRIPT_CASES)
def test_bad_inputs_stop_with_one_line(bad_inputs, script, argv, msg, capsys, tmp_path):
    argv = [a.replace("{tmp}", str(bad_inputs)) for a in argv]
    if script != "toy2d":
        argv = ["--device", "cpu", "--width", "16", "--batch-size", "32"] + (["--steps", "2"] if training(argv) else []) + [
                "--out-dir", str(tmp_path / "run"), "--preset", "tiny" if "folder" in argv else "toy"] + argv
        argv += ["--batch-size", "4"] if "folder" in argv else []
    else:
        argv = ["--steps", "10", "--out", str(bad_inputs / "toy2d")] + argv
    with pytest.raises(SystemExit) as e:
        common.run_cli(MODULES[script].main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(msg, err), err


def _ddp_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    args = make_args(["--dataset", "moons", "--device", "cpu", "--batch-size", "64",
                      "--out-dir", os.path.join(out, "run"), "--width", "16", "--depth", "1"])
    run = common.Run(args)
    net = common.MLP(2, 16, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    model = run.wrap(net)
    data = common.load_data(args)
    stream = iter(common.ResumableBatches(data, run.local_batch, run, seed=0))
    seen = []
    for step in range(3):
        x, _, idx = next(stream)
        seen.append(idx)
        common.optimize(opt, model(x, torch.rand(len(x))).pow(2).mean(), net, args, step)
    run.save(3, net=net)
    torch.save({"params": [p.detach() for p in net.parameters()], "idx": torch.cat(seen)},
               os.path.join(out, f"rank{rank}.pt"))
    run.close()


def test_ddp_two_gloo_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))  # synced grads
    assert len(r0["idx"]) == 3 * 32 and not set(r0["idx"].tolist()) & set(r1["idx"].tolist())
    assert common.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["step"] == 3


# ---- FID, Inception Score, precision/recall ------------------------------------

# ---------------------------------------------------------------- Frechet distance

def test_frechet_identical_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8))
    mu, sigma = common.feature_stats(a)
    assert abs(common.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_frechet_diagonal_by_hand():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    # ||mu diff||^2 = 1 + 0 + 4 = 5; sum (sqrt a - sqrt b)^2 = 1 + 1 + 0 = 2
    assert common.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(7.0, abs=1e-12)


def test_frechet_singular_diagonal():
    # a zero-variance direction (fewer samples than dims) must not break the square root
    d = common.frechet_distance(np.zeros(2), np.diag([0.0, 4.0]), np.zeros(2), np.diag([9.0, 1.0]))
    assert d == pytest.approx(9.0 + 1.0, abs=1e-12)  # (0-3)^2 + (2-1)^2


def test_frechet_non_diagonal_vs_independent():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # independent: eigenvalues of the non-symmetric product (real, >= 0 in theory)
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    got = common.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-9)
    try:
        from scipy import linalg
    except ImportError:
        return
    tr_scipy = np.trace(linalg.sqrtm(s1 @ s2)).real
    assert got == pytest.approx(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_scipy,
                                rel=1e-9)


def test_frechet_shape_mismatch():
    with pytest.raises(ValueError, match="shapes"):
        common.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="shapes"):
        common.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


# ---------------------------------------------------------------- precision / recall

def test_precision_recall_identical_and_disjoint():
    x = np.random.default_rng(0).normal(size=(40, 5))
    assert common.precision_recall(x, x) == (1.0, 1.0)
    assert common.precision_recall(x, x + 1000.0) == (0.0, 0.0)


def test_precision_recall_designed_fraction():
    # points on a line, embedded in 4-D: real = 0..9, fake = 0..4 and 1000..1004.
    def line(v):
        return np.pad(np.asarray(v, float)[:, None], ((0, 0), (0, 3)))
    real = line(range(10))
    fake = line(list(range(5)) + list(range(1000, 1005)))
    # precision: fakes 0..4 sit on real points, the far five are outside every real ball -> 5/10.
    # recall: fake radii (3rd NN) are 3 at 0 and 4, so fake balls cover [-3, 7] -> reals 0..7 -> 8/10.
    for batch in (1024, 3):  # chunking must not change the answer
        p, r = common.precision_recall(real, fake, k=3, batch=batch)
        assert p == pytest.approx(0.5) and r == pytest.approx(0.8)


def test_precision_recall_vs_brute_force():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(60, 5)), rng.normal(size=(45, 5)) * 1.5 + 0.3
    def dist(a, b):
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    r_real = np.sort(dist(real, real), 1)[:, 3]  # column 0 is the point itself
    r_fake = np.sort(dist(fake, fake), 1)[:, 3]
    p = (dist(fake, real) <= r_real[None]).any(1).mean()
    r = (dist(real, fake) <= r_fake[None]).any(1).mean()
    assert 0 < p < 1 and 0 < r < 1
    assert common.precision_recall(real, fake, k=3, batch=7) == (pytest.approx(p), pytest.approx(r))


def test_precision_recall_too_few_points():
    with pytest.raises(ValueError):
        common.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


# ---------------------------------------------------------------- Inception Score

def test_inception_score_uniform_is_one():
    mean, std = common.inception_score(np.zeros((20, 1008)), splits=2)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_distinct_classes():
    logits = np.full((20, 1008), -1e4)
    logits[np.arange(20), np.arange(20) % 10] = 0.0  # each split of 10 covers 10 classes once
    mean, std = common.inception_score(logits, splits=2)
    assert mean == pytest.approx(10.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    mean, _ = common.inception_score(logits, splits=1)
    assert mean == pytest.approx(10.0, rel=1e-9)


# ---------------------------------------------------------------- the network

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return common.load_fid_inception("cpu", weights="random")


def test_fid_inception_outputs(model):
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    gray = x[:1, :1]
    with torch.no_grad():  # 6 images in all: each 299x299 forward costs ~0.2 s on CPU
        f, l = model(torch.cat([x, gray.repeat(1, 3, 1, 1)]))
        f2, l2 = model(x.float() / 255)
        f1, _ = model(gray)
    assert f.shape == (3, 2048) and l.shape == (3, 1008)
    assert torch.isfinite(f).all() and torch.isfinite(l).all()
    assert torch.allclose(f[:2], f2, atol=1e-6) and torch.allclose(l[:2], l2, atol=1e-6)
    assert torch.allclose(f1, f[2:], atol=1e-6)
    assert not torch.allclose(f[0], f[1])


def test_fid_inception_parameter_names(model):
    sd = model.state_dict()
    # pytorch-fid loads its .pth strictly into torchvision's Inception3(num_classes=1008, no aux)
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False,
                                         num_classes=1008).state_dict()
    assert list(sd.keys()) == list(tv.keys())
    assert all(sd[k].shape == tv[k].shape for k in sd)
    for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_5b.branch_pool.conv.weight",
                "Mixed_7c.branch_pool.conv.weight", "Mixed_7c.branch3x3dbl_3b.bn.running_var"):
        assert key in sd
    assert sd["fc.weight"].shape == (1008, 2048) and sd["fc.bias"].shape == (1008,)
    block_a, block_c, _ = common.fid_inception_blocks()
    assert isinstance(model.Mixed_5b, block_a) and isinstance(model.Mixed_6e, block_c)
    assert model.Mixed_7b.pool is not model.Mixed_7c.pool  # avg in 7b, max in 7c


@pytest.mark.parametrize("which,parent,args,ch", [
    (0, torchvision.models.inception.InceptionA, (16, 8), 16),
    (1, torchvision.models.inception.InceptionC, (16, 8), 16),
    (2, torchvision.models.inception.InceptionE, (16,), 16)])
def test_fid_blocks_branch_order(which, parent, args, ch):
    cls = common.fid_inception_blocks()[which]
    # with torchvision's pooling put back, the compact forwards equal torchvision's (same
    # channel order, which the fc weights depend on); with TF pooling they differ at borders
    torch.manual_seed(0)
    blk = cls(*args).eval()
    x = torch.randn(2, ch, 7, 7)
    with torch.no_grad():
        tf_out = blk(x)
        blk.pool = lambda t: F.avg_pool2d(t, kernel_size=3, stride=1, padding=1)
        assert torch.allclose(blk(x), parent.forward(blk, x), atol=1e-6)
        assert not torch.allclose(tf_out, blk(x))


def test_load_without_network_raises_one_line(monkeypatch):
    def blocked(*a, **k):
        raise urllib.error.URLError("network blocked in test")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", blocked)
    with pytest.raises(common.UserError) as e:
        common.load_fid_inception("cpu")
    msg = str(e.value)
    assert common.FID_WEIGHTS_NAME in msg and "\n" not in msg and "--inception-weights" in msg


def test_load_from_path(tmp_path, model):
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    m2 = common.load_fid_inception("cpu", weights=str(path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values()))


# ---------------------------------------------------------------- features, caching, report

class StubInception(nn.Module):
    """Cheap stand-in with FIDInception's interface: deterministic features of the image."""

    def __init__(self, dim=2048):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(3 * 8 * 8, dim, generator=g), requires_grad=False)
        self.head = nn.Parameter(torch.randn(dim, 1008, generator=g) / 50, requires_grad=False)

    def forward(self, x):
        x = F.interpolate(x.float() / 255, size=(8, 8), mode="bilinear", align_corners=False)
        f = x.flatten(1) @ self.proj
        return f, f @ self.head


def test_to_uint8():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0, 1 / 127.5 - 1])
    assert common.to_uint8(x).tolist() == [0, 0, 128, 255, 255, 1]
    assert common.to_uint8(x).dtype == torch.uint8


def test_inception_features_tensor_and_iterable_agree():
    m = StubInception()
    imgs = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    f1, l1 = common.inception_features(m, imgs, batch_size=3)
    f2, l2 = common.inception_features(m, iter([imgs[:4], imgs[4:]]))
    assert f1.dtype == np.float64 and f1.shape == (7, 2048) and l1.shape == (7, 1008)
    assert np.allclose(f1, f2, atol=1e-4) and np.allclose(l1, l2, atol=1e-4)  # float32 batching
    with pytest.raises(TypeError, match="uint8"):
        common.inception_features(m, imgs.float() / 127.5 - 1)


def test_reference_stats_cached(tmp_path):
    m = StubInception()
    imgs = torch.randint(0, 256, (30, 3, 16, 16), dtype=torch.uint8)
    calls = []

    def batches():
        calls.append(1)
        return iter(imgs.split(8))

    ref = common.reference_stats("toy-16", batches, m, str(tmp_path), max_features=20)
    assert len(calls) == 1 and os.path.exists(tmp_path / "fid_ref_toy-16.npz")
    assert os.listdir(tmp_path) == ["fid_ref_toy-16.npz"]  # no temp file left behind
    ref2 = common.reference_stats("toy-16", batches, m, str(tmp_path), max_features=20)
    assert len(calls) == 1
    assert set(ref) == {"mu", "sigma", "features", "n"} and int(ref["n"]) == 30
    assert ref["features"].shape == (20, 2048)
    for k in ref:
        assert np.array_equal(ref[k], ref2[k])
    mu, sigma = common.feature_stats(common.inception_features(m, imgs)[0])
    assert np.allclose(ref["mu"], mu, atol=1e-4) and np.allclose(ref["sigma"], sigma, atol=1e-3)


def test_fid_report_same_images(tmp_path):
    m = StubInception(dim=256)  # small features keep the 2 eigendecompositions cheap
    imgs = torch.randint(0, 256, (30, 3, 16, 16), dtype=torch.uint8)
    ref = common.reference_stats("toy-16", lambda: [imgs], m, str(tmp_path))
    rep = common.fid_report(m, imgs, ref)
    assert set(rep) >= {"fid", "is", "precision", "recall", "n"} and rep["n"] == 30
    assert abs(rep["fid"]) < 1e-3 * np.trace(ref["sigma"])
    assert rep["precision"] == 1.0 and rep["recall"] == 1.0
    assert rep["is"] >= 1.0
    other = common.fid_report(m, torch.full_like(imgs, 255) - imgs // 4, ref)
    assert other["fid"] > 1.0


@pytest.fixture(scope="module")
def digits_fd(tmp_path_factory):
    """The digit classifier, trained once for these tests in a temporary cache folder."""
    return common.ClassifierFD("digits", 16, str(tmp_path_factory.mktemp("digits-cache")))


def test_digits_fd_orders_real_blurred_noise_and_is_deterministic(digits_fd, tmp_path_factory):
    train, held = common._digits(16, True)[0], common._digits(16, False)[0]
    assert digits_fd.accuracy > 0.9  # held-out accuracy of the feature network
    floor, ceiling = digits_fd.floor_and_ceiling()
    same = digits_fd.report(held)
    assert abs(same["digits_fd"]) < 1e-3 and same["coverage"] == 10 and same["confidence"] > 0.9
    half = digits_fd.report(train[750:])["digits_fd"]  # other real digits: near the floor
    assert 0.5 * floor < half < 2 * floor
    blurred = digits_fd.report(F.avg_pool2d(train, 3, 1, 1))["digits_fd"]  # strokes smeared
    assert 0 < floor < blurred < ceiling and ceiling > 20 * floor
    one = digits_fd.report(train[:1].repeat(500, 1, 1, 1))  # a collapsed model: one digit
    assert one["coverage"] == 1 and one["digits_fd"] > blurred
    # deterministic: the cached classifier gives the same number in a fresh scorer
    cache = os.path.dirname(next(p for p in tmp_path_factory.getbasetemp().rglob(
        "digits_classifier-16.pt")))
    again = common.ClassifierFD("digits", 16, cache)
    assert again.report(F.avg_pool2d(train, 3, 1, 1))["digits_fd"] == blurred
    with pytest.raises(common.UserError, match=r"\(N, 1, 16, 16\)"):
        digits_fd.report(torch.zeros(4, 3, 16, 16))


@pytest.fixture(scope="module")
def photos_fd(tmp_path_factory):
    """The photos classifier, trained once for these tests in a temporary cache folder."""
    return common.ClassifierFD("photos", 16, str(tmp_path_factory.mktemp("photos-cache")))


def test_photos_fd_sees_blur_noise_and_collapse(photos_fd):
    """photos-FD's classifier names a patch's region and its degradation: so blurred or noisy
    real patches, or patches of one photo only, score well above the floor (trained on regions
    alone, a 3x3 box blur scored 1.1x the floor)."""
    fd = photos_fd
    train, held = common._photos(16)[0], common._photos(16, train=False)[0]
    assert fd.accuracy > 0.3  # 18 regions, many alike (sky, background): chance is 0.06
    floor, ceiling = fd.floor_and_ceiling()
    assert 0 < floor < 100 and ceiling > 50 * floor
    box = fd.report(F.avg_pool2d(train, 3, 1, 1, count_include_pad=False))["photos_fd"]
    noisy = fd.report(train + 0.05 * torch.randn(train.shape, generator=torch.Generator().manual_seed(0)))
    one_photo = fd.report(train[common._photos(16)[1] < 9])
    assert box > 3 * floor and noisy["photos_fd"] > 3 * floor and one_photo["photos_fd"] > 3 * floor
    assert one_photo["coverage"] <= 12 and fd.report(held)["coverage"] >= 16
    with pytest.raises(common.UserError, match=r"\(N, 3, 16, 16\)"):
        fd.report(torch.zeros(4, 1, 16, 16))


def test_digits_classifier_cached_by_an_older_version_is_retrained(tmp_path, monkeypatch):
    """A cache written before the float64 classifier (no 'trained_in') would silently score
    with an old, machine-dependent yardstick: it is retrained and overwritten instead."""
    old = {"net": common.FDClassifier().state_dict(), "accuracy": 0.5}
    common.save_atomic(old, str(tmp_path / "digits_classifier-16.pt"))
    trained = []
    monkeypatch.setattr(common, "train_fd_classifier",
                        lambda name, size: trained.append(size) or (common.FDClassifier(), 0.97))
    assert common.ClassifierFD("digits", 16, str(tmp_path)).accuracy == 0.97 and trained == [16]
    assert common.ClassifierFD("digits", 16, str(tmp_path)).accuracy == 0.97 and trained == [16]  # cached


def test_digits_classifier_does_not_depend_on_the_thread_count():
    """The classifier is the yardstick of every digits-FD: trained in float64, so a different
    thread count (a different reduction order) gives the same weights, not a drifted net (in
    float32 the floor moved from 19.8 to 20.6 between 2 threads and 1)."""
    threads = torch.get_num_threads()
    try:
        nets = []
        for n in (1, 2):
            torch.set_num_threads(n)
            nets.append(common.train_fd_classifier("digits", 16, epochs=1)[0].state_dict())
    finally:
        torch.set_num_threads(threads)
    for k, v in nets[0].items():
        assert v.dtype == torch.float32 and torch.allclose(v, nets[1][k], rtol=0, atol=1e-6), k


#################################################################################
#                                    asfm.py                                    #
#################################################################################


def test_rf_interpolant_target_and_one_step():
    rf = asfm.RectifiedFlow()
    x0, x1 = torch.zeros(2, 3), torch.ones(2, 3) * torch.tensor([[1.0], [3.0]])
    t = torch.tensor([0.25, 0.5])
    assert torch.allclose(rf.interpolate(x0, x1, t), torch.tensor([[0.25] * 3, [1.5] * 3]))
    const = lambda x, t, y=None: torch.full_like(x, 0.5)  # noqa: E731
    loss, _ = rf.loss(const, x1, x0=x0, t=t)  # mean of (0.5 - (x1 - x0))^2 = (0.25 + 6.25) / 2
    assert loss.item() == pytest.approx(3.25)
    # x_hat = x_t + (1 - t) v: from t = 0.25 with v = 0.5 -> x_t + 0.375
    x_t = rf.interpolate(x0, x1, t)
    assert torch.allclose(rf.one_step(const, x_t, t), x_t + torch.tensor([[0.375], [0.25]]))
    assert torch.allclose(rf.one_step(const, x0, torch.zeros(2)), x0 + 0.5)  # z + v(z, 0) at t = 0


def test_asfm_generator_and_r1_terms_by_hand():
    w = torch.tensor([1.0, -2.0])
    D = lambda x: x @ w  # noqa: E731  linear D: grad_x D = w, so R1 = ||w||^2 = 5
    method = asfm.ASFM(asfm.RectifiedFlow(), lambda_fm=1.0, lambda_adv=0.5, same_t=True, r1=0.2)
    x_real, x_fake = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 1.0]])
    loss, logs = method.discriminator_loss(D, x_real, x_fake)
    expect = F.softplus(-(x_real @ w)).mean() + F.softplus(x_fake @ w).mean() + 0.5 * 0.2 * 5.0
    assert loss.item() == pytest.approx(expect.item()) and logs["r1"].item() == pytest.approx(5.0)
    # D's accuracy, the log's d_acc: real scores (1, -2) -> half right; fake scores 0 -> not < 0
    assert logs["d_acc"].item() == pytest.approx((0.5 + 0.0) / 2)
    v = lambda x, t, y=None: torch.ones_like(x)  # noqa: E731
    z, x1 = torch.zeros(3, 2), torch.ones(3, 2) * 2
    torch.manual_seed(0)
    loss, logs, x_hat = method.generator_loss(v, D, z, x1)
    assert logs["fm"].item() == pytest.approx(1.0)  # (1 - (2 - 0))^2
    # x_hat = x_t + (1 - t) * 1 = 2t + 1 - t = 1 + t
    torch.manual_seed(0)
    t = method.rf.sample_t(3, "cpu")
    assert torch.allclose(x_hat, (1 + t)[:, None].expand(3, 2))
    adv = F.softplus(-(x_hat @ w)).mean()
    assert loss.item() == pytest.approx(1.0 + 0.5 * adv.item())


def test_training_memory_fifo_semantics():
    mem = asfm.TrainingMemory(size=3, batch=2, shape=(2,), device="cpu")
    k = [0]

    def generate(n):
        k[0] += 1
        return torch.full((n, 2), float(k[0])), torch.full((n, 2), float(-k[0]))
    for _ in range(3):
        mem.refresh(generate)
    assert mem.filled == 3 and sorted(mem.z[:, 0, 0].tolist()) == [1, 2, 3]
    mem.refresh(generate)  # the oldest batch (1) is dropped
    assert sorted(mem.z[:, 0, 0].tolist()) == [2, 3, 4] and mem.oldest == 1
    z, x1 = mem.sample(500)
    assert set(z[:, 0].tolist()) == {2.0, 3.0, 4.0} and torch.equal(z, -x1)  # pairs stay paired
    sd = mem.state_dict()
    mem2 = asfm.TrainingMemory(3, 2, (2,), "cpu")
    mem2.load_state_dict(sd)
    assert torch.equal(mem2.z, mem.z) and (mem2.oldest, mem2.filled) == (1, 3)


def test_memory_pairs_come_from_the_current_model():
    net = common.MLP(2, 16, 1)
    z = torch.randn(5, 2)
    gen = asfm.generator(net, (2,), 3, "cpu", common.nullcontext, source=lambda n: z)
    _, x1 = gen(5)
    assert torch.allclose(x1, asfm.RectifiedFlow.sample(net, z, 3)[0])
    with torch.no_grad():
        net.net[-1].bias.add_(1.0)  # the model changes -> the next pairs follow it
    _, x1_new = gen(5)
    assert torch.allclose(x1_new, asfm.RectifiedFlow.sample(net, z, 3)[0])
    assert not torch.allclose(x1_new, x1, atol=0.1)


def test_asfm_presets_follow_the_memory_rule_and_the_digits_ablations():
    tiny = asfm.parse(["--dataset", "digits"])  # the memory holds at least the 1500 training digits
    assert tiny.mem_size * tiny.batch_size >= common.DIGITS_TRAIN and (tiny.same_t, tiny.freq) == (True, 20)
    # the game that beat 2-RF on photos and digits (README, ASFM: 3 seeds each); the earlier
    # r1 0.01 / lambda_adv 0.1 lost to 2-RF on photos
    assert (tiny.r1, tiny.lambda_adv) == (10.0, 0.3)
    assert asfm.parse(["--dataset", "photos"]).mem_size == tiny.mem_size  # the rule did not help there
    assert asfm.parse(["--dataset", "digits", "--no-same-t"]).same_t is False  # Algorithm 1's t2
    cifar = asfm.parse(["--dataset", "cifar10", "--data-dir", "nowhere"])
    assert cifar.mem_size * cifar.batch_size >= 60_000 and cifar.same_t is False
    assert asfm.parse([]).same_t is False and asfm.parse(["--same-t"]).same_t is True


def test_refresh_cadence_in_training(tmp_path, monkeypatch):
    calls = []
    real = asfm.TrainingMemory.refresh
    monkeypatch.setattr(asfm.TrainingMemory, "refresh", lambda self, g: calls.append(1) or real(self, g))
    asfm.main(["--stage", "asfm", "--init", "none", "--steps", "12", "--freq", "4", "--mem-size", "3",
               "--batch-size", "64", "--width", "32", "--out-dir", str(tmp_path / "a"), "--device", "cpu"])
    assert len(calls) == 3 + 12 // 4


TOY = ["--dataset", "8gaussians", "--width", "128", "--batch-size", "256", "--device", "cpu",
       "--log-every", "1000", "--ema-decay", "0.99"]


def one_step_distance(out_dir, stage):
    net = common.MLP(2, 128, 3)
    common.load_weights(net, os.path.join(out_dir, "ckpt.pt"))
    torch.manual_seed(1)
    x, _ = asfm.RectifiedFlow.sample(net, torch.randn(2000, 2), 1)
    ref, _ = common.toy_sample("8gaussians", 2000, torch.Generator().manual_seed(7))
    return common.toy_metrics(x, ref)["sw2"]


@pytest.fixture(scope="module")
def toy_rf(tmp_path_factory):
    """An 800-step 1-RF on 8gaussians, shared by the toy reflow/ASFM tests."""
    rf_dir = tmp_path_factory.mktemp("toy-rf")
    asfm.main(TOY + ["--stage", "rf", "--steps", "800", "--lr", "2e-3", "--out-dir", str(rf_dir)])
    return rf_dir


def test_reflow_and_asfm_one_step_beat_1rf_on_toy(tmp_path, toy_rf):
    rf_dir = toy_rf
    asfm.main(TOY + ["--stage", "reflow", "--steps", "300", "--reflow-pairs", "4000",
                     "--init", str(rf_dir / "ckpt.pt"), "--out-dir", str(tmp_path / "reflow")])
    asfm.main(TOY + ["--stage", "asfm", "--steps", "300", "--mem-size", "10", "--freq", "2",
                     "--init", str(rf_dir / "ckpt.pt"), "--out-dir", str(tmp_path / "asfm")])
    d_rf = one_step_distance(rf_dir, "rf")
    d_reflow = one_step_distance(tmp_path / "reflow", "reflow")
    d_asfm = one_step_distance(tmp_path / "asfm", "asfm")
    print(f"one-step sliced W2: 1-RF {d_rf:.3f}, 2-RF {d_reflow:.3f}, ASFM {d_asfm:.3f}")
    assert d_reflow < 0.7 * d_rf and d_asfm < 0.7 * d_rf
    assert d_asfm < 1.5 * d_reflow  # 1.27x at this budget: a bound that catches 2-D regressions


def test_memory_quality_reads_the_newest_pairs_and_scores_digits(digits_fd):
    mem = asfm.TrainingMemory(size=4, batch=3, shape=(1, 16, 16), device="cpu")
    digits = common._digits(16, True)[0]
    batches = iter([digits[:3], digits[3:6], digits[6:9], 0.2 * digits[9:12] - 0.8, 0.2 * digits[12:15] - 0.8])
    for _ in range(5):  # the fifth batch overwrites the first: slots hold batches 5, 2, 3, 4
        mem.refresh(lambda n: (torch.zeros(n, 1, 16, 16), next(batches)))
    newest = torch.cat([0.2 * digits[12:15] - 0.8, 0.2 * digits[9:12] - 0.8])  # batches 5 and 4
    q = asfm.memory_quality(mem, n=6)
    assert q["mem_mean"].item() == pytest.approx(newest.mean().item(), abs=1e-6)
    assert q["mem_std"].item() == pytest.approx(newest.std().item(), abs=1e-6)
    assert "mem_fd" not in q
    # on digits: a memory of real digits scores near the real-digit value, a faded one far above it
    mem = asfm.TrainingMemory(size=8, batch=64, shape=(1, 16, 16), device="cpu")
    real = iter(digits[:512].split(64))
    for _ in range(8):
        mem.refresh(lambda n: (torch.zeros(n, 1, 16, 16), next(real)))
    good = asfm.memory_quality(mem, digits_fd)
    assert good["mem_fd"] == pytest.approx(digits_fd.report(digits[:512])["digits_fd"])
    faded = iter((0.3 * digits[512:1024] - 0.7).split(64))  # contrast lost, as in a drifting memory
    for _ in range(8):
        mem.refresh(lambda n: (torch.zeros(n, 1, 16, 16), next(faded)))
    drifted = asfm.memory_quality(mem, digits_fd)
    assert drifted["mem_fd"] > 5 * good["mem_fd"] and drifted["mem_std"] < 0.5 * good["mem_std"]


def test_memory_monitor_shows_drift_without_the_adversarial_term(tmp_path, toy_rf):
    """A one-pair-batch memory refreshed every step (the paper's failing 'Model A' regime): with
    lambda_adv = 0 the model trains on its own samples alone and the memory collapses to about
    half the data's spread; lambda_adv = 1 holds it to the data. The monitor's log shows both."""
    def mem_std(adv):
        out = tmp_path / f"adv{adv}"
        asfm.main(TOY + ["--stage", "asfm", "--steps", "150", "--mem-size", "2", "--freq", "1",
                         "--lambda-adv", adv, "--log-every", "10", "--init", str(toy_rf / "ckpt.pt"),
                         "--out-dir", str(out)])
        log = (out / "log.txt").read_text()
        data_std = float(re.search(r"memory monitor .*data mean \S+ std ([0-9.]+)", log).group(1))
        logged = [float(v) for v in re.findall(r"mem_std ([0-9.]+)", log)]
        assert len(logged) == 15 and data_std == pytest.approx(2.1, abs=0.2)
        return sum(logged[-3:]) / 3 / data_std
    drifted, held = mem_std("0"), mem_std("1")
    print(f"memory std / data std after 150 steps: lambda_adv 0 {drifted:.2f}, 1 {held:.2f}")
    assert drifted < 0.7 and held > 0.85


def test_asfm_digits_resume_continues_exactly(tmp_path, digits_fd):
    """On digits the drift monitor builds a classifier, which draws weights, whenever a run
    starts: a resumed run must still draw what the uninterrupted one drew (it did not)."""
    (tmp_path / "fid_stats").mkdir()  # the runs' classifier cache: the one trained for these tests
    shutil.copy(os.path.join(digits_fd.cache_dir, "digits_classifier-16.pt"), tmp_path / "fid_stats")
    base = ["--dataset", "digits", "--stage", "asfm", "--init", "none", "--width", "32", "--batch-size",
            "32", "--mem-size", "2", "--freq", "2", "--ckpt-every", "2", "--device", "cpu"]
    asfm.main(base + ["--steps", "4", "--out-dir", str(tmp_path / "straight")])
    asfm.main(base + ["--steps", "2", "--out-dir", str(tmp_path / "killed")])  # "killed" at step 2
    asfm.main(base + ["--steps", "4", "--out-dir", str(tmp_path / "killed"), "--resume"])
    a, b = (common.load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in ("straight", "killed"))
    for key in ["net", "D"]:
        for k in a["state"][key]:
            assert torch.equal(a["state"][key][k], b["state"][key][k]), (key, k)
    assert "mem_fd" in (tmp_path / "killed" / "log.txt").read_text()


def test_asfm_resume_continues_exactly(tmp_path):
    # --sample-every 3: the uninterrupted run samples at step 3, the resumed one does not; sampling
    # must not shift the training random draws
    base = ["--stage", "asfm", "--init", "none", "--mem-size", "3", "--freq", "2", "--width", "32",
            "--batch-size", "64", "--device", "cpu", "--ckpt-every", "3", "--sample-every", "3",
            "--nfe", "1"]
    asfm.main(base + ["--steps", "6", "--out-dir", str(tmp_path / "straight")])
    asfm.main(base + ["--steps", "3", "--out-dir", str(tmp_path / "killed")])  # "killed" at step 3
    asfm.main(base + ["--steps", "6", "--out-dir", str(tmp_path / "killed"), "--resume"])
    a = common.load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))
    b = common.load_checkpoint(str(tmp_path / "killed" / "ckpt.pt"))
    assert a["step"] == b["step"] == 6
    for key in ["net", "ema", "D"]:
        for k in a["state"][key]:
            assert torch.equal(a["state"][key][k], b["state"][key][k]), (key, k)
    assert torch.equal(a["local"]["x1"], b["local"]["x1"])


def test_diverging_run_keeps_a_finite_resumable_checkpoint(tmp_path):
    # lr 1e37 makes the weights ~1e37 in one Adam step while that step's loss was finite: the
    # checkpoint due right after must not be written over the good one (its loss would be inf)
    out = str(tmp_path / "div")
    base = ["--stage", "rf", "--width", "16", "--device", "cpu", "--ckpt-every", "1",
            "--grad-clip", "0", "--warmup", "0", "--out-dir", out]
    asfm.main(base + ["--steps", "3"])
    with pytest.raises(common.UserError, match=r"weights \(or the loss\) became NaN/inf before step 4;"
                       r" stopped without saving, the last good checkpoint is .*\(step 3\)"):
        asfm.main(base + ["--steps", "6", "--lr", "1e37", "--resume", "--allow-changed", "lr"])
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for k in ("net", "ema") for v in ckpt["state"][k].values())
    asfm.main(base + ["--steps", "5", "--resume"])  # resumes and trains on
    assert common.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 5
    with pytest.raises(common.UserError, match=r"--ema-decay 1.5.*\[0, 1\)"):
        asfm.main(base + ["--steps", "1", "--ema-decay", "1.5"])


def test_asfm_images_eval_edit_and_bench(tmp_path, capsys):
    write_pngs(tmp_path / "img", 8)
    img = ["--dataset", "folder", "--data-dir", str(tmp_path / "img"), "--preset", "tiny",
           "--batch-size", "4", "--device", "cpu", "--out-dir", str(tmp_path / "r")]
    asfm.main(img + ["--stage", "asfm", "--init", "none", "--steps", "2", "--mem-size", "2", "--mem-nfe", "2",
                     "--workers", "0"])
    asfm.main(img + ["--stage", "asfm", "--mode", "edit", "--edit-index", "0,1", "--nfe", "2"])
    assert os.path.isfile(tmp_path / "r" / "edit_0_1.png")
    asfm.main(img + ["--stage", "asfm", "--mode", "bench", "--nfe", "1", "--freq", "2", "--mem-nfe", "2"])
    assert "ASFM / 1-RF step time" in capsys.readouterr().out
    # FID / precision / recall plumbing with random Inception weights (no download in tests)
    asfm.main(img + ["--stage", "asfm", "--mode", "eval", "--nfe", "1", "--fid-n", "8",
                     "--inception-weights", "random", "--workers", "0"])
    out = capsys.readouterr().out
    assert "eval nfe=1: fid=" in out and "recall=" in out and "eval nfe=rk45" not in out  # not named
    assert "precision=fp32" in out and "straightness S" in out
    grid = Image.open(tmp_path / "r" / "same_noise_by_nfe.png")  # one row per NFE, 8 noises
    assert grid.size == (8 * (16 + 2) + 2, 1 * (16 + 2) + 2)  # 16x16 images, 2-pixel padding


def test_asfm_under_torchrun_two_gloo_ranks(tmp_path):
    out = tmp_path / "ddp"
    torchrun("asfm.py", ["--stage", "asfm", "--init", "none", "--steps", "4", "--batch-size", "64",
                         "--mem-size", "2", "--freq", "2", "--width", "32", "--device", "cpu",
                         "--out-dir", str(out)], tmp_path)
    ckpt = common.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 4 and "D" in ckpt["state"]
    # each rank keeps its own memory, saved beside the main checkpoint
    r0, r1 = (common.load_checkpoint(str(out / f"ckpt.pt.rank{r}")) for r in (0, 1))
    assert r0["local"]["z"].shape == (2, 32, 2) and not torch.equal(r0["local"]["z"], r1["local"]["z"])


def test_ddp_on_images_does_not_warn_about_grad_strides(tmp_path):
    # every torchrun image run printed PyTorch's "Grad strides do not match bucket view strides": on CPU
    # a 1x1 conv's weight grad [C, C, 1, 1] has strides [C, 1, C, C], its bucket [C, 1, 1, 1] (size-1 dims;
    # at batch 64: batch 8 takes another conv path and never warned)
    folder = _image_folder(tmp_path / "imgs", n=64)
    res = torchrun("asfm.py", ["--dataset", "folder", "--data-dir", folder, "--preset", "tiny", "--stage", "rf",
                               "--steps", "2", "--batch-size", "64", "--device", "cpu", "--sample-every", "0",
                               "--out-dir", str(tmp_path / "ddp")], tmp_path)
    assert "Grad strides" not in res.stderr and "step 2/2" in res.stdout + res.stderr
    assert common.load_checkpoint(str(tmp_path / "ddp" / "ckpt.pt"))["step"] == 2


def _asfm_rank(rank, world, port, out, argv):
    """One torchrun-like rank running asfm.main; keeps the discriminator it built."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    built = []
    make = asfm.make_discriminator
    asfm.make_discriminator = lambda *a, **k: built.append(make(*a, **k)) or built[-1]
    asfm.main(argv)
    if built:
        torch.save(built[-1].state_dict(), os.path.join(out, f"D{rank}.pt"))


def test_init_auto_hand_over_under_two_gloo_ranks(tmp_path):
    # fresh folder: --init auto trains the 1-RF first (per-rank seeds), rank 1 must not load its
    # checkpoint before rank 0 has written it, and D must start (and stay) identical on both ranks
    argv = ["--stage", "asfm", "--init", "auto", "--rf-steps", "3", "--steps", "2",
            "--batch-size", "32", "--mem-size", "2", "--freq", "1", "--width", "16",
            "--device", "cpu", "--out-dir", str(tmp_path / "asfm-asfm-8gaussians-toy")]
    spawn_two_ranks(_asfm_rank, tmp_path, argv)
    assert common.load_checkpoint(str(tmp_path / "asfm-rf-8gaussians-toy" / "ckpt.pt"))["step"] == 3
    assert common.load_checkpoint(str(tmp_path / "asfm-asfm-8gaussians-toy" / "ckpt.pt"))["step"] == 2
    d0, d1 = (torch.load(tmp_path / f"D{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(d0[k], d1[k]) for k in d0)


def test_offline_reflow_pairs_split_over_two_ranks_match_one(tmp_path):
    # 100 pairs in batches of 32: rank 0 makes batches 0 and 2, rank 1 batches 1 and 3 (4 pairs)
    argv = ["--stage", "reflow", "--init", "none", "--steps", "1", "--reflow-pairs", "100",
            "--reflow-nfe", "3", "--batch-size", "32", "--width", "16", "--device", "cpu"]
    asfm.main(argv + ["--out-dir", str(tmp_path / "one")])
    spawn_two_ranks(_asfm_rank, tmp_path, argv + ["--out-dir", str(tmp_path / "two")])
    one, two = (torch.load(tmp_path / d / "reflow_pairs.pt", weights_only=True) for d in ("one", "two"))
    assert one["z"].shape == (100, 2) and torch.equal(one["z"], two["z"])
    assert torch.allclose(one["x1"], two["x1"], atol=1e-6) and not one["x1"].is_cuda
    assert os.listdir(tmp_path / "two").count("reflow_pairs.pt.rank0") == 0  # shards removed
    # the pairs are the teacher's Euler-3 solutions from their own noise
    torch.manual_seed(0)  # --init none: the teacher is the net as built after seeding
    teacher = common.build_net(make_args(["--width", "16"]), (2,))
    assert torch.allclose(asfm.RectifiedFlow.sample(teacher, one["z"][:5], 3)[0], one["x1"][:5], atol=1e-6)
    # a rerun into the same folder that asks for other pairs does not silently reuse these
    with pytest.raises(common.UserError, match="reflow_pairs.pt was made with"):
        asfm.main(argv[:7] + ["200"] + argv[8:] + ["--out-dir", str(tmp_path / "one"), "--overwrite"])


def test_offline_reflow_pairs_killed_midway_resume_where_they_stopped(tmp_path, monkeypatch):
    # 100 pairs in 10 batches; the shard is saved after every batch (10%), the run dies in batch 4
    argv = ["--stage", "reflow", "--init", "none", "--steps", "1", "--reflow-pairs", "100",
            "--reflow-nfe", "3", "--batch-size", "10", "--width", "16", "--device", "cpu"]
    asfm.main(argv + ["--out-dir", str(tmp_path / "clean")])
    calls, sample, resumed_run = [], asfm.RectifiedFlow.sample, []

    def dies_in_batch_4(net, z, *a, **k):
        calls.append(z.clone())
        if len(calls) == 4 and not resumed_run:
            raise KeyboardInterrupt
        return sample(net, z, *a, **k)
    monkeypatch.setattr(asfm.RectifiedFlow, "sample", staticmethod(dies_in_batch_4))
    with pytest.raises(KeyboardInterrupt):
        asfm.main(argv + ["--out-dir", str(tmp_path / "killed")])
    assert not (tmp_path / "killed" / "reflow_pairs.pt").exists()
    calls.clear()
    resumed_run.append(True)
    asfm.main(argv + ["--out-dir", str(tmp_path / "killed"), "--resume"])
    clean, resumed = (torch.load(tmp_path / d / "reflow_pairs.pt", weights_only=True) for d in ("clean", "killed"))
    made = [j for j in range(10) if any(torch.equal(z, clean["z"][10 * j: 10 * j + 10]) for z in calls)]
    assert made == [3, 4, 5, 6, 7, 8, 9]  # batches 0-2 were kept from the killed run
    assert torch.equal(clean["z"], resumed["z"]) and torch.equal(clean["x1"], resumed["x1"])
    assert not (tmp_path / "killed" / "reflow_pairs.pt.rank0").exists()


def test_asfm_toy_eval_numbers_figure_and_straightness(tmp_path, capsys):
    out = str(tmp_path / "t")
    asfm.main(["--stage", "rf", "--steps", "20", "--width", "32", "--device", "cpu", "--out-dir", out])
    asfm.main(["--stage", "rf", "--mode", "eval", "--fid-n", "300", "--width", "32", "--device", "cpu",
               "--out-dir", out, "--nfe", "1,rk45"])
    text = capsys.readouterr().out
    sw2 = {k: float(v) for k, v in re.findall(r"eval nfe=(\w+): sw2=([\d.]+)", text)}
    used = int(re.search(r"eval nfe=rk45: .* nfe=(\d+) n=300", text).group(1))
    S = float(re.search(r"straightness S = ([\d.e+-]+) \(Euler 100, 300 samples", text).group(1))
    assert set(sw2) == {"1", "rk45"} and all(0 < v < 10 for v in sw2.values())
    assert used > 6 and S > 0  # RK45 takes several adaptive steps; a 20-step 1-RF is curved
    assert os.path.getsize(os.path.join(out, "same_noise_by_nfe.png")) > 10_000  # paths per NFE
    with pytest.raises(common.UserError, match="--mode edit needs an image"):
        asfm.main(["--stage", "rf", "--mode", "edit", "--width", "32", "--device", "cpu", "--out-dir", out])
    with pytest.raises(common.UserError, match="--init .*missing.pt: no such file"):
        asfm.main(["--stage", "asfm", "--init", str(tmp_path / "missing.pt"), "--out-dir", out + "2",
                   "--steps", "1"])


#################################################################################
#                              integration_flow.py                              #
#################################################################################


def small(tmp_path, name, *extra):
    train = ["--log-every", "1000", "--n-conv", "64", "--conv-iters", "3", "--fid-n", "200"]  # training's alone
    return ["--out-dir", str(tmp_path / name), "--width", "32", "--depth", "2", "--batch-size", "64",
            *(train if training(extra) else []), *extra]


class FakeNet(torch.nn.Module):
    """Returns a fixed F and records what it was called with."""

    def __init__(self, F):
        super().__init__()
        self.F, self.calls = F, []

    def forward(self, x, t, y=None, extra=None):
        self.calls.append((x.clone(), t.clone(), None if extra is None else extra.clone()))
        return self.F


# ---- forward processes and parameterizations -----------------------------------

def test_forward_processes_closed_form():
    vp = integration_flow.IntegrationFlow(ode="vp")
    beta1, beta2 = 1e-4, 1e-4 + (0.02 - 1e-4) / 999
    assert vp.abar[0].item() == pytest.approx(1 - beta1, abs=1e-12)
    assert vp.abar[1].item() == pytest.approx((1 - beta1) * (1 - beta2), abs=1e-12)
    assert vp.abar[-1].item() == pytest.approx(4.04e-5, rel=0.01)  # DDPM's abar_T
    n = torch.tensor([1.0, 999.0])
    a, s = vp.coeffs(n, 2)
    assert a[0, 0].item() == pytest.approx(math.sqrt((1 - beta1) * (1 - beta2)), rel=1e-6)
    assert (a ** 2 + s ** 2).flatten().tolist() == pytest.approx([1, 1], abs=1e-6)
    assert vp.net_time(n).tolist() == pytest.approx([0.001, 0.999])
    assert vp.level(1, 1, "cpu").item() == 999 and vp.level(0, 1, "cpu").item() == 0
    t = vp.sample_time(1000, "cpu")
    assert torch.equal(t, t.round()) and t.min() >= 0 and t.max() <= 999
    cos = integration_flow.IntegrationFlow(ode="vp", vp_schedule="cosine")
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cos.abar[499].item() == pytest.approx(f(0.5) / f(0), rel=1e-6)

    ve = integration_flow.IntegrationFlow(ode="ve")
    assert ve.level(1, 1, "cpu").item() == pytest.approx(50)
    assert ve.level(0, 1, "cpu").item() == pytest.approx(0.01)
    assert ve.level(0.5, 1, "cpu").item() == pytest.approx(math.sqrt(0.5), rel=1e-5)  # geometric
    sig = torch.tensor([0.01, math.sqrt(0.5), 50.0])
    assert ve.net_time(sig).tolist() == pytest.approx([0, 0.5, 1], abs=1e-6)
    a, s = ve.coeffs(sig, 2)
    assert a.flatten().tolist() == [1, 1, 1] and s.flatten().tolist() == pytest.approx(sig.tolist())
    t = ve.sample_time(1000, "cpu")
    assert t.min() >= 0.01 and t.max() <= 50

    rf = integration_flow.IntegrationFlow(ode="rf")
    a, s = rf.coeffs(torch.tensor([0.25]), 4)
    assert a.shape == (1, 1, 1, 1) and (a.item(), s.item()) == (0.25, 0.75)
    assert rf.level(1, 1, "cpu").item() == 0  # sampling starts at t = 0 (noise)


def test_parameterizations_and_ve_boundary_exact():
    x_t, F = torch.randn(5, 2), 1e6 * torch.randn(5, 2)
    anchor = torch.randn(5, 2)
    ve = integration_flow.IntegrationFlow(ode="ve")
    net = FakeNet(F)
    out = ve.denoise(net, x_t, torch.full((5,), 0.01), anchor)
    assert torch.equal(out, x_t)  # boundary condition: exact, even with a huge F
    out = ve.denoise(net, x_t, torch.full((5,), 1.0), anchor)
    assert torch.allclose(out, 0.01 * x_t + 0.99 * F, rtol=1e-6)
    x_in, t_in, extra = net.calls[-1]
    assert torch.allclose(x_in, x_t / math.sqrt(1 + 0.25)) and torch.equal(extra, anchor)
    assert t_in.tolist() == pytest.approx([math.log(100) / math.log(5000)] * 5)

    rf = integration_flow.IntegrationFlow(ode="rf")
    assert torch.equal(rf.denoise(net, x_t, torch.ones(5), anchor), x_t)  # t = 1 is data
    assert torch.allclose(rf.denoise(net, x_t, torch.full((5,), 0.25), anchor), x_t + 0.75 * F)
    assert torch.equal(net.calls[-1][0], x_t)
    assert torch.allclose(integration_flow.IntegrationFlow(ode="vp").denoise(net, x_t, torch.full((5,), 3.0), anchor), x_t - F)
    res = integration_flow.IntegrationFlow(ode="rf", param="residual")
    assert torch.allclose(res.denoise(net, x_t, torch.full((5,), 0.25), anchor), x_t - F)


def test_distances_and_loss():
    m = integration_flow.IntegrationFlow(distance="pseudo-huber")
    a, b = torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)
    c = 0.00054 * math.sqrt(2)
    assert m.d(a, b).item() == pytest.approx(math.sqrt(25 + c * c) - c, rel=1e-6)
    assert integration_flow.IntegrationFlow(distance="l2").d(a, b).item() == pytest.approx(12.5)
    # the loss is w d(out, x1) + (1 - w) d(out, anchor), anchor = bank[idx], out from the
    # parameterization; then bank[idx] <- out (the paper's text) or x1 (the released code)
    m = integration_flow.IntegrationFlow(ode="rf", distance="l2")
    x1, idx = torch.randn(8, 2), torch.arange(2, 10)
    bank = integration_flow.AnchorBank(12, (2,), seed=1)
    anchor, before = bank.anchors[idx].clone(), bank.anchors.clone()
    torch.manual_seed(0)
    loss, logs = m.loss(FakeNet(torch.zeros(8, 2)), x1, idx, bank, 0.3)
    torch.manual_seed(0)
    t = m.sample_time(8, "cpu")[:, None]
    out = t * x1 + (1 - t) * torch.randn_like(x1)  # F = 0: out = x_t
    want = 0.3 * (out - x1).pow(2).mean() + 0.7 * (out - anchor).pow(2).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(bank.anchors[idx], out) and torch.equal(bank.anchors[:2], before[:2])
    assert torch.allclose(logs["anchor_change"], (out - anchor).norm(dim=1))
    integration_flow.IntegrationFlow(ode="rf", bank_update="data").loss(FakeNet(torch.zeros(8, 2)), x1, idx, bank, 0.3)
    assert torch.equal(bank.anchors[idx], x1)
    free = integration_flow.IntegrationFlow(bank_update="none")  # baseline: zero anchor in, w = 1, no bank
    net = FakeNet(torch.zeros(8, 2))
    loss, logs = free.loss(net, x1, idx, None, 0.3)
    assert torch.equal(net.calls[-1][2], torch.zeros(8, 2)) and logs["w"].item() == 1.0
    assert loss.item() == pytest.approx(logs["d_data"].item()) and "anchor_change" not in logs


class AffineNet(torch.nn.Module):
    """F = 0.5 x - 0.8 anchor + 0.1: depends on its input and its anchor; records every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y=None, extra=None):
        self.calls.append((x.clone(), t.clone(), extra.clone()))
        return 0.5 * x - 0.8 * extra + 0.1


def test_self_anchor_is_the_models_own_iteration_from_noise():
    """--bank-update self (the reviewers' suggestion): the anchor the network sees in training is
    a_K of the sampler's iteration a_(k+1) = G(x_t, t, a_k), from a fresh a_0 ~ N(0, I), at the
    pair's own x_t and t; never the example's bank slot (even if a bank is passed), never x1."""
    m = integration_flow.IntegrationFlow(ode="rf", distance="l2", bank_update="self", anchor_iters=3)
    x1, idx = 100 + torch.randn(8, 2), torch.arange(2, 10)
    bank = integration_flow.AnchorBank(12, (2,), seed=1)
    before, net = bank.anchors.clone(), AffineNet()
    torch.manual_seed(0)
    loss, logs = m.loss(net, x1, idx, bank, 0.3)
    torch.manual_seed(0)  # the same draws, in the loss's order: t, the noise of x_t, then a_0
    t = m.sample_time(8, "cpu")
    x_t = t[:, None] * x1 + (1 - t[:, None]) * torch.randn_like(x1)
    G = lambda a: x_t + (1 - t[:, None]) * (0.5 * x_t - 0.8 * a + 0.1)  # noqa: E731  (rf: out = x_t + (1 - t) F)
    anchors = [torch.randn_like(x1)]
    for _ in range(3):
        anchors.append(G(anchors[-1]))
    assert len(net.calls) == 4  # K = 3 iterations without gradient, then the trained call
    for (x_in, t_in, a_in), want in zip(net.calls, anchors):
        assert torch.equal(x_in, x_t) and torch.equal(t_in, t)  # the same noisy point and time
        assert torch.allclose(a_in, want, atol=1e-5)
    out = G(anchors[3])
    assert loss.item() == pytest.approx((0.3 * (out - x1).pow(2).mean() + 0.7 * (out - anchors[3]).pow(2).mean()).item(),
                                        rel=1e-5)
    assert torch.allclose(logs["anchor_change"], (anchors[3] - anchors[2]).norm(dim=1), atol=1e-4)
    assert torch.equal(bank.anchors, before)  # the bank is neither read nor written
    # images: every iteration clamped to [-1, 1], as the sampler clamps (VE: x enters as c_in x_t)
    img = integration_flow.IntegrationFlow(ode="ve", bank_update="self", anchor_iters=2, images=True)
    net, x1 = AffineNet(), torch.rand(4, 1, 4, 4) * 2 - 1
    torch.manual_seed(1)
    img.loss(net, x1, torch.arange(4), None, 0.5)
    torch.manual_seed(1)
    sigma = img.sample_time(4, "cpu")
    x_t = x1 + sigma.view(-1, 1, 1, 1) * torch.randn_like(x1)
    a = torch.randn_like(x1)
    assert len(net.calls) == 3 and torch.equal(net.calls[0][2], a)
    for _, _, a_in in net.calls[1:]:
        with torch.no_grad():
            free = img.anchor_step(AffineNet(), x_t, sigma, a, False)
        a = free.clamp(-1, 1)
        assert (free.abs() > 1).any() and torch.allclose(a_in, a, atol=1e-5)


# ---- anchor bank ---------------------------------------------------------------

def test_bank_init_read_write():
    bank = integration_flow.AnchorBank(20000, (2,), seed=3)
    assert abs(bank.anchors.mean().item()) < 0.03 and abs(bank.anchors.std().item() - 1) < 0.03
    assert torch.equal(bank.anchors, integration_flow.AnchorBank(20000, (2,), seed=3).anchors)  # same on all ranks
    before = bank.anchors.clone()
    got = bank.read(torch.tensor([7]))
    got += 100  # a copy: the bank is unchanged
    assert torch.equal(bank.anchors, before)
    new = torch.randn(2, 2, requires_grad=True)
    change = bank.write(torch.tensor([5, 2]), new * 2)
    assert not bank.anchors.requires_grad
    assert torch.equal(bank.anchors[[5, 2]], (new * 2).detach())
    rest = torch.ones(20000, dtype=torch.bool)
    rest[[5, 2]] = False
    assert torch.equal(bank.anchors[rest], before[rest])  # only the global indices written
    assert change.tolist() == pytest.approx((new.detach() * 2 - before[[5, 2]]).norm(dim=1).tolist())
    half = integration_flow.AnchorBank(10, (3, 4, 4), dtype=torch.float16)
    assert half.anchors.dtype == torch.float16 and half.read(torch.tensor([0])).dtype == torch.float32


@pytest.mark.parametrize("mode", ["output", "data", "none", "self"])
def test_bank_update_modes_in_training(tmp_path, mode):
    path, x = points_file(tmp_path)
    integration_flow.main(small(tmp_path, mode, "--dataset", "points", "--data-dir", path, "--steps", "1",
                  "--bank-update", mode))
    ckpt = common.load_checkpoint(str(tmp_path / mode / "ckpt.pt"))
    if mode in ("none", "self"):  # self draws its anchors fresh: no bank, but the change history
        assert "bank" not in ckpt["state"] and ("anchor_change" in ckpt["state"]) == (mode == "self")
        return
    init = integration_flow.AnchorBank(len(x), (2,), seed=0).anchors
    bank = ckpt["state"]["bank"]
    changed = (bank != init).any(1)
    assert changed.sum().item() == 64  # one batch, written at its global indices
    if mode == "data":  # the released code's behaviour: the bank holds x0
        assert torch.equal(bank[changed], x[changed])
    else:  # the paper's: the model's estimate, never x0
        assert (bank[changed] - x[changed]).norm(dim=1).min() > 1e-3


@pytest.mark.parametrize("mode", ["output", "self"])
def test_resume_is_exact(tmp_path, mode):
    path, _ = points_file(tmp_path)
    base = ["--dataset", "points", "--data-dir", path, "--ckpt-every", "6", "--bank-update", mode]
    integration_flow.main(small(tmp_path, "a", *base, "--steps", "14"))
    integration_flow.main(small(tmp_path, "b", *base, "--steps", "6"))
    integration_flow.main(small(tmp_path, "b", *base, "--steps", "14", "--resume"))
    a, b = (common.load_checkpoint(str(tmp_path / n / "ckpt.pt")) for n in "ab")
    for key in ("net", "ema"):
        for k in a["state"][key]:
            assert torch.equal(a["state"][key][k], b["state"][key][k]), (key, k)
    if mode == "output":
        assert torch.equal(a["state"]["bank"], b["state"]["bank"])
    hist = a["state"]["anchor_change"]
    assert len(hist) == 3 and torch.equal(hist, b["state"]["anchor_change"])  # 4 steps per epoch
    assert os.path.isfile(tmp_path / "b" / "anchor_convergence.png")


def _if_bank_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    bank = integration_flow.AnchorBank(16, (2,), seed=0)
    idx = torch.arange(rank, 16, world)[:4]  # disjoint global indices per rank
    change = bank.write(idx, torch.full((4, 2), float(rank + 1)))
    bank.check_consistent()
    torch.save({"bank": bank.anchors, "n_change": len(change)}, f"{out}/rank{rank}.pt")
    if rank == 1:
        bank.anchors[0] += 1  # corrupt one copy: the check must notice
    try:
        bank.check_consistent()
        caught = False
    except RuntimeError:
        caught = True
    torch.save(caught, f"{out}/caught{rank}.pt")
    torch.distributed.destroy_process_group()


def test_bank_identical_on_two_gloo_ranks(tmp_path):
    mp.spawn(_if_bank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["bank"], r1["bank"]) and r0["n_change"] == 8  # 4 pairs from each rank
    init = integration_flow.AnchorBank(16, (2,), seed=0).anchors
    assert torch.equal(r0["bank"][[0, 2, 4, 6]], torch.ones(4, 2))  # rank 0's writes
    assert torch.equal(r0["bank"][[1, 3, 5, 7]], torch.full((4, 2), 2.0))  # rank 1's, on rank 0
    assert torch.equal(r0["bank"][8:], init[8:])
    assert all(torch.load(tmp_path / f"caught{r}.pt", weights_only=True) for r in (0, 1))


def test_torchrun_two_ranks_write_global_indices(tmp_path):
    path, x = points_file(tmp_path, n=128)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "integration_flow.py"] + small(
        tmp_path, "ddp", "--dataset", "points", "--data-dir", path, "--steps", "3",
        "--batch-size", "32", "--device", "cpu")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    bank = common.load_checkpoint(str(tmp_path / "ddp" / "ckpt.pt"))["state"]["bank"]
    changed = (bank != integration_flow.AnchorBank(128, (2,), seed=0).anchors).any(1)
    assert changed.sum().item() == 3 * 32  # both ranks' 16 rows per step, in rank 0's copy


# ---- sampling, toy behaviour, images, CLI --------------------------------------

def test_sampler_iterations_and_change_log():
    torch.manual_seed(0)
    net = common.MLP(2, 32, 2, 0, 2)
    z = torch.randn(50, 2)
    for ode in ("vp", "ve", "rf"):
        m = integration_flow.IntegrationFlow(ode=ode)
        x, info = m.sample(net, z, 5)
        assert info["nfe"] == 5 and len(info["change"]) == 5 and torch.isfinite(x).all()
        x1, _ = m.sample(net, z, 1, anchor=torch.zeros_like(z))
        a = torch.zeros_like(z)
        want = m.denoise(net, m.coeffs(m.level(1, 50, "cpu"), 2)[1] * z, m.level(1, 50, "cpu"), a)
        assert torch.allclose(x1, want)  # one step: G(x_T, T, a)
        x, info = m.sample(net, z, 3, sampler="renoise")
        assert info["nfe"] == 3 and torch.isfinite(x).all()
    x, info = integration_flow.IntegrationFlow(bank_update="none").sample(net, z, 8)
    assert info["nfe"] == 1  # the anchor-free model does not iterate


def test_toy_anchor_vs_plain_regression(tmp_path):
    """Measured on 8 gaussians (see the README): the one-step samples of Integration Flow
    stay about as far from the data as their random N(0, I) anchors (the network returns its
    anchor), plain x0 regression collapses toward the mean, and 16 anchor iterations do not
    bring the samples to the data either (with the EMA warm-up the averaged weights are those
    of the late, anchor-copying network; a lagging EMA of the early weights used to contract)."""
    ref = common.toy_sample("8gaussians", 2000, torch.Generator().manual_seed(1))[0]
    res = {}
    for mode in ("output", "none"):
        args = small(tmp_path, mode, "--steps", "800", "--width", "128", "--batch-size", "256",
                     "--bank-update", mode, "--log-every", "400")
        integration_flow.main(args)
        net = common.MLP(2, 128, 2, 0, 2)
        common.load_weights(net, str(tmp_path / mode / "ckpt.pt"))
        m = integration_flow.IntegrationFlow(bank_update=mode)
        torch.manual_seed(0)
        z = torch.randn(2000, 2)
        res[mode] = {k: common.sliced_wasserstein(m.sample(net, z, k)[0], ref) for k in (1, 16)}
        if mode == "output":
            changes = m.sample(net, z, 16)[1]["change"]
            res["contract"] = changes[-1] / changes[0]
    print(res)
    assert res["none"][1] > 0.8  # plain x0 regression collapses toward the mean
    anchors = common.sliced_wasserstein(torch.randn(2000, 2, generator=torch.Generator().manual_seed(0)), ref)
    assert res["output"][1] > 0.8 * anchors  # one step: about where the random anchors are
    assert res["output"][16] > 0.8 * anchors  # iterating the anchor does not reach the data
    assert res["none"][1] > res["output"][1]  # copying a random anchor beats collapsing to the mean


def test_images_folder_unet(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(g.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    argv = ["--dataset", "folder", "--data-dir", str(folder), "--preset", "tiny", "--width", "16",
            "--batch-size", "4", "--steps", "3", "--ode", "vp", "--bank-dtype", "float16",
            "--out-dir", str(tmp_path / "img"), "--n-conv", "4", "--conv-iters", "2"]
    integration_flow.main(argv)
    ckpt = common.load_checkpoint(str(tmp_path / "img" / "ckpt.pt"))
    assert ckpt["state"]["bank"].shape == (8, 3, 16, 16) and ckpt["state"]["bank"].dtype == torch.float16
    integration_flow.main(["--ckpt", str(tmp_path / "img" / "ckpt.pt"), "--mode", "sample", "--n", "4",
                           "--nfe", "1,2"])
    s = np.load(tmp_path / "img" / "samples" / "nfe2.npz")
    assert s["samples"].shape == (4, 16, 16, 3) and int(s["nfe"]) == 2


def test_xattn_unet_never_sees_anchor_pixel_positions():
    """--anchor-input xattn (DDDM): the anchor enters only as cross-attention tokens without a
    position embedding, so permuting its pixels leaves the output unchanged; concatenated
    channels (the deviation) do see positions. The anchor still matters in both."""
    torch.manual_seed(0)
    x, t, a = torch.randn(2, 1, 16, 16), torch.rand(2), torch.randn(2, 1, 16, 16)
    perm = torch.randperm(256)
    a_perm = a.flatten(2)[:, :, perm].reshape(a.shape)
    net = common.UNet(1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_res=(8,), image_size=16, context_ch=1).eval()
    for p in net.parameters():  # undo the zero-init so that every path carries signal
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        out, out_perm = net(x, t, context=a), net(x, t, context=a_perm)
        assert torch.allclose(out, out_perm, atol=1e-5)
        assert (out - net(x, t, context=a + 2)).abs().max() > 1e-2  # it does read the anchor
        assert net.conv_in.in_channels == 1  # x_t alone is the input
    cat = common.UNet(1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_res=(8,), image_size=16, extra_ch=1).eval()
    for p in cat.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        assert (cat(x, t, extra=a) - cat(x, t, extra=a_perm)).abs().max() > 1e-2
    # through the method: denoise() routes the anchor to context= only
    m = integration_flow.IntegrationFlow(ode="ve", anchor_input="xattn")
    with torch.no_grad():
        d1 = m.denoise(net, x, torch.full((2,), 3.0), a)
        d2 = m.denoise(net, x, torch.full((2,), 3.0), a_perm)
    assert torch.allclose(d1, d2, atol=1e-5)


def test_unet_without_context_is_unchanged():
    """context_ch = 0 (every other script) builds no cross-attention module: the parameters are
    exactly those of the plain U-Net; context_ch > 0 only adds CrossAttnBlocks."""
    kw = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_res=(8,), image_size=16)
    plain, xa = common.UNet(3, **kw), common.UNet(3, context_ch=3, **kw)
    assert plain.mid_xattn is None and not any(isinstance(m, common.CrossAttnBlock) for m in plain.modules())
    cross = [n + "." for n, m in xa.named_modules() if isinstance(m, common.CrossAttnBlock)]
    assert len(cross) == 4  # one 8x8 down block, two 8x8 up blocks, the middle
    added = set(xa.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) < set(xa.state_dict())
    assert all(any(k.startswith(c) for c in cross) for k in added)


def test_vp_image_sampler_follows_dddm():
    """DDDM's image sampler: VP starts at n = N (x_T = z, t_net = 1) and clamps every
    iteration; 2-D data starts at the last trained index N - 1 and is not clamped."""
    z = torch.randn(3, 1, 4, 4)
    m = integration_flow.IntegrationFlow(ode="vp")
    net = FakeNet(torch.full((3, 1, 4, 4), -5.0))  # out = x_T - F = x_T + 5
    x, _ = m.sample(net, z, 2, images=True)
    x_in, t_in, _ = net.calls[0]
    assert torch.equal(x_in, z) and t_in.tolist() == [1.0, 1.0, 1.0]
    assert torch.equal(x, torch.ones_like(z))  # clamped to [-1, 1]
    net.calls.clear()
    x, _ = m.sample(net, z, 1)
    assert net.calls[0][1].tolist() == pytest.approx([0.999] * 3)
    assert torch.allclose(x, m.abar[-1].sqrt().float() * 0 + (1 - m.abar[-1]).sqrt().float() * z + 5)


@pytest.mark.parametrize("ode", ["vp", "ve", "rf"])
@pytest.mark.parametrize("inp", ["xattn", "concat"])
def test_images_train_and_sample_both_anchor_inputs(tmp_path, ode, inp):
    """Training and sampling run for every forward process with either anchor input; the
    checkpoint alone rebuilds the right network (the flag comes from its config)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(g.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    argv = ["--dataset", "folder", "--data-dir", str(folder), "--preset", "tiny", "--width", "8",
            "--batch-size", "4", "--steps", "2", "--ode", ode,
            "--out-dir", str(out), "--n-conv", "2", "--conv-iters", "2", "--sample-every", "0"]
    integration_flow.main(argv + ["--anchor-input", inp])
    state = common.load_checkpoint(str(out / "ckpt.pt"))["state"]["ema"]
    assert any("mid_xattn" in k for k in state) == (inp == "xattn")
    assert state["conv_in.weight"].shape[1] == (3 if inp == "xattn" else 6)
    integration_flow.main(["--ckpt", str(out / "ckpt.pt"), "--mode", "sample", "--n", "2", "--nfe", "1,2"])
    s = np.load(out / "samples" / "nfe2.npz")
    assert s["samples"].shape == (2, 16, 16, 3)


def test_xattn_needs_unet(tmp_path):
    with pytest.raises(common.UserError, match="2-D point"):
        integration_flow.main(small(tmp_path, "bad", "--steps", "1", "--anchor-input", "xattn"))
    with pytest.raises(common.UserError, match="needs --arch unet"):
        integration_flow.main(["--dataset", "folder", "--data-dir", str(tmp_path), "--arch", "dit",
                 "--anchor-input", "xattn", "--out-dir", str(tmp_path / "dit")])


def test_bench_ratio_is_the_ratio_of_the_two_timed_steps(tmp_path, capsys):
    integration_flow.main(small(tmp_path, "bench", "--mode", "bench", "--nfe", "1"))
    out = capsys.readouterr().out
    ms = [float(m) for m in re.findall(r"bench train: [\d.]+ steps/s \(([\d.]+) ms/step", out)]
    ratio = float(re.search(r"bench ratio: Integration Flow step / RF step = ([\d.]+)x", out).group(1))
    assert len(ms) == 2 and all(m > 0 for m in ms)  # Integration Flow first, then plain RF
    # each time is printed to 0.1 ms (sub-millisecond steps: up to 20% off), the ratio to 0.01x
    assert (ms[0] - 0.05) / (ms[1] + 0.05) - 0.01 <= ratio <= (ms[0] + 0.05) / max(ms[1] - 0.05, 1e-9) + 0.01


@pytest.mark.parametrize("flags,msg", [
    (["--nfe", "rk45"], "anchor iterations"),
    (["--w-schedule", "const", "--w", "1.5"], "--w 1.5"),
    (["--vp-betas", "0.1"], "--vp-betas"),
    (["--sigma-min", "60"], "sigma-min"),
])
def test_bad_input_one_line_errors(tmp_path, flags, msg):
    with pytest.raises(common.UserError, match=msg):
        integration_flow.main(small(tmp_path, "bad", "--steps", "1", *flags))


def test_resume_needs_matching_bank_mode(tmp_path):
    path, _ = points_file(tmp_path)
    integration_flow.main(small(tmp_path, "r", "--dataset", "points", "--data-dir", path, "--steps", "1",
                  "--bank-update", "none"))
    with pytest.raises(common.UserError, match="trained with --bank-update none, this run has --bank-update output"):
        integration_flow.main(small(tmp_path, "r", "--dataset", "points", "--data-dir", path, "--steps", "2",
                      "--resume"))


def test_anchor_input_mismatch_names_the_flag(tmp_path):
    out = tmp_path / "c"
    integration_flow.main(["--dataset", "digits", "--anchor-input", "concat", "--steps", "1", "--batch-size", "8",
                           "--width", "16", "--device", "cpu", "--n-conv", "2", "--conv-iters", "1",
                           "--out-dir", str(out)])
    with pytest.raises(common.UserError, match="written with .*--anchor-input concat: pass the same flags"):
        integration_flow.main(["--mode", "sample", "--ckpt", str(out / "ckpt.pt"), "--anchor-input", "xattn",
                               "--n", "2", "--device", "cpu"])


#################################################################################
#                              consistency_func.py                              #
#################################################################################


# ---- iCT formulas against hand-computed values ----------------------------------------

def test_karras_grid_endpoints_and_middle():
    s = consistency_func.karras_sigmas(3)
    assert s[0].item() == pytest.approx(0.002, rel=1e-12)
    assert s[-1].item() == pytest.approx(80.0, rel=1e-12)
    # ((0.002^(1/7) + 80^(1/7)) / 2)^7 by hand
    assert s[1].item() == pytest.approx(2.515218976, rel=1e-8)
    assert torch.all(consistency_func.karras_sigmas(1281).diff() > 0)


def test_curriculum_stages():
    # K = 800: K' = floor(800 / (log2(floor(1280/10)) + 1)) = floor(800 / 8) = 100
    assert [consistency_func.num_scales(k, 800) for k in (0, 99, 100, 199, 200, 300, 699, 700, 799)] == \
        [11, 11, 21, 21, 41, 81, 641, 1281, 1281]
    # K = 1000: K' = 125; the cap s1 + 1 = 1281 is reached at stage 7
    assert consistency_func.num_scales(124, 1000) == 11 and consistency_func.num_scales(125, 1000) == 21
    assert consistency_func.num_scales(10 ** 6, 1000) == 1281


def test_index_probabilities():
    s = consistency_func.karras_sigmas(3).tolist()
    cdf = [math.erf((math.log(v) + 1.1) / (math.sqrt(2) * 2.0)) for v in s]
    raw = [cdf[1] - cdf[0], cdf[2] - cdf[1]]
    p = consistency_func.index_probs(consistency_func.karras_sigmas(3))
    assert p.tolist() == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)
    for N in (11, 1281):
        p = consistency_func.index_probs(consistency_func.karras_sigmas(N))
        assert len(p) == N - 1 and (p >= 0).all() and p.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_scalings_and_boundary_condition_exact():
    m = consistency_func.ConsistencyTraining(100)
    sigma = torch.tensor([0.002, 1.0, 80.0])
    c_skip, c_out, c_in = m.scalings(sigma)
    assert c_skip.tolist() == pytest.approx([1.0, 0.25 / (0.998 ** 2 + 0.25), 0.25 / (79.998 ** 2 + 0.25)])
    assert c_out.tolist() == pytest.approx([0.0, 0.5 * 0.998 / math.sqrt(1.25), 0.5 * 79.998 / math.sqrt(6400.25)])
    assert c_in.tolist() == pytest.approx([1 / math.sqrt(0.25 + 0.002 ** 2), 1 / math.sqrt(1.25), 1 / math.sqrt(6400.25)])
    torch.manual_seed(0)
    for net, x in ((common.MLP(2, 32, 2), torch.randn(5, 2)),
                   (common.FuncGenerator(3, 8, 2, 32, 1, 4), torch.randn(5, 3, 8, 8))):
        smin = torch.full((5,), consistency_func.SIGMA_MIN)
        assert torch.equal(m.denoise(net, x, smin), x)  # f(x, sigma_min) = x exactly


class ZeroNet(nn.Module):
    def forward(self, x, t, y=None):
        return torch.zeros_like(x)


def test_loss_value_weight_and_huber_constant():
    """With F = 0, f = c_skip x_sigma, so the loss can be recomputed by hand from the same draws."""
    m, x = consistency_func.ConsistencyTraining(800), torch.randn(6, 3, 4, 4)
    torch.manual_seed(1)
    loss, logs = m.loss(ZeroNet(), x, k=150)  # stage 1: N = 21
    assert logs["N"] == 21
    torch.manual_seed(1)
    s = consistency_func.karras_sigmas(21)
    i = torch.multinomial(consistency_func.index_probs(s), 6, replacement=True)
    z = torch.randn_like(x)
    s0, s1 = s[i].float().view(-1, 1, 1, 1), s[i + 1].float().view(-1, 1, 1, 1)
    skip = lambda sig: 0.25 / ((sig - 0.002) ** 2 + 0.25)  # noqa: E731
    diff = (skip(s1) * (x + s1 * z) - skip(s0) * (x + s0 * z)).flatten(1)
    c = 0.00054 * math.sqrt(48)
    d = (diff.pow(2).sum(1) + c ** 2).sqrt() - c
    expected = (d / (s[i + 1] - s[i]).float()).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


class Recorder(nn.Module):
    """Records every call: input, t, whether grad is on, and its dropout mask."""

    def __init__(self):
        super().__init__()
        self.lin, self.drop, self.calls = nn.Linear(2, 2), nn.Dropout(0.5), []

    def forward(self, x, t, y=None):
        mask = self.drop(torch.ones_like(x))
        self.calls.append(dict(x=x.detach(), t=t.detach(), grad=torch.is_grad_enabled(), mask=mask))
        return self.lin(x) * mask


def test_teacher_no_grad_same_noise_same_dropout():
    m, net = consistency_func.ConsistencyTraining(100), Recorder().train()
    x = torch.randn(64, 2)
    loss, _ = m.loss(net, x, k=0)
    teacher, student = net.calls
    assert not teacher["grad"] and student["grad"]
    assert torch.equal(teacher["mask"], student["mask"])  # same dropout randomness
    assert not torch.equal(teacher["mask"], torch.ones_like(x))
    z = []
    for call in (teacher, student):  # recover z from x_in = c_in (x + sigma z), sigma = exp(4 t)
        sigma = (4 * call["t"].double()).exp()
        c_in = 1 / (sigma ** 2 + 0.25).sqrt()
        z.append((call["x"].double() / c_in[:, None] - x.double()) / sigma[:, None])
        assert (sigma > 0.0019).all()
    assert torch.allclose(z[0], z[1], atol=1e-3)
    assert (net.calls[1]["t"] > net.calls[0]["t"]).all()  # student at sigma_(i+1) > sigma_i
    loss.backward()
    assert net.lin.weight.grad is not None and net.lin.weight.grad.abs().sum() > 0


def test_func_student_teacher_same_jittered_grid(monkeypatch):
    """One jittered grid per loss, used by the skip term and F in both branches."""
    grids, renders, original = [], [], common.pixel_grid
    monkeypatch.setattr(common, "pixel_grid", lambda *a, **k: grids.append(original(*a, **k)) or grids[-1])
    torch.manual_seed(0)
    net = common.FuncGenerator(3, 8, 2, 32, 1, 4, dropout=0.3).train()
    render = net.render
    monkeypatch.setattr(net, "render", lambda fns, size=None, coords=None: renders.append(coords) or render(fns, size, coords))
    consistency_func.ConsistencyTraining(100).loss(net, torch.randn(4, 3, 8, 8), k=0)
    assert len(grids) == 1 and grids[0].shape == (4, 8, 8, 2)
    assert len(renders) == 2 and all(c is grids[0] for c in renders)  # teacher and student
    base = original(8)
    assert 0 < (grids[0] - base).abs().max() <= 0.5 / 8 + 1e-7  # jitter clipped to 0.5/s
    # the skip term reads x at the same jittered coordinates: with F = 0 (c_out ~ 0 at
    # 5 sigma_min aside), f - c_out F = c_skip sample_at(x, grid)
    x, sigma = torch.randn(4, 3, 8, 8), torch.full((4,), 1.0)
    m = consistency_func.ConsistencyTraining(100)
    c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in m.scalings(sigma))
    f = m.denoise(net, x, sigma, coords=grids[0])
    F_ = net(c_in * x, 0.25 * sigma.log(), coords=grids[0])
    assert torch.allclose(f, c_skip * common.sample_at(x, grids[0]) + c_out * F_, atol=1e-6)
    net.eval()
    assert consistency_func.ConsistencyTraining.train_coords(net, x) is None  # no jitter at sampling


# the generator's variants (issue 31): Trans-INR weight tokens with or without the raw read of x and
# the local feature map; LIIF-style per-patch functions with or without the raw read
FUNC_VARIANTS = [dict(head="tokens", raw=True), dict(head="tokens", raw=False),
                 dict(head="tokens", raw=True, local=False), dict(head="patch", raw=False),
                 dict(head="patch", raw=True)]


@pytest.mark.parametrize("variant", FUNC_VARIANTS[::3], ids=["tokens", "patch"])
def test_func_renders_one_function_of_coordinates_at_nfe_1_and_2(variant):
    """Issue 12 item 2: the skip term and F are evaluated through one interpolant of x at the
    same coordinates, so the sample is one function of continuous coordinates. What holds:
    (a) exactly: the 3x render's centre subgrid [1::3] contains the native pixel centres and
    equals the native render (and the plain sampler) to float rounding; (b) average-pooling
    a 2x/4x render back differs from the native render by no more than average-pooling the
    bilinear interpolant of the native render does (+10%): pooling a bilinear interpolant is
    not the identity (at 2x it is 3/4 u_j + 1/8 (u_(j-1) + u_(j+1)) per axis), which is the
    only gap a single continuous function with bilinear local reads should leave. Measured
    ratios 0.92-0.99; a skip term on another interpolant or grid than F fails (a)."""
    torch.manual_seed(0)
    net = common.FuncGenerator(3, 16, 2, 32, 2, 4, **variant).eval()
    for p in net.parameters():  # leave the zero-init so that the output depends on the input
        if p.abs().sum() == 0:
            nn.init.normal_(p, std=0.05)
    m = consistency_func.ConsistencyTraining(10)
    for nfe in (1, 2):
        z = torch.randn(4, 3, 16, 16)
        torch.manual_seed(1)
        _, info = m.sample(net, z, nfe, sizes=(32, 48, 64))
        torch.manual_seed(1)
        plain, _ = m.sample(net, z, nfe)
        r, native = info["renders"], info["renders"][16]
        assert torch.allclose(plain, native, atol=1e-6)
        assert torch.allclose(r[48][..., 1::3, 1::3], native, atol=1e-5)
        for s in (32, 64):
            err = (F.avg_pool2d(r[s], s // 16) - native).abs().mean()
            ref = (F.avg_pool2d(common.sample_at(native, common.pixel_grid(s)), s // 16) - native).abs().mean()
            assert err <= 1.1 * ref, (nfe, s, err, ref)


class _FixedOutput(nn.Module):
    """F(x, t) = a fixed image, whatever the input (or 0)."""

    def __init__(self, image):
        super().__init__()
        self.image = image

    def forward(self, x, t, y=None):
        return self.image.expand_as(x)


def test_noise_correlation_hand_checked():
    """F = 0 leaves f = c_skip(80) 80 z: correlation exactly 1. F = a fixed image: the sample
    is c_skip(80) 80 z + c_out(80) image: the correlation by hand (centred cosine per sample,
    averaged) is chance level, |corr| < 0.05 with 256 pixels and 40 samples."""
    m, shape = consistency_func.ConsistencyTraining(1), (1, 16, 16)
    assert consistency_func.noise_correlation(_FixedOutput(torch.zeros(shape)), m, shape, n=6, batch=4) \
        == pytest.approx(1.0, abs=1e-5)
    image = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    corr = consistency_func.noise_correlation(_FixedOutput(image), m, shape, n=40, batch=16)
    z = torch.randn(40, *shape, generator=torch.Generator().manual_seed(0)).flatten(1)
    c_skip, c_out, _ = m.scalings(torch.tensor([80.0]))
    x = c_skip * 80 * z + c_out * image.flatten()
    a, b = x - x.mean(1, keepdim=True), z - z.mean(1, keepdim=True)
    by_hand = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean().item()
    assert corr == pytest.approx(by_hand, abs=1e-5) and abs(corr) < 0.05


def test_sampling_sigmas_two_step_is_icts():
    m = consistency_func.ConsistencyTraining(100)
    assert m.sampling_sigmas(1) == [80.0] and m.sampling_sigmas(2) == [80.0, 0.821]  # iCT
    assert consistency_func.ConsistencyTraining(100, two_step_sigma=1.5).sampling_sigmas(2) == [80.0, 1.5]
    assert m.sampling_sigmas(3) == pytest.approx(consistency_func.karras_sigmas(4).flip(0)[:3].tolist())


def test_ct_resume_with_more_steps_says_the_curriculum_jumps(tmp_path, capsys):
    run = ["--width", "16", "--batch-size", "32", "--device", "cpu", "--out-dir", str(tmp_path / "r")]
    consistency_func.main(["--steps", "4"] + run)
    consistency_func.main(["--steps", "8", "--resume"] + run)
    assert ("--steps 8, the checkpoint's run had 4: iCT's curriculum N(k) follows K = 8 from consistency "
            "step 4 on (N jumps there)") in capsys.readouterr().out


# ---- the INR generator -----------------------------------------------------------------

def test_pixel_grid_centres():
    g = common.pixel_grid(4)
    assert g[:, 0, 0].tolist() == pytest.approx([-0.75, -0.25, 0.25, 0.75])  # y = -1 + (2j+1)/s
    assert g[0, :, 1].tolist() == pytest.approx([-0.75, -0.25, 0.25, 0.75])  # x
    assert g[:, 2, 1].tolist() == pytest.approx([0.25] * 4)


@pytest.mark.parametrize("variant", FUNC_VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) or "default")
def test_inr_renders_consistently_across_resolutions(variant):
    torch.manual_seed(0)
    net = common.FuncGenerator(3, 16, 2, 32, 2, 4, max_freq=2.0, **variant).eval()  # a smooth function
    for p in net.parameters():  # leave the zero-init so that the output depends on the input
        if p.abs().sum() == 0:
            nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        fns = net.generate(x, torch.zeros(3))
        r1, r2, r3 = net.render(fns, 16), net.render(fns, 32), net.render(fns, 48)
        other = net.render(net.generate(torch.randn(3, 3, 16, 16), torch.zeros(3)), 16)
    assert torch.equal(r1, net(x, torch.zeros(3)))  # forward = render at the input size
    # one function of the coordinates: the 3x grid holds the 1x pixel centres (a half-pixel
    # shift of either grid fails this); pooled 2x/4x renders: see the NFE 1/2 sampling test
    assert torch.allclose(r3[..., 1::3, 1::3], r1, atol=1e-5)
    assert not torch.allclose(F.avg_pool2d(r2, 2), r1, atol=1e-3)  # 2x is a new evaluation
    assert (other - r1).abs().mean() / r1.std() > 0.1  # the function depends on the input


def test_patch_head_blends_the_nearest_patch_functions_by_hand():
    """--inr-head patch: at a patch centre v the function is that patch's own MLP(code_v,
    Fourier(0)); halfway between two horizontally adjacent centres it is the mean of their two
    MLPs, each read at its own offset (+-1/g in image units); a quarter of the way, 3/4 and
    1/4 (bilinear weights). Outside the outer centres the border patch's function continues."""
    torch.manual_seed(0)
    net = common.FuncGenerator(1, 8, 2, 32, 1, 4, head="patch", raw=False).eval()  # grid g = 4
    nn.init.normal_(net.mlp[-1].weight, std=0.3)
    with torch.no_grad():
        fns = net.generate(torch.randn(2, 1, 8, 8), torch.zeros(2))
        codes, g = fns["codes"], 4

        def own(i, j, offset):  # patch (i, j)'s function at offset (dy, dx) from its centre, image units
            h = torch.cat([codes[:, :, i, j], net._fourier(torch.tensor(offset).view(1, 1, 1, 2)).view(1, -1)
                           .expand(2, -1)], dim=1)
            for k, layer in enumerate(net.mlp):
                h = layer(h) if k == len(net.mlp) - 1 else F.relu(layer(h))
            return h[:, 0]

        centre = lambda i: -1 + (2 * i + 1) / g  # noqa: E731  patch centres in image units
        at = lambda y, x: net.render(fns, coords=torch.tensor([[[y, x]]]))[:, 0, 0, 0]  # noqa: E731
        y1, x1, x2 = centre(1), centre(2), centre(3)
        assert torch.allclose(at(y1, x1), own(1, 2, [0.0, 0.0]), atol=1e-6)
        mid = (x1 + x2) / 2
        assert torch.allclose(at(y1, mid), (own(1, 2, [0, 0.25]) + own(1, 3, [0, -0.25])) / 2, atol=1e-6)
        q = x1 + 0.125
        assert torch.allclose(at(y1, q), 0.75 * own(1, 2, [0, 0.125]) + 0.25 * own(1, 3, [0, -0.375]), atol=1e-6)
        assert torch.allclose(at(y1, 0.95), own(1, 3, [0, 0.95 - x2]), atol=1e-6)  # past the last centre


def test_tokens_generator_is_the_one_earlier_checkpoints_hold():
    """Adding the variants (--inr-head, --raw-read, --local-read) kept the generator of the
    checkpoints written before them (head tokens, raw read on) as it was: the same module names
    and input order [Fourier, feature map, x], so such a checkpoint loads and renders the same.
    The numbers are the output of the generator at commit 0e24519 for this seed and input."""
    torch.manual_seed(0)
    net = common.FuncGenerator(1, 8, 2, 16, 1, 4, inr_width=8, head="tokens", raw=True).eval()
    assert {"local.weight", "tokens", "base.0", "post.0.1.weight"} <= set(net.state_dict())
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x, torch.full((2,), 0.3))
    assert y.flatten()[:4].tolist() == pytest.approx([0.71895, 1.37503, 1.21816, 0.60047], abs=1e-4)
    assert y.abs().sum().item() == pytest.approx(101.0957, abs=1e-3)


def test_generator_bad_input():
    net = common.FuncGenerator(3, 8, 2, 32, 1, 4)
    with pytest.raises(common.UserError, match="render other sizes"):
        net(torch.randn(1, 3, 16, 16), torch.zeros(1))
    with pytest.raises(common.UserError, match="inr-width"):
        common.FuncGenerator(3, 8, 2, 32, 1, 4, inr_width=30, groups=4, head="tokens")
    common.FuncGenerator(3, 8, 2, 32, 1, 4, inr_width=30, groups=4)  # the patch head has no tokens
    with pytest.raises(common.UserError, match=r"--inr-depth must be >= 2$"):  # no word of groups
        common.FuncGenerator(3, 8, 2, 32, 1, 4, inr_depth=1)


# ---- training: pre-training, resume, 2-D ---------------------------------------------------

def _image_folder(path, n=8, size=16):
    rng = np.random.default_rng(0)
    path.mkdir()
    yy, xx = np.mgrid[0:size, 0:size] / size
    for k in range(n):
        a = rng.uniform(0, 1, (3, 3))
        img = np.stack([a[c, 0] + a[c, 1] * xx + a[c, 2] * yy for c in range(3)], -1)
        Image.fromarray((np.clip(img / 2, 0, 1) * 255).astype(np.uint8)).save(path / f"{k}.png")
    return str(path)


def _args(folder, out, *extra):
    train = ["--workers", "0", "--lr", "2e-3", "--sample-every", "0", "--log-every", "10"]  # training's alone
    return ["--dataset", "folder", "--data-dir", folder, "--preset", "tiny", "--arch", "func",
            "--width", "32", "--depth", "2", "--batch-size", "8", *(train if training(extra) else []),
            "--out-dir", str(out), *extra]


def _folder_images(folder):
    args = common.finish_args(common.add_common_args(argparse.ArgumentParser()).parse_args(
        ["--dataset", "folder", "--data-dir", folder, "--preset", "tiny"]))
    data = common.load_data(args)
    return torch.stack([data.dataset[i][0] for i in range(len(data))])


def _trained_func(state, **variant):
    net = common.FuncGenerator(3, 16, 2, 32, 2, 4, **variant).eval()
    net.load_state_dict(state)
    return net


def _noise_kept(net, x, sigma=0.1, draws=8):
    """<f(x + sigma z, sigma) - x, sigma z> / ||sigma z||^2: the fraction of the input noise
    left in the output (a network that ignores the noise keeps exactly c_skip(sigma))."""
    m, torch_gen = consistency_func.ConsistencyTraining(1), torch.Generator().manual_seed(0)
    num = den = 0.0
    with torch.no_grad():
        for _ in range(draws):
            n = sigma * torch.randn(x.shape, generator=torch_gen)
            out = m.denoise(net, x + n, torch.full((x.shape[0],), sigma))
            num, den = num + ((out - x) * n).sum().item(), den + n.pow(2).sum().item()
    return num / den


def test_warm_start_learns_to_remove_noise_and_resumes_exactly(tmp_path):
    """Issue 12 items 3-4: the denoising warm start (--pretrain denoise) beats the
    per-pixel-mean floor, and the trained generator keeps clearly less than c_skip(0.1) =
    0.963 of the input noise at sigma 0.1 (measured 0.88 after 80 steps; the
    Fourier-features-only generator kept 0.961). Denoise MSE at sigma 0.5 measured 0.044 vs the
    per-pixel-mean floor 0.084. Run with the Trans-INR generator and its raw read (--inr-head tokens --raw-read), which learns
    this 8-image folder in 80 steps; today's default (patch head, no raw read) does not yet: MSE
    0.079 after 80 steps, 0.076 after 160, noise kept 0.964 (its denoiser needs the digits
    budget, README), so the mechanism is tested on the generator that shows it."""
    old = ["--inr-head", "tokens", "--raw-read"]
    folder = _image_folder(tmp_path / "imgs")
    x, m = _folder_images(folder), consistency_func.ConsistencyTraining(1)
    floor = (x - x.mean(0)).pow(2).mean().item()
    consistency_func.main(_args(folder, tmp_path / "init", "--steps", "0", "--pretrain-epochs", "0", *old))
    init = _trained_func(common.load_checkpoint(str(tmp_path / "init/ckpt.pt"))["state"]["net"],
                         head="tokens", raw=True)
    # A: 80 warm-start steps (8 images, batch 8 -> 1 step per epoch), then 3 iCT steps
    warm = ["--pretrain", "denoise", "--pretrain-epochs", "80", "--lr", "5e-3", *old]
    consistency_func.main(_args(folder, tmp_path / "a", "--steps", "3", *warm))
    # B: the same run stopped at the phase boundary, then resumed
    consistency_func.main(_args(folder, tmp_path / "b", "--steps", "0", *warm))
    pre = common.load_checkpoint(str(tmp_path / "b/ckpt.pt"))
    net = _trained_func(pre["state"]["net"], head="tokens", raw=True)
    before, after = consistency_func.denoise_mse(init, x, m), consistency_func.denoise_mse(net, x, m)
    assert pre["step"] == 80 and after < 0.6 * min(before, floor), (before, after, floor)
    c_skip = m.scalings(torch.tensor([0.1]))[0].item()
    kept_init, kept = _noise_kept(init, x), _noise_kept(net, x)
    assert abs(kept_init - c_skip) < 0.02, (kept_init, c_skip)  # untrained: F ignores the noise
    assert kept < c_skip - 0.05, (kept, c_skip)  # 0.88 measured (0.83 with the draw order before issue 21)
    consistency_func.main(_args(folder, tmp_path / "b", "--steps", "3", *warm, "--resume"))
    assert any(l.rstrip().endswith("; done: resumed at consistency step 0 of 3") for l in open(tmp_path / "b/log.txt"))
    a, b = (common.load_checkpoint(str(tmp_path / f"{r}/ckpt.pt")) for r in "ab")
    assert a["step"] == b["step"] == 83
    for key in ("net", "ema"):
        for name, v in a["state"][key].items():
            assert torch.equal(v, b["state"][key][name]), (key, name)
    # any-resolution sampling from the same functions, and a figure
    consistency_func.main(_args(folder, tmp_path / "a", "--mode", "sample", "--n", "4", "--nfe", "1",
                  "--sample-res", "8,16,32"))
    out = np.load(tmp_path / "a/samples/res32.npz")["samples"]
    assert out.shape == (4, 32, 32, 3)
    assert (tmp_path / "a/samples/render4x_vs_bilinear.png").exists()


def test_func_checkpoint_from_before_the_head_flags_samples_and_refuses_a_silent_resume(tmp_path):
    """A --arch func checkpoint written before --inr-head/--raw-read/--local-read existed (its
    config lacks them) holds the Trans-INR generator with the raw read: sampling it builds that
    generator, not today's default, and gives the samples it gave with the flags named; --resume
    without them is refused with the flags to pass."""
    folder = _image_folder(tmp_path / "imgs")
    old = ["--inr-head", "tokens", "--raw-read"]
    consistency_func.main(_args(folder, tmp_path / "a", "--steps", "2", "--pretrain-epochs", "0", *old))
    sample = ["--mode", "sample", "--n", "4", "--nfe", "1", "--seed", "3"]
    consistency_func.main(["--ckpt", str(tmp_path / "a/ckpt.pt"), *sample])
    named = np.load(tmp_path / "a/samples/nfe1.npz")["samples"]
    ckpt = common.load_checkpoint(str(tmp_path / "a/ckpt.pt"))
    for key in ("inr_head", "raw_read", "local_read"):
        del ckpt["config"][key]
    common.save_atomic(ckpt, str(tmp_path / "a/ckpt.pt"))
    consistency_func.main(["--ckpt", str(tmp_path / "a/ckpt.pt"), *sample])
    assert np.array_equal(np.load(tmp_path / "a/samples/nfe1.npz")["samples"], named)
    with pytest.raises(common.UserError, match="--inr-head tokens"):
        consistency_func.main(_args(folder, tmp_path / "a", "--steps", "3", "--pretrain-epochs", "0", "--resume"))
    consistency_func.main(_args(folder, tmp_path / "a", "--steps", "3", "--pretrain-epochs", "0", "--resume", *old))
    assert common.load_checkpoint(str(tmp_path / "a/ckpt.pt"))["step"] == 3


def test_recon_pretraining_learns_to_reconstruct_images(tmp_path):
    """--pretrain recon (the CM-Func paper's pre-training): image -> function -> render beats
    the per-pixel-mean floor after 80 steps (measured 0.017 vs floor 0.084, untrained 0.13; the
    Trans-INR generator with its raw read: 0.0032 and 0.23),
    on the pixel grid (eval mode, EMA)."""
    folder = _image_folder(tmp_path / "imgs")
    x, m = _folder_images(folder), consistency_func.ConsistencyTraining(1)
    floor = (x - x.mean(0)).pow(2).mean().item()
    consistency_func.main(_args(folder, tmp_path / "init", "--steps", "0", "--pretrain-epochs", "0"))
    consistency_func.main(_args(folder, tmp_path / "r", "--steps", "0", "--pretrain", "recon",
                                "--pretrain-epochs", "80", "--lr", "5e-3"))
    with torch.no_grad():
        before, after = (consistency_func.pretrain_loss(_trained_func(common.load_checkpoint(
            str(tmp_path / f"{r}/ckpt.pt"))["state"]["ema"]), x, m, "recon")[0].item() for r in ("init", "r"))
    assert after < 0.5 * floor < before, (before, after, floor)


def test_edm_sampler_solves_the_gaussian_probability_flow():
    """--sampler edm against a field with a known solution: for data N(mu, s^2) the exact
    denoiser is mu + s^2 / (s^2 + sigma^2) (x - mu) and the probability-flow ODE carries x at
    smax to mu + sqrt(s^2 + sigma^2) / sqrt(s^2 + smax^2) (x - mu). Euler converges at first
    order: measured max error 0.113 (NFE 50) and 0.0145 (NFE 400), starting from |x| up to 250."""
    mu, s, smin, smax = 0.3, 0.5, consistency_func.SIGMA_MIN, consistency_func.SIGMA_MAX

    class Exact(consistency_func.ConsistencyTraining):
        def denoise(self, net, x, sigma, y=None, coords=None):
            return mu + s ** 2 / (s ** 2 + sigma.view(-1, 1) ** 2) * (x - mu)
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    exact = mu + math.sqrt(s ** 2 + smin ** 2) / math.sqrt(s ** 2 + smax ** 2) * (smax * z - mu)
    err = {n: (Exact(1).sample_ode(None, z, n)[0] - exact).abs().max().item() for n in (50, 400)}
    assert err[400] < 0.03 and err[400] < err[50] / 6, err  # ~ 8x: first order
    assert Exact(1).sample_ode(None, z, 7)[1]["nfe"] == 7


def test_ct_2d_one_step_quality_after_the_readme_toy_run(tmp_path, capsys):
    """Issue 21 item 3, the 2-D regression: the toy trained unclipped at lr 1e-3, where the
    outcome is chaotic (any change in the float path moved it; on moons, seeds 0-2, one-step
    sliced W2 0.63 / 0.51 / 0.51 unclipped, 0.25 / 0.35 / 0.33 with the toy preset's gradient
    clip at norm 1, Intel Xeon; an AMD EPYC gave 1.14 / 0.41 / 0.68 and 0.30 / 0.30 / 0.20). The
    README's toy run (3000 steps, seed 0), on moons, must stay below 0.4 at NFE 1 (the unclipped
    code gives 0.63 and 1.14 on those machines; the data floor is about 0.03)."""
    out = str(tmp_path / "ct")
    consistency_func.main(["--dataset", "moons", "--device", "cpu", "--out-dir", out, "--log-every", "3000"])
    capsys.readouterr()
    consistency_func.main(["--mode", "eval", "--ckpt", os.path.join(out, "ckpt.pt"), "--nfe", "1"])
    sw2 = float(re.search(r"sw2=([0-9.]+)", capsys.readouterr().out).group(1))
    assert sw2 < 0.4, sw2


def test_fixed_grid_arch_refuses_other_resolutions(tmp_path):
    folder = _image_folder(tmp_path / "imgs", n=2)
    with pytest.raises(common.UserError, match="needs --arch func"):
        consistency_func.main(_args(folder, tmp_path / "u", "--arch", "unet", "--mode", "sample",
                      "--sample-res", "16,32"))
    with pytest.raises(common.UserError, match="sample-res"):
        consistency_func.main(_args(folder, tmp_path / "u", "--mode", "sample", "--sample-res", "a,b"))


def test_toy_one_step_samples_approach_the_data(tmp_path):
    common_args = ["--dataset", "8gaussians", "--width", "64", "--batch-size", "256",
                   "--ema-decay", "0.95", "--log-every", "100", "--out-dir", str(tmp_path)]
    consistency_func.main(common_args + ["--steps", "0"])
    torch.manual_seed(0)
    args = common.finish_args(common.add_common_args(argparse.ArgumentParser()).parse_args(
        ["--dataset", "8gaussians", "--width", "64"]))
    data = common.load_data(args)
    ref = data.fresh(2000)

    def sw2():
        net = common.MLP(2, 64, 3)
        common.load_weights(net, str(tmp_path / "ckpt.pt"))
        torch.manual_seed(0)
        x, info = consistency_func.ConsistencyTraining(1, data.x.std().item()).sample(net.eval(), torch.randn(2000, 2), 1)
        assert info["nfe"] == 1
        return common.toy_metrics(x, ref)["sw2"]
    before = sw2()
    consistency_func.main(common_args + ["--steps", "600", "--overwrite"])
    after = sw2()
    assert after < 0.65 * before, (before, after)  # 2.14 -> 0.95 here


#################################################################################
#                                  scoreflow.py                                 #
#################################################################################


SF_READ = ["--width", "64", "--depth", "2", "--batch-size", "256", "--fid-n", "300"]  # a SF_TINY checkpoint's eval
SF_TINY = ["--width", "64", "--depth", "2", "--batch-size", "256", "--lr", "3e-3", "--ema-decay", "0.9",
        "--fid-n", "300", "--n", "16", "--nfe", "1", "--log-every", "1000"]


def sf_log_lines(out_dir, prefix):
    with open(os.path.join(out_dir, "log.txt")) as f:
        return [line for line in f if line.startswith(prefix)]


@pytest.fixture(scope="module")
def cond_toy(tmp_path_factory):
    """A class-conditional 8-Gaussians ScoreFlow trained for 300 steps (a few seconds)."""
    out = str(tmp_path_factory.mktemp("sf") / "cond")
    scoreflow.main(SF_TINY + ["--steps", "300", "--out-dir", out])
    return out


# ---- losses ------------------------------------------------------------------------

@pytest.mark.parametrize("lam", ["inv_t", "one", "inv_t2"])
def test_path_constrained_term_is_weighted_rf(lam):
    torch.manual_seed(0)
    net = common.MLP(2, 32, 2)
    x1, x0 = torch.randn(64, 2), torch.randn(64, 2)
    t = 0.05 + 0.9 * torch.rand(64)
    with torch.no_grad():
        _, logs = scoreflow.ScoreFlow(beta=1.0, pc_lambda=lam).loss(net, x1, x0, t=t)
        total1, _ = scoreflow.ScoreFlow(beta=2.0, pc_lambda=lam).loss(net, x1, x0, t=t)
        total0, _ = scoreflow.ScoreFlow(beta=0.0, pc_lambda=lam).loss(net, x1, x0, t=t)
        x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
        v = net(x_t, t)
    weight = {"inv_t": 1 / t, "one": torch.ones_like(t), "inv_t2": t ** -2}[lam] * t ** 2
    expected = (weight * (v - (x1 - x0)).pow(2).mean(1)).mean()  # lambda(t) t^2 ||v - (x1 - x0)||^2
    assert torch.allclose(logs["l_pc"], expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(total1 - total0, 2 * expected, rtol=1e-4, atol=1e-6)
    if lam == "inv_t":  # the paper's lambda = 1/t gives the weight t
        assert torch.allclose(expected, (t * (v - (x1 - x0)).pow(2).mean(1)).mean(), rtol=1e-5)


def test_beta_zero_is_exactly_rectified_flow():
    net = common.MLP(2, 32, 2)
    x1 = torch.randn(128, 2)
    torch.manual_seed(3)
    loss, logs = scoreflow.ScoreFlow(beta=0.0).loss(net, x1)
    torch.manual_seed(3)  # hand-written 1-RF loss with the same draws
    x0 = torch.randn_like(x1)
    t = 1e-3 + (1 - 1e-3) * torch.rand(128)
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    rf = ((net(x_t, t) - (x1 - x0)) ** 2).mean(1).mean()  # Eq. 18's order: per sample, then the batch
    assert torch.equal(loss, rf) and "l_pc" not in logs
    torch.manual_seed(3)
    assert scoreflow.ScoreFlow(beta=1.0).loss(net, x1)[0] > rf  # beta > 0 adds a positive term


# ---- class conditioning ------------------------------------------------------------

def test_label_dropout_rate():
    torch.manual_seed(0)
    y = torch.randint(0, 8, (200_000,))
    out = scoreflow.drop_labels(y, 0.1, 8)
    dropped = out == 8
    assert abs(dropped.float().mean().item() - 0.1) < 0.003  # ~5 binomial sigmas
    assert torch.equal(out[~dropped], y[~dropped])
    assert torch.equal(scoreflow.drop_labels(y, 0.0, 8), y)


def test_loss_uses_label_dropout():
    net = common.MLP(2, 32, 2, num_classes=3)
    torch.nn.init.normal_(net.cond.label.weight)
    x1, y = torch.randn(64, 2), torch.randint(0, 3, (64,))
    losses = []
    for p, labels in ((1 - 1e-9, y), (0.0, None), (0.0, y)):
        torch.manual_seed(5)
        losses.append(scoreflow.ScoreFlow(p_uncond=p, num_classes=3).loss(net, x1, y=labels)[0])
    assert torch.allclose(losses[0], losses[1])  # all labels dropped = the null class
    assert not torch.allclose(losses[0], losses[2])


def test_cfg_formula():
    torch.manual_seed(0)
    net = common.MLP(2, 32, 2, num_classes=4)
    torch.nn.init.normal_(net.cond.label.weight)
    method = scoreflow.ScoreFlow(num_classes=4)
    x, t, y = torch.randn(16, 2), torch.rand(16), torch.randint(0, 4, (16,))
    with torch.no_grad():
        v_c, v_u = net(x, t, y), net(x, t, None)
        assert not torch.allclose(v_c, v_u)
        assert torch.allclose(method.field(net, y, 1.0)(x, t), v_c, atol=1e-6)
        assert torch.allclose(method.field(net, y, 0.0)(x, t), v_u, atol=1e-6)
        assert torch.allclose(method.field(net, y, 2.5)(x, t), v_u + 2.5 * (v_c - v_u), atol=1e-5)
    assert method.field(net, y, 2.5).cost == 2 and method.field(net, y, 1.0).cost == 1


# ---- likelihood -----------------------------------------------------------------------

@pytest.mark.parametrize("div", ["hutchinson", "exact"])
def test_likelihood_standard_normal_under_zero_field(div):
    x = torch.randn(32, 2) * 2
    log_p, _ = scoreflow.ScoreFlow().log_likelihood(lambda x, t: 0 * x, x, "rk45", div)
    analytic = -0.5 * x.pow(2).sum(1) - math.log(2 * math.pi)
    assert torch.allclose(log_p, analytic, atol=1e-6)


@pytest.mark.parametrize("div", ["hutchinson", "exact"])
def test_likelihood_linear_field(div):
    """v = a x: x1 = e^a x0, so log p_1(x1) = log N(e^-a x1) - a D (checks signs and direction)."""
    a, x = 0.7, torch.randn(32, 3)
    for nfe in ("rk45", 400):
        log_p, _ = scoreflow.ScoreFlow().log_likelihood(lambda x, t: a * x, x, nfe, div)
        x0 = x * math.exp(-a)
        analytic = -0.5 * x0.pow(2).sum(1) - 1.5 * math.log(2 * math.pi) - 3 * a
        assert torch.allclose(log_p, analytic, atol=1e-4 if nfe == "rk45" else 1e-2)


def test_likelihood_probes_are_independent_hutchinson_estimates():
    """v = A x with tr A = 0.2 and A12 + A21 = 0.5: one probe's divergence is eps^T A eps =
    0.2 +- 0.5 along the whole path, so each probe's log p is the exact one -+ 0.5 and their
    mean tends to it (sd of the mean over 400 probes: 0.025)."""
    A, x = torch.tensor([[0.3, 1.0], [-0.5, -0.1]]), torch.randn(16, 2)
    exact, _ = scoreflow.ScoreFlow().log_likelihood(lambda x, t: x @ A.T, x, "rk45", "exact")
    log_p, _ = scoreflow.ScoreFlow().log_likelihood(lambda x, t: x @ A.T, x, "rk45", probes=400,
                                                    generator=torch.Generator().manual_seed(0))
    assert exact.shape == (1, 16) and log_p.shape == (400, 16)
    assert torch.allclose((log_p - exact).abs(), torch.full_like(log_p, 0.5), atol=1e-4)
    assert (log_p.mean(0) - exact[0]).abs().max() < 0.1 and log_p[:, 0].std() > 0.4


def test_bits_per_dim_formula():
    dim = 12
    uniform = torch.tensor([-dim * math.log(2.0)])  # uniform on [-1, 1]^D: 8 bits per dim
    assert torch.allclose(scoreflow.bits_per_dim(uniform, dim), torch.tensor([8.0]))
    k = torch.randint(0, 256, (1000,)).float()
    x = 2 * k / 255 - 1  # what the data pipeline gives
    assert torch.equal(((scoreflow.dequantize(x) + 1) * 128).floor(), k)


# ---- training, reversibility, translation ----------------------------------------------

def test_training_learns(cond_toy):
    args = scoreflow.parse(SF_TINY + ["--out-dir", cond_toy])
    run = common.Run(args)
    data = common.load_data(args)
    trained, classes, _ = scoreflow.load_model(args, run, args.ckpt, data.shape)
    method = scoreflow.ScoreFlow(num_classes=classes)
    untrained = common.build_net(args, data.shape, num_classes=8)
    ref = data.fresh(500)
    torch.manual_seed(0)
    sw = [common.sliced_wasserstein(common.sampler(method.sample, net, data, run)(500, 8)[0], ref)
          for net in (untrained, trained)]
    assert sw[1] < 0.5 * sw[0], sw


def test_translate_cycle_rk45_near_zero(cond_toy):
    m = scoreflow.main(SF_READ + ["--mode", "translate", "--out-dir", cond_toy, "--src-class", "0",
                               "--tgt-class", "4", "--nfe", "2,rk45"])
    # four adaptive solves (rtol = atol = 1e-5) through a flow that contracts onto its classes:
    # 0.0018 on an AVX-512 machine, below 1e-3 on others; Euler 2 is ~0.3
    assert m["cycle_rmse"] < 5e-3
    lines = sf_log_lines(cond_toy, "translate class nfe=")
    euler2 = float(re.search(r"cycle_rmse=(\S+)", lines[0]).group(1))
    assert euler2 > 30 * m["cycle_rmse"]  # Euler with 2 steps is not reversible
    assert m["sw2_to_target"] < m["sw2_source_to_target"]  # moved towards class 4
    assert os.path.isfile(os.path.join(cond_toy, "translate_class_two-pass.png"))
    d = scoreflow.main(SF_READ + ["--mode", "translate", "--out-dir", cond_toy, "--src-class", "0",
                               "--tgt-class", "4", "--nfe", "4", "--translate", "difference"])
    assert set(d) == set(m)


def test_eval_reconstruction_and_bpd(cond_toy):
    scoreflow.main(SF_READ + ["--mode", "eval", "--out-dir", cond_toy, "--nfe", "2,rk45", "--bpd",
                           "--cfg", "2"])
    rec = {re.search(r"nfe=(\S+):", s).group(1): float(re.search(r"rmse=(\S+)", s).group(1))
           for s in sf_log_lines(cond_toy, "reconstruction")}
    assert rec["rk45"] < 1e-2 and rec["rk45"] < rec["2"] / 50
    nll = float(re.search(r"NLL (\S+) nats", sf_log_lines(cond_toy, "likelihood")[-1]).group(1))
    assert ", fp32): NLL" in sf_log_lines(cond_toy, "likelihood")[-1]  # precision with the number
    # log p(x | y): one Gaussian of std 0.3 in 2-D has entropy 1 + ln(2 pi 0.09) = 0.430 nats
    assert abs(nll - (1 + math.log(2 * math.pi * 0.09))) < 0.3
    assert sf_log_lines(cond_toy, "eval nfe=2: per-class sw2=") and sf_log_lines(cond_toy, "straightness S =")


def test_unconditional_beta_0_is_asfm_rf_bit_for_bit(tmp_path):
    """Issue 32, item 2: `scoreflow.py --beta 0 --no-class-cond` and `asfm.py --stage rf` are one
    1-RF: the same flags and seed train the same weights, bit for bit (on digits too: README)."""
    flags = SF_TINY + ["--dataset", "8gaussians", "--steps", "30", "--device", "cpu"]
    scoreflow.main(flags + ["--beta", "0", "--no-class-cond", "--out-dir", str(tmp_path / "sf")])
    asfm.main(flags + ["--stage", "rf", "--out-dir", str(tmp_path / "rf")])
    scoreflow.main(flags + ["--no-class-cond", "--out-dir", str(tmp_path / "pc")])  # beta = 1
    sf, rf, pc = (common.load_checkpoint(str(tmp_path / d / "ckpt.pt"))["state"] for d in ("sf", "rf", "pc"))
    for key in ("net", "ema"):
        assert sf[key].keys() == rf[key].keys()
        assert all(torch.equal(sf[key][k], rf[key][k]) for k in sf[key])
    assert not all(torch.equal(sf["net"][k], pc["net"][k]) for k in sf["net"])  # L_pc changes the steps


def test_eval_scores_the_same_samples_for_an_nfe_whatever_else_is_listed(cond_toy):
    """--mode eval re-seeds per NFE (issue 32): `--nfe rk45` alone and after `1,2` score the same
    RK45 samples (distance and class fidelity), and the straightness after them is the same.
    Before, each NFE drew its noise after the previous one's (2-RF's digits RK45: 54.7 vs 41.8)."""
    def scores(nfe):
        res = scoreflow.main(SF_READ + ["--mode", "eval", "--out-dir", cond_toy, "--nfe", nfe])
        per_class = sf_log_lines(cond_toy, "eval nfe=rk45: per-class sw2=")[-1].split("sw2=")[1]
        return res["rk45"], per_class, sf_log_lines(cond_toy, "straightness S =")[-1]
    alone, after = scores("rk45"), scores("1,2,rk45")
    assert alone[0]["sw2"] == after[0]["sw2"] and alone[0]["energy"] == after[0]["energy"]
    assert alone[1:] == after[1:]


def test_domain_flow_resume_is_exact(tmp_path):
    flags = SF_TINY + ["--source", "tri-src", "--dataset", "tri-tgt", "--ckpt-every", "20"]
    scoreflow.main(flags + ["--steps", "40", "--out-dir", str(tmp_path / "a")])
    scoreflow.main(flags + ["--steps", "20", "--out-dir", str(tmp_path / "b")])
    scoreflow.main(flags + ["--steps", "40", "--out-dir", str(tmp_path / "b"), "--resume"])
    a, b = (common.load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in "ab")
    for key in ("net", "ema"):
        for name, p in a["state"][key].items():
            assert torch.equal(p, b["state"][key][name]), name
    assert a["config"]["cond_classes"] == 0 and a["config"]["source"] == "tri-src"
    m = scoreflow.main(SF_READ + ["--mode", "translate", "--out-dir", str(tmp_path / "a"),
                               "--dataset", "tri-tgt", "--nfe", "rk45"])
    assert m["cycle_rmse"] < 2e-2 and m["l2_to_source"] > 4  # A is 6 units left of B


def test_two_model_translation(tmp_path):
    for name in ("tri-src", "tri-tgt"):
        scoreflow.main(SF_TINY + ["--steps", "150", "--dataset", name, "--out-dir", str(tmp_path / name)])
    m = scoreflow.main(SF_READ + ["--mode", "translate", "--source", "tri-src", "--dataset", "tri-tgt",
                               "--ckpt", str(tmp_path / "tri-src/ckpt.pt"), "--ckpt-b",
                               str(tmp_path / "tri-tgt/ckpt.pt"), "--nfe", "rk45",
                               "--out-dir", str(tmp_path / "t")])
    assert m["cycle_rmse"] < 2e-2 and m["sw2_to_target"] < 0.5 * m["sw2_source_to_target"]


def test_bad_input_errors(cond_toy, tmp_path):
    with pytest.raises(common.UserError, match="out of range"):
        scoreflow.main(SF_READ + ["--mode", "translate", "--out-dir", cond_toy, "--src-class", "9",
                               "--tgt-class", "1"])
    with pytest.raises(common.UserError, match="--beta"):
        scoreflow.main(SF_TINY + ["--beta", "-1", "--out-dir", str(tmp_path)])
    with pytest.raises(common.UserError, match="--src-class a --tgt-class b"):
        scoreflow.main(SF_READ + ["--mode", "translate", "--out-dir", cond_toy])
    np.save(tmp_path / "x.npy", np.random.randn(600, 2).astype("float32"))
    with pytest.raises(common.UserError, match="no class labels"):
        scoreflow.main(SF_TINY + ["--dataset", "points", "--data-dir", str(tmp_path / "x.npy"),
                               "--class-cond", "--out-dir", str(tmp_path)])


def test_images_class_translation_and_bpd(tmp_path):
    """Tiny class-folder images: train a few steps, translate class 0 -> 1 (FID with random
    Inception weights: plumbing only), bits/dim."""
    g = torch.Generator().manual_seed(0)
    for c in range(2):
        os.makedirs(tmp_path / "img" / f"c{c}")
        for i in range(6):
            px = (torch.rand(8, 8, 3, generator=g) * 80 + (150 if c else 0)).byte().numpy()
            Image.fromarray(px).save(tmp_path / "img" / f"c{c}" / f"{i}.png")
    flags = ["--dataset", "folder", "--data-dir", str(tmp_path / "img"), "--image-size", "8",
             "--width", "16", "--batch-size", "4", "--nfe", "2", "--fid-n", "6", "--inception-weights", "random",
             "--out-dir", str(tmp_path / "run")]
    scoreflow.main(flags + ["--steps", "10", "--sample-every", "0", "--ema-decay", "0",
                            "--lr", "3e-3", "--warmup", "0", "--workers", "0"])
    m = scoreflow.main(flags + ["--mode", "translate", "--src-class", "0", "--tgt-class", "1"])
    assert math.isfinite(m["fid_to_target"]) and 0 < m["psnr_to_source"] < 100
    assert m["l2_to_source"] > 0 and os.path.isfile(tmp_path / "run" / "translate_class_two-pass.png")
    args = scoreflow.parse(flags + ["--n", "4"])  # --bpd without --mode eval's FID (slow on CPU)
    run, data = common.Run(args), common.load_data(args)
    net, classes, _ = scoreflow.load_model(args, run, args.ckpt, data.shape)
    scoreflow.likelihood(args, run, data, net, scoreflow.ScoreFlow(num_classes=classes))
    bpd = float(re.search(r"(\S+) bits/dim", sf_log_lines(str(tmp_path / "run"), "likelihood")[-1]).group(1))
    assert 3 < bpd < 20
    args = scoreflow.parse(flags + ["--n", "4", "--mode", "eval", "--bpd", "--probes", "3"])
    for _ in range(2):  # the dequantization and probes come from --seed, not from the stream
        scoreflow.likelihood(args, run, data, net, scoreflow.ScoreFlow(num_classes=classes))
        torch.randn(5)
    lines = sf_log_lines(str(tmp_path / "run"), "likelihood")[-2:]
    assert lines[0] == lines[1] and re.search(r"\S+ \(sd over 3 probes \S+\) bits/dim", lines[0])


def test_scoreflow_under_torchrun_two_gloo_ranks(tmp_path):
    out = tmp_path / "ddp"
    torchrun("scoreflow.py", ["--source", "tri-src", "--dataset", "tri-tgt", "--steps", "4",
                              "--batch-size", "64", "--width", "32", "--device", "cpu",
                              "--out-dir", str(out)], tmp_path)
    assert common.load_checkpoint(str(out / "ckpt.pt"))["step"] == 4

#################################################################################
#                                    toy2d.py                                   #
#################################################################################

def test_toy2d_end_to_end_and_deterministic(tmp_path):
    res = toy2d.main(["--steps", "20", "--out", str(tmp_path / "a")])
    assert {m for _, m in res} == set(toy2d.METHODS)
    assert len(res) == len(toy2d.METHODS) + len(toy2d.FLOWS)  # (b) runs the flows only
    assert os.path.getsize(tmp_path / "a" / "toy2d.png") > 10_000
    md = (tmp_path / "a" / "toy2d.md").read_text()
    assert md.count("\n| ") == len(res) + 1 and "python toy2d.py --steps 20" in md
    for (setup, method), r in res.items():
        assert all(math.isfinite(r["row"][f"nfe{k}"]) for k in toy2d.NFES)
        assert (r["row"]["S"] is None) == (method not in toy2d.FLOWS)
    again = toy2d.main(["--steps", "20", "--methods", "rf,if,ct", "--setups", "a", "--out", str(tmp_path / "b")])
    for key, r in again.items():
        assert r["row"] == res[key]["row"]  # same seed, same numbers


def test_toy2d_user_points_and_bad_method(tmp_path):
    np.save(tmp_path / "pts.npy", np.random.default_rng(0).normal(size=(600, 2)).astype(np.float32))
    res = toy2d.main(["--steps", "10", "--methods", "rf", "--setups", "a", "--data", str(tmp_path / "pts.npy"),
                      "--out", str(tmp_path / "o")])
    assert list(res) == [("noise->pts.npy", "rf")]
    with pytest.raises(common.UserError, match="unknown method 'dm'"):
        toy2d.main(["--methods", "rf,dm"])


def test_2d_runs_never_import_torchvision(tmp_path):
    # torchvision is for images and FID only: every 2-D run (the four scripts, toy2d) starts
    # without paying for its import (issue 22: 7.5 s vs 14.8 s to import on a loaded machine)
    code = f"""
import sys
import asfm, consistency_func, integration_flow, scoreflow, toy2d
small = ['--steps', '3', '--batch-size', '16', '--fid-n', '100']
asfm.main(['--stage', 'rf', '--out-dir', r'{tmp_path}/rf'] + small)
asfm.main(['--stage', 'asfm', '--init', r'{tmp_path}/rf/ckpt.pt', '--out-dir', r'{tmp_path}/asfm'] + small)
integration_flow.main(['--n-conv', '50', '--out-dir', r'{tmp_path}/if'] + small)
for m in (consistency_func, scoreflow):
    m.main(['--out-dir', r'{tmp_path}/' + m.__name__] + small)
toy2d.main(['--steps', '10', '--methods', 'rf', '--setups', 'a', '--out', r'{tmp_path}/toy'])
print('torchvision' in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


#################################################################################
#         all four scripts: real digits, one step per method, CLI layout        #
#################################################################################


@pytest.mark.parametrize("script,arch", [("asfm", "unet"), ("asfm", "dit"),
                                         ("integration_flow", "unet"), ("integration_flow", "dit"),
                                         ("consistency_func", "unet"), ("consistency_func", "dit"),
                                         ("consistency_func", "func"), ("scoreflow", "unet"),
                                         ("scoreflow", "dit")])
def test_every_script_trains_on_digits_and_samples_from_the_checkpoint_alone(script, arch, tmp_path):
    out = str(tmp_path / "run")
    extra = {"asfm": ["--stage", "rf"], "consistency_func": ["--pretrain-epochs", "0"] if arch == "func" else [],
             "integration_flow": ["--n-conv", "8", "--conv-iters", "2"]}.get(script, [])
    MODULES[script].main(["--dataset", "digits", "--arch", arch, "--steps", "2", "--batch-size", "8",
                          "--width", "32", "--device", "cpu", "--out-dir", out, *extra])
    # only the mode and the checkpoint: dataset, network and method flags come from its config
    MODULES[script].main(["--mode", "sample", "--ckpt", os.path.join(out, "ckpt.pt"), "--nfe", "1",
                          "--n", "4"])
    samples = np.load(os.path.join(out, "samples", "nfe1.npz"))["samples"]
    assert samples.shape == (4, 16, 16, 1) and samples.dtype == np.uint8
    assert os.path.isfile(os.path.join(out, "samples", "nfe1.png"))


@pytest.mark.parametrize("script,extra", [
    ("asfm", ["--stage", "asfm", "--init", "none", "--mem-size", "2", "--mem-nfe", "2"]),
    ("integration_flow", ["--n-conv", "8", "--conv-iters", "2"]),
    ("consistency_func", ["--arch", "func", "--pretrain-epochs", "0"]),
    ("scoreflow", [])])  # class-conditional on the 18 regions
def test_every_script_trains_on_photos(script, extra, tmp_path, photos_fd, capsys):
    out = str(tmp_path / "run")
    os.makedirs(tmp_path / "fid_stats")  # ASFM's memory monitor scores with the cached classifier
    shutil.copy(os.path.join(photos_fd.cache_dir, "photos_classifier-16.pt"), tmp_path / "fid_stats")
    MODULES[script].main(["--dataset", "photos", "--steps", "2", "--batch-size", "8", "--width", "32",
                          "--device", "cpu", "--out-dir", out, *extra])
    if script == "asfm":  # the memory against the data set's size, and D's accuracy in the log
        printed = capsys.readouterr().out
        assert "training memory: 2 batches x 8 = 16 pairs for 2080 training examples (0.01x" in printed
        assert re.search(r"step 2/2 .*\| d_acc [01]\.?\d* \|.*\| mem_fd \d", printed), printed
    MODULES[script].main(["--mode", "sample", "--ckpt", os.path.join(out, "ckpt.pt"), "--nfe", "1", "--n", "4"])
    samples = np.load(os.path.join(out, "samples", "nfe1.npz"))["samples"]
    assert samples.shape == (4, 16, 16, 3) and samples.dtype == np.uint8


def test_cm_eval_prints_noise_correlation(tmp_path, digits_fd, capsys):
    """consistency_func --mode eval prints the one-step samples' correlation with their noise
    (the README's CM-Func/CM-DiT/CM-UNet numbers come from this line)."""
    os.makedirs(tmp_path / "fid_stats")  # the scripts' cache: <run>/../fid_stats
    shutil.copy(os.path.join(digits_fd.cache_dir, "digits_classifier-16.pt"), tmp_path / "fid_stats")
    out = str(tmp_path / "cm")
    consistency_func.main(["--dataset", "digits", "--arch", "dit", "--steps", "2", "--batch-size", "8",
                           "--width", "16", "--device", "cpu", "--out-dir", out])
    capsys.readouterr()
    consistency_func.main(["--mode", "eval", "--ckpt", os.path.join(out, "ckpt.pt"), "--nfe", "1",
                           "--fid-n", "20"])
    line = [s for s in capsys.readouterr().out.splitlines() if "own noise" in s]
    assert len(line) == 1 and -1 <= float(line[0].split()[-1]) <= 1, line


def test_cm_func_default_does_not_pass_its_noise_through_on_digits(tmp_path, digits_fd, capsys):
    """Issue 31: a short iCT run of the default generator on digits (width 32, depth 2, batch 32,
    800 steps, about a minute) draws from the noise globally: its one-step samples correlate
    less than 0.45 with their own noise and cover at least 6 of the 10 digits (100 samples).
    Measured for seeds 0-3: corr 0.33 / 0.30 / 0.36 / 0.32, coverage 8 / 9 / 8 / 9. The earlier
    default (--inr-head tokens --raw-read) fails it in every seed: it passes the noise through
    (corr 0.65, 0.55; coverage 3, 5) or collapses (seed 1: coverage 1)."""
    os.makedirs(tmp_path / "fid_stats")
    shutil.copy(os.path.join(digits_fd.cache_dir, "digits_classifier-16.pt"), tmp_path / "fid_stats")
    out = str(tmp_path / "cm")
    consistency_func.main(["--dataset", "digits", "--width", "32", "--depth", "2", "--batch-size", "32",
                           "--steps", "800", "--pretrain-epochs", "0", "--sample-every", "0",
                           "--device", "cpu", "--out-dir", out])
    capsys.readouterr()
    consistency_func.main(["--mode", "eval", "--ckpt", os.path.join(out, "ckpt.pt"), "--nfe", "1",
                           "--fid-n", "100"])
    printed = capsys.readouterr().out
    corr = float(re.search(r"own noise: mean correlation ([-0-9.]+)", printed).group(1))
    coverage = int(re.search(r"eval nfe=1: .*coverage=(\d+)", printed).group(1))
    assert corr < 0.45 and coverage >= 6, (corr, coverage)


def test_noise_correlation_tells_pass_through_from_a_global_generator():
    """The eval's "one-step samples vs their own noise" number: a network that passes its input
    through (F(u) = u) scores ~1, one that draws a fixed image whatever the noise scores ~0."""
    m, image = consistency_func.ConsistencyTraining(1), torch.randn(1, 1, 8, 8)
    identity, constant = (lambda u, t, y=None: u), (lambda u, t, y=None: image.expand_as(u))
    assert consistency_func.noise_correlation(identity, m, (1, 8, 8), n=64) > 0.99
    assert abs(consistency_func.noise_correlation(constant, m, (1, 8, 8), n=64)) < 0.05


def test_digits_eval_weights_and_class_translation(tmp_path, digits_fd, capsys):
    """A class-conditional ScoreFlow on digits: eval prints digits-FD with its floor for the EMA
    and the online weights (different numbers), and translation 3 -> 8 reports how many
    translated digits the classifier reads as 8s."""
    os.makedirs(tmp_path / "fid_stats")  # the scripts' cache: <run>/../fid_stats
    shutil.copy(os.path.join(digits_fd.cache_dir, "digits_classifier-16.pt"), tmp_path / "fid_stats")
    out, ckpt = str(tmp_path / "sf"), str(tmp_path / "sf" / "ckpt.pt")
    scoreflow.main(["--dataset", "digits", "--steps", "20", "--batch-size", "16", "--width", "16",
                    "--device", "cpu", "--out-dir", out])
    capsys.readouterr()
    fds = {}
    for weights in ("ema", "online"):
        res = scoreflow.main(["--mode", "eval", "--ckpt", ckpt, "--nfe", "1", "--fid-n", "60",
                              "--n", "8", "--weights", weights])
        fds[weights] = res[1]["digits_fd"]
        assert res[1]["weights"] == weights and 0 <= res[1]["coverage"] <= 10
    printed = capsys.readouterr().out
    assert "digits-FD floor" in printed and "class accuracy" in printed
    assert fds["ema"] != fds["online"]
    m = scoreflow.main(["--mode", "translate", "--ckpt", ckpt, "--src-class", "3", "--tgt-class",
                        "8", "--nfe", "2", "--fid-n", "20"])
    assert 0 <= m["read_as_target"] <= 1 and m["digits_fd_to_target"] > 0
    assert os.path.isfile(os.path.join(out, "translate_class_two-pass.png"))


# ---- one vocabulary, one step per method, run folders ----------------------------

def test_one_training_step_per_method_used_by_loop_bench_and_toy2d(tmp_path, monkeypatch):
    calls = {"asfm": 0, "if": 0}
    step, loss = asfm.ASFM.train_step, integration_flow.IntegrationFlow.loss

    def count(key, fn):
        def wrapped(self, *a, **k):
            calls[key] += 1
            return fn(self, *a, **k)
        return wrapped
    monkeypatch.setattr(asfm.ASFM, "train_step", count("asfm", step))
    monkeypatch.setattr(integration_flow.IntegrationFlow, "loss", count("if", loss))
    few = ["--width", "16", "--batch-size", "32", "--device", "cpu", "--nfe", "1"]
    asfm.main(["--stage", "asfm", "--init", "none", "--steps", "3", "--mem-size", "2",
               "--out-dir", str(tmp_path / "a")] + few)
    integration_flow.main(small(tmp_path, "i", "--steps", "3", "--device", "cpu"))
    assert calls == {"asfm": 3, "if": 3}  # the training loops
    asfm.main(["--stage", "asfm", "--mode", "bench", "--freq", "1",
               "--out-dir", str(tmp_path / "b")] + few)
    integration_flow.main(small(tmp_path, "j", "--mode", "bench", "--nfe", "1", "--device", "cpu"))
    assert calls["asfm"] > 3 and calls["if"] > 3  # --mode bench times the same step
    bench = dict(calls)
    setup = toy2d.Setup("t", torch.randn(1024, 2), torch.randn(200, 2))
    cache = {}
    toy2d.train_method("asfm", setup, 20, cache)  # ASFM trains steps // 2 from the 1-RF
    toy2d.train_method("if", setup, 20, cache)
    assert calls == {"asfm": bench["asfm"] + 10, "if": bench["if"] + 20}


def test_init_auto_trains_the_printed_stage_rf_command(tmp_path, capsys):
    argv = ["--stage", "asfm", "--rf-steps", "3", "--steps", "1", "--mem-size", "2", "--batch-size", "32",
            "--width", "16", "--device", "cpu", "--out-dir", str(tmp_path / "auto" / "asfm-8gaussians-toy")]
    asfm.main(argv)
    printed = re.search(r"training the 1-RF first: python asfm.py (.*)", capsys.readouterr().out).group(1)
    rf_dir = str(tmp_path / "auto" / "asfm-rf-8gaussians-toy")
    kept = argv[:2] + argv[4:6] + argv[8:]  # less --rf-steps 3 --mem-size 2, which a 1-RF does not take
    assert printed.split() == kept + ["--stage", "rf", "--steps", "3", "--out-dir", rf_dir, "--resume"]
    # the same command typed by hand (into another folder) trains the same 1-RF
    asfm.main(printed.split()[:-3] + ["--out-dir", str(tmp_path / "hand")])
    auto, hand = (common.load_checkpoint(os.path.join(d, "ckpt.pt")) for d in (rf_dir, tmp_path / "hand"))
    assert auto["step"] == hand["step"] == 3
    assert all(torch.equal(auto["state"]["ema"][k], hand["state"]["ema"][k]) for k in auto["state"]["ema"])
    asfm.main(argv + ["--resume", "--steps", "2"])  # a finished 1-RF is reused, not retrained
    assert "training the 1-RF first" not in capsys.readouterr().out


@pytest.mark.parametrize("script,first", [("asfm", "--stage"), ("integration_flow", "--ode"),
                                          ("consistency_func", "--pretrain-epochs"), ("scoreflow", "--beta")])
def test_help_lists_the_method_flags_before_the_shared_ones(script, first, capsys):
    with pytest.raises(SystemExit):
        MODULES[script].main(["--help"])
    text = capsys.readouterr().out
    assert text.index(f"  {first}") < text.index("flags shared by the four scripts") < text.index("  --dataset")
    # issue 22: the defaults that presets fill are listed per preset, as flags, as the run uses them
    listed = {line.split(":")[0].strip(): " ".join(re.split(r"\n  (?=\S)", text[text.index(line):])[0].split())
              for line in text.splitlines() if re.match(r"  (toy|tiny|cifar10|celeba64): --", line)}
    assert sorted(listed) == sorted(MODULES[script].PRESETS)
    tiny = {**MODULES[script].PRESETS["tiny"], **getattr(MODULES[script], "FUNC", {}).get("tiny", {})}  # CM: func
    assert f"--width {tiny['width']} " in listed["tiny"] and f"--lr {tiny['lr']} " in listed["tiny"]
    assert "--ch-mult 1,2 " in listed["tiny"] and " --hflip" in listed["tiny"] and "--no-hflip" in listed["toy"]


def test_run_folders_are_named_after_the_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert asfm.parse([]).out_dir == os.path.join("runs", "asfm-8gaussians-toy")
    assert asfm.parse(["--stage", "rf"]).out_dir == os.path.join("runs", "asfm-rf-8gaussians-toy")
    consistency_func.main(["--steps", "1", "--width", "16", "--batch-size", "32", "--device", "cpu"])
    integration_flow.main(["--steps", "1", "--width", "16", "--batch-size", "32", "--device", "cpu",
                           "--n-conv", "8", "--conv-iters", "2", "--fid-n", "50"])
    assert sorted(os.listdir("runs")) == ["consistency_func-8gaussians-toy", "integration_flow-8gaussians-toy"]


def test_func_arch_belongs_to_consistency_func(tmp_path):
    for script in ("asfm", "integration_flow", "scoreflow"):
        with pytest.raises(common.UserError, match="--arch func: this script trains mlp, unet, ddpmpp, dit"):
            MODULES[script].main(["--dataset", "digits", "--arch", "func", "--out-dir", str(tmp_path)])


# ---- issue 23: nothing silently wrong (no wrong result, traceback, hang or lost run) -------

HOLD_LOCK = """import argparse, os, sys, time, common
args = common.add_common_args(argparse.ArgumentParser()).parse_args(["--out-dir", sys.argv[1], "--device", "cpu"])
common.Run(common.finish_args(args, method="holder"))
os.remove(os.path.join(sys.argv[1], "log.txt"))  # its first line: the folder holds only the lock
print("holding", flush=True)
time.sleep(600)
"""


def hold_lock(folder):
    """A live process that took <folder>'s run lock, as a training run there would have."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], cwd=HERE, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.stdout.readline().startswith("holder --mode train: ")
    assert proc.stdout.readline().strip() == "holding"
    return proc


@pytest.fixture(scope="module")
def held_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("held")
    proc = hold_lock(folder)
    yield folder
    proc.kill()
    proc.wait()


@contextlib.contextmanager
def deadline(seconds):
    """Turn a hang into a failure (SIGALRM)."""
    def stop(*_):
        raise TimeoutError(f"still running after {seconds} s: a hang")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


ASFM_RESUME = ["--stage", "asfm", "--init", "none", "--mem-size", "2", "--out-dir", "{tmp}/asfm_run", "--resume"]
# (class of the fault on the code before issue 23, script, argv, the one line it must end in)
ISSUE23_CASES = [
    ("wrong result: out-of-range method flag", "consistency_func", ["--two-step-sigma", "nan"],
     r"--two-step-sigma nan is out of range: use a number in \(0.002, 80.0\)"),
    ("wrong result: a replaced value", "consistency_func", ["--sigma-data", "0"], "--sigma-data 0.0 is out of range"),
    ("wrong result: a flag that does not apply", "asfm", ["--hflip"],
     r"--hflip does not apply to this run: it is for images \(2-D points"),
    ("wrong result: a flag of another mode", "scoreflow", ["--src-class", "1"],
     "--src-class does not apply to this run: it is for --mode translate"),
    ("wrong result: a flag of another stage", "asfm", ["--stage", "rf", "--r1", "1"],
     r"--r1 does not apply to this run: it is for --stage asfm"),
    ("wrong result: sampling with another dataset", "asfm",
     ["--mode", "sample", "--ckpt", "{tmp}/asfm_run/ckpt.pt", "--dataset", "moons"],
     "--dataset moons: .*asfm_run/ckpt.pt was written with --dataset 8gaussians: pass the same flags"),
    ("wrong result: resume with another lr", "asfm", ASFM_RESUME + ["--lr", "0.5"],
     r"--resume: .* was trained with --lr 0.001, this run has --lr 0.5: pass the same flags, or "
     "--allow-changed lr to change them on purpose"),
    ("wrong result: resume with fewer steps", "asfm", ASFM_RESUME + ["--steps", "1"],
     "is at step 2, past the 1 steps this run asks for: --resume cannot undo steps"),
    ("wrong result: resume and overwrite", "asfm", ASFM_RESUME + ["--overwrite"],
     "--resume continues <out-dir>/ckpt.pt and --overwrite starts over: pass one"),
    ("wrong result: stage mismatch after a whole 1-RF", "asfm",
     ["--stage", "asfm", "--resume", "--dataset", "folder", "--data-dir", "{tmp}/img", "--out-dir", "{tmp}/img_run"],
     "img_run/ckpt.pt was written by asfm-rf, not asfm-asfm"),
    ("traceback: --samples-out is a file", "integration_flow",
     ["--mode", "sample", "--ckpt", "{tmp}/if_run/ckpt.pt", "--samples-out", "{tmp}/file.txt"],
     "--samples-out .*file.txt is a file, not a folder: pass a folder"),
    ("traceback: zero reflow pairs", "asfm", ["--stage", "reflow", "--init", "none", "--reflow-pairs", "0"],
     r"--reflow-pairs 0 is out of range: use a number >= 1"),
    ("traceback: a seed torch cannot take", "scoreflow", ["--seed", "99999999999999999999"],
     r"--seed 99999999999999999999 is out of range: use a number in \[0, 4294967295\]"),
    ("traceback: FID of one sample", "integration_flow", ["--mode", "eval", "--fid-n", "1"], "--fid-n 1 is out of range"),
    ("traceback: no method", "toy2d", ["--methods", ","], "--methods ',' names no method"),
    ("traceback: no run at all", "toy2d", ["--methods", "if", "--setups", "b"], "run in set-up a only"),
    ("traceback: a width DiT cannot split", "consistency_func",
     ["--dataset", "folder", "--data-dir", "{tmp}/img", "--arch", "func", "--width", "5"],
     "--width 5: --arch func needs a multiple of 4"),
    ("traceback: zero INR width", "consistency_func",
     ["--dataset", "folder", "--data-dir", "{tmp}/img", "--inr-width", "0"], "--inr-width 0 is out of range"),
    ("traceback: a network larger than memory", "asfm", ["--width", "1000000"],
     r"a network of [\d,]+ parameters \(weights, gradients, EMA, Adam\) needs about [\d,.e+]+ GB, but cpu "
     r"has [\d,.e+]+ GB free: lower --width or --depth"),
    ("hang: absurd NFE", "asfm", ["--mode", "sample", "--ckpt", "{tmp}/asfm_run/ckpt.pt", "--nfe", "100000000"],
     "--nfe 100000000 is out of range: use at most 10000"),
    ("hang: more samples than memory", "scoreflow", ["--mode", "sample", "--n", "1000000000000"],
     r"--n 1000000000000 samples needs about [\d,.e+]+ GB, but cpu has .* free: lower --n"),
    ("hang: absurd toy2d steps", "toy2d", ["--steps", "100000000000000000000"], "--steps .* is out of range"),
    ("data loss: a second run into a live run's folder", "integration_flow", ["--out-dir", "{held}"],
     r"--out-dir .*held.* is in use by a live run \(pid \d+ on .*\): wait for it to finish"),
    ("misleading: a negative lr", "asfm", ["--lr", "-1e-3"], r"--lr -0.001 is out of range: use a finite number > 0"),
    ("misleading: guidance weight nan", "scoreflow", ["--cfg", "nan"], "--cfg nan is out of range: use a finite number"),
    # issue 33: no flag is silently ignored
    ("wrong result: training flags in --mode sample", "asfm",
     ["--mode", "sample", "--ckpt", "{tmp}/asfm_run/ckpt.pt", "--lr", "0.5", "--steps", "99", "--ema-decay", "0.5"],
     "--ema-decay, --steps, --lr do not apply to this run: --ema-decay, --steps are for --mode train; --lr is "
     "for --mode train and bench; leave them out"),
    ("wrong result: method training flags in --mode sample", "asfm",
     ["--mode", "sample", "--ckpt", "{tmp}/asfm_run/ckpt.pt", "--mem-size", "7", "--lambda-adv", "3", "--freq", "2"],
     "--freq, --lambda-adv, --mem-size do not apply to this run: --freq, --lambda-adv are for --mode train and "
     "bench; --mem-size is for --mode train"),
    ("wrong result: a sampling flag no --nfe reads", "consistency_func",
     ["--mode", "sample", "--nfe", "1", "--two-step-sigma", "3"],
     r"--two-step-sigma does not apply to this run: it is for two-step sampling \(--nfe with 2"),
    ("wrong result: a toy2d target of a set-up not run", "toy2d", ["--methods", "rf", "--setups", "b", "--dist", "moons"],
     "--dist names the target of set-up a, which --setups b does not run: add a to --setups, or leave --dist out"),
    ("wrong result: a toy2d method twice", "toy2d", ["--methods", "rf,rf"], "--methods rf,rf names rf more than once"),
    ("data loss: a corrupt checkpoint in the run folder", "asfm", ["--stage", "rf", "--out-dir", "{tmp}/corrupt_run"],
     "cannot read checkpoint .*corrupt_run/ckpt.pt': it is corrupt or not one of ours; pass --overwrite to train "
     "from scratch over it"),
    ("misleading: the default class conditioning", "scoreflow",
     ["--mode", "sample", "--ckpt", "{tmp}/sf_run/ckpt.pt", "--no-class-cond"],
     "no --class-cond: .*sf_run/ckpt.pt was written with --class-cond: pass the same flags"),
    ("misleading: an infinite weight", "asfm", ["--lambda-adv", "inf"],
     "--lambda-adv inf is out of range: use a finite number >= 0"),
    ("misleading: resume advice with nothing to resume", "asfm", ["--stage", "rf", "--lr", "1e30", "--log-every", "1"],
     "loss became NaN/inf before step 2; stopped without saving, no checkpoint of this run was written: train "
     "again with a lower --lr$"),
    ("misleading: a folder that was never passed", "asfm",
     ["--mode", "sample", "--ckpt", "{ro}/ckpt.pt", "--samples-out", "{tmp}/samples_elsewhere"],
     r"the checkpoint's folder .*asfm_run \(the default --out-dir\): cannot write there \(Permission denied\); "
     "pass --out-dir with a folder you can write to"),
    ("misleading: another script's --init", "asfm", ["--stage", "reflow", "--init", "{tmp}/if_run/ckpt.pt"],
     "--init .*if_run/ckpt.pt was written by integration_flow, not asfm-reflow: use the script that wrote it, "
     "or another --init"),
]


@pytest.mark.parametrize("cls, script, argv, msg", ISSUE23_CASES, ids=[c[0] for c in ISSUE23_CASES])
def test_issue23_every_fault_class_ends_in_one_line(bad_inputs, held_folder, cls, script, argv, msg, capsys,
                                                    tmp_path, monkeypatch):
    # one representative of each class found by trying bad inputs on a fresh clone; each ended
    # in a wrong result (exit 0), a traceback, a hang or a lost run before
    read_only, real_temporary_file = bad_inputs / "asfm_run", tempfile.TemporaryFile  # {ro}: a folder nobody may write to

    def temporary_file(*a, dir=None, **kw):  # as root, chmod would not stop a write
        if os.path.realpath(dir) == os.path.realpath(read_only):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_temporary_file(*a, dir=dir, **kw)
    own_folder = not any("{ro}" in a for a in argv)  # else the run's folder is the checkpoint's
    if not own_folder:
        monkeypatch.setattr(common.tempfile, "TemporaryFile", temporary_file)
    argv = [a.replace("{tmp}", str(bad_inputs)).replace("{held}", str(held_folder)).replace("{ro}", str(read_only))
            for a in argv]
    if script == "toy2d":
        argv = ["--out", str(tmp_path / "toy2d")] + argv
    else:
        image = "folder" in argv
        argv = (["--device", "cpu", "--width", "16", "--batch-size", "4" if image else "32"]
                + (["--steps", "2"] if training(argv) else []) + (["--out-dir", str(tmp_path / "run")] if own_folder else [])
                + (["--workers", "0"] if image else []) + argv)
    def written():  # the folders and checkpoints of the fixture's runs
        return sorted(os.listdir(bad_inputs)), {p: os.stat(p).st_mtime_ns for p in glob.glob(f"{bad_inputs}/*/*.pt")}
    before = written()
    with deadline(60), pytest.raises(SystemExit) as e:
        common.run_cli(MODULES[script].main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(msg, err), err
    assert written() == before  # nothing was trained or overwritten (and no --init auto 1-RF)


# ---- issue 33: no flag is silently ignored, no slow run looks hung ------------------------

def test_a_slow_first_step_is_announced_and_timed(tmp_path, capsys, monkeypatch):
    # a first step of minutes (consistency_func.py --dataset digits --depth 1000) printed nothing
    monkeypatch.setattr(common.Progress, "every", 0.2)  # 30 s in a real run
    optimize = common.optimize

    def slow_first_step(opt, loss, net, args, step):
        time.sleep(1.5 if step == 0 else 0)
        return optimize(opt, loss, net, args, step)
    monkeypatch.setattr(common, "optimize", slow_first_step)
    asfm.main(["--stage", "rf", "--steps", "3", "--log-every", "100", "--width", "16", "--device", "cpu",
               "--out-dir", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("step 1/3: not done after 0:00:00 (a slow first"))
    assert re.match(r"step 1 done, 0:00:0[12] after the training loop started$", lines[i + 1])
    assert lines[i + 2].startswith("step 1/3 | loss ")  # the first progress line, long before --log-every
    assert lines[i + 3].startswith("step 3/3 | loss ") and len(lines) == i + 4


def test_overwrite_starts_over_a_corrupt_checkpoint(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04 a checkpoint cut short")
    asfm.main(["--stage", "rf", "--steps", "1", "--width", "16", "--device", "cpu", "--out-dir", str(tmp_path),
               "--overwrite"])
    assert common.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 1


def test_a_class_conditional_default_reads_as_class_cond(bad_inputs, tmp_path, capsys):
    # the checkpoint left --class-cond to its default (classes when the data has them)
    scoreflow.main(["--mode", "sample", "--ckpt", str(bad_inputs / "sf_run" / "ckpt.pt"), "--class-cond",
                    "--n", "4", "--nfe", "1", "--out-dir", str(tmp_path)])
    assert " class_cond=True " in capsys.readouterr().out.splitlines()[0]


def test_toy2d_md_records_the_command_as_run(tmp_path, monkeypatch):
    argv = ["--methods", "ct", "--setups", "a", "--steps", "10", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["toy2d.py"] + argv)
    toy2d.main()  # as from the shell: the flags come from sys.argv
    assert (tmp_path / "toy2d.md").read_text().startswith(f"`python toy2d.py {' '.join(argv)}` — 1 runs")


def test_a_live_run_locks_its_folder_and_a_killed_one_does_not(tmp_path, capsys):
    folder = tmp_path / "run"
    toy = ["--steps", "2", "--width", "16", "--batch-size", "32", "--device", "cpu", "--out-dir", str(folder)]
    holder = hold_lock(folder)
    try:
        with pytest.raises(SystemExit) as e:
            common.run_cli(asfm.main, ["--stage", "rf"] + toy)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1
        assert f"is in use by a live run (pid {holder.pid} on {socket.gethostname()}" in err
        assert not (folder / "ckpt.pt").exists() and not (folder / "log.txt").exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up of any kind, the lock file stays
        holder.wait()
    assert (folder / "run.lock").exists()
    asfm.main(["--stage", "rf"] + toy)  # the OS released the dead holder's lock
    assert common.load_checkpoint(str(folder / "ckpt.pt"))["step"] == 2
    # this process holds it now: the next run here may take it (same process), others may not
    assert f"pid {os.getpid()} " in (folder / "run.lock").read_text()


def test_a_file_system_without_locks_trains_unlocked_and_says_so(tmp_path, monkeypatch, capsys):
    import fcntl

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    asfm.main(["--stage", "rf", "--steps", "1", "--width", "16", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert "cannot be locked here (No locks available): make sure no other run" in capsys.readouterr().err
    assert common.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 1


def test_resume_accepts_announced_changes_and_more_steps(tmp_path, capsys):
    toy = ["--stage", "rf", "--width", "16", "--batch-size", "32", "--device", "cpu"]
    out = tmp_path / "rf"
    asfm.main(toy + ["--steps", "3", "--out-dir", str(out)])
    # the team's way to train a finished run longer: copy it, resume with a larger --steps
    (tmp_path / "rfx").mkdir()
    shutil.copy(out / "ckpt.pt", tmp_path / "rfx" / "ckpt.pt")
    asfm.main(toy + ["--steps", "5", "--out-dir", str(tmp_path / "rfx"), "--resume",
                     "--data-dir", str(tmp_path / "moved")])  # a toy reads no files: its data folder is free
    assert common.load_checkpoint(str(tmp_path / "rfx" / "ckpt.pt"))["step"] == 5
    # a 1-RF saved its (unused) ASFM flags with the defaults of its day: --stage rf resumes whatever they are now
    ckpt = torch.load(tmp_path / "rfx" / "ckpt.pt", weights_only=True)
    ckpt["config"].update(lambda_adv=0.1, r1=0.01)  # the toy preset's are 1 and 0.1
    torch.save(ckpt, tmp_path / "rfx" / "ckpt.pt")
    asfm.main(toy + ["--steps", "6", "--out-dir", str(tmp_path / "rfx"), "--resume"])
    assert common.load_checkpoint(str(tmp_path / "rfx" / "ckpt.pt"))["step"] == 6
    with pytest.raises(common.UserError, match=r"trained with --batch-size 32 --lr 0.001, this run has "
                       r"--batch-size 64 --lr 0.0005: pass the same flags, or --allow-changed batch-size,lr"):
        asfm.main(toy + ["--steps", "6", "--out-dir", str(out), "--resume", "--lr", "5e-4", "--batch-size", "64"])
    capsys.readouterr()
    asfm.main(toy + ["--steps", "6", "--out-dir", str(out), "--resume", "--lr", "5e-4", "--allow-changed", "lr"])
    assert "resumed from" in capsys.readouterr().out
    assert "at step 3 with --lr 0.0005 (--allow-changed)" in (out / "log.txt").read_text()
    ckpt = common.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 6 and ckpt["config"]["lr"] == 5e-4  # the new value is the run's from now on
    asfm.main(toy + ["--steps", "6", "--out-dir", str(out), "--resume", "--lr", "5e-4"])
    assert "at step 6: that is where --steps ends, so nothing is trained" in capsys.readouterr().out
    with pytest.raises(common.UserError, match="--allow-changed: nope is not a flag of this script"):
        asfm.main(toy + ["--out-dir", str(out), "--resume", "--allow-changed", "lr,nope"])
    with pytest.raises(common.UserError, match="--allow-changed does not apply to this run: it is for --resume"):
        asfm.main(toy + ["--out-dir", str(tmp_path / "new"), "--allow-changed", "lr"])


def test_sixteen_bit_grey_png_loads_as_grey(tmp_path):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path / "img" / "a.png")  # 50% grey
    x = common._rgb(str(tmp_path / "img" / "a.png"))
    assert x.mode == "RGB" and np.asarray(x).min() == np.asarray(x).max() == 128  # not 255 (white)


def test_a_sampler_that_gives_nan_stops_before_writing(tmp_path, capsys):
    out = tmp_path / "cm"
    toy = ["--width", "16", "--batch-size", "32", "--device", "cpu", "--out-dir", str(out)]
    consistency_func.main(toy + ["--steps", "1"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    for v in ckpt["state"]["ema"].values():
        v.fill_(float("nan"))  # a diverged run (these weights could never be saved by training)
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        common.run_cli(consistency_func.main, ["--mode", "sample", "--ckpt", str(out / "ckpt.pt"), "--nfe", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "sampling at NFE 2 gave NaN/inf values" in err
    assert not (out / "samples" / "nfe2.npz").exists()


def test_long_sampling_prints_progress(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    asfm.main(["--stage", "rf", "--steps", "1", "--width", "16", "--device", "cpu", "--out-dir", str(out)])
    monkeypatch.setattr(common.Progress, "every", 0.0)  # print after every batch
    asfm.main(["--mode", "sample", "--ckpt", str(out / "ckpt.pt"), "--n", "100", "--batch-size", "40", "--nfe", "2"])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("sampling nfe=2:")]
    assert [l.split(",")[0] for l in lines] == ["sampling nfe=2: 40/100", "sampling nfe=2: 80/100"]
    assert all(re.search(r", \d+:\d\d:\d\d left$", l) for l in lines)


@pytest.mark.parametrize("arch,shape", [("mlp", (2,)), ("unet", (3, 16, 16)), ("dit", (3, 16, 16)),
                                        ("ddpmpp", (3, 16, 16))])
def test_parameter_estimate_is_the_real_count(arch, shape):
    argv = ["--depth", "3", "--width", "32"] + (["--dataset", "folder", "--arch", arch] if len(shape) == 3 else [])
    args = make_args(argv)
    assert common.estimate_params(args, shape) == common.count_params(common.build_net(args, shape))


def test_sizes_that_cannot_fit_stop_with_an_estimate(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "free_memory", lambda device: 10**6)  # a machine with 1 MB free
    toy = ["--stage", "rf", "--device", "cpu", "--steps", "1", "--out-dir", str(tmp_path)]
    asfm.main(toy + ["--width", "64", "--depth", "3"])  # 21k parameters: 0.4 MB to train, fits
    with pytest.raises(common.UserError, match=r"a network of 74,882 parameters \(weights, gradients, EMA, "
                       r"Adam\) needs about 0.0015 GB, but cpu has 0.001 GB free: lower --width or --depth"):
        asfm.main(toy + ["--width", "128", "--depth", "3", "--overwrite"])  # 1.5 MB, does not
    with pytest.raises(common.UserError, match=r"one batch of 4 at the first layer needs about 0.0021 GB, but "
                       "cpu has 0.001 GB free: lower --batch-size or --image-size"):
        asfm.main(toy + ["--dataset", "digits", "--image-size", "128", "--batch-size", "4", "--width", "8"])
    with pytest.raises(common.UserError, match=r"--mem-size needs about .*: lower it"):
        asfm.main(["--stage", "asfm", "--init", "none", "--mem-size", "5000", "--width", "8", "--device", "cpu",
                   "--out-dir", str(tmp_path / "m")])


def test_eval_every_evaluates_during_training_in_every_script(tmp_path, capsys):
    toy = ["--steps", "2", "--eval-every", "2", "--fid-n", "64", "--width", "16", "--batch-size", "32",
           "--device", "cpu", "--nfe", "1"]
    integration_flow.main(toy + ["--n-conv", "8", "--conv-iters", "1", "--out-dir", str(tmp_path / "if")])
    consistency_func.main(toy + ["--out-dir", str(tmp_path / "cm")])
    for run in ("if", "cm"):
        assert "eval nfe=1: sw2=" in (tmp_path / run / "log.txt").read_text()


def test_flags_of_a_class_conditional_model_on_an_unconditional_one(tmp_path):
    flags = SF_TINY + ["--steps", "1", "--no-class-cond", "--out-dir", str(tmp_path)]
    for flag in (["--cfg", "2"], ["--p-uncond", "0.2"]):
        with pytest.raises(common.UserError, match=f"{flag[0]} does not apply to this run: it is for "
                           "class-conditional models"):
            scoreflow.main(flags + flag)
