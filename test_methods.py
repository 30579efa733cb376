"""
Tests for the whole repo (CPU, no network, seconds each). Run: python -m pytest -q test_methods.py

Sections: common.py (networks, samplers, FID, data, checkpoints, faults, DDP); asfm.py;
integration_flow.py; consistency_func.py; scoreflow.py; toy2d.py.
"""
import argparse
import hashlib
import math
import os
import pickle
import socket
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import (FID_WEIGHTS_NAME, FIDInceptionA, FIDInceptionC, FIDInceptionE,  # noqa: E402
                    feature_stats, fid_report, frechet_distance, inception_features,
                    inception_score, load_fid_inception, precision_recall, reference_stats,
                    to_uint8)

torch.set_num_threads(min(2, torch.get_num_threads()))


def make_args(argv=(), method="test"):
    parser = common.add_common_args(argparse.ArgumentParser())
    return common.finish_args(parser.parse_args(list(argv)), method=method)


def write_pngs(folder, n, size=20, seed=0):
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"{i:03d}.png"))


#################################################################################
#                              common.py: networks                              #
#################################################################################

@pytest.mark.parametrize("arch", ["unet", "dit"])
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


def test_mlp_with_labels_and_extra_input():
    net = common.MLP(2, 32, 2, num_classes=3, extra_dim=2)
    out = net(torch.randn(5, 2), torch.rand(5), torch.tensor([0, 1, 2, 3, 3]), torch.randn(5, 2))
    assert out.shape == (5, 2)
    # y=None is the null class (index num_classes)
    x, t = torch.randn(5, 2), torch.rand(5)
    e = torch.zeros(5, 2)
    assert torch.allclose(net(x, t, None, e), net(x, t, torch.full((5,), 3), e))


#################################################################################
#                              common.py: samplers                              #
#################################################################################

def test_euler_exact_on_constant_field():
    c = torch.tensor([[1.5, -2.0]])
    x1, info = common.integrate(lambda x, t: c.expand_as(x), torch.zeros(3, 2), 1, "euler")
    assert torch.allclose(x1, c.expand(3, 2)) and info["nfe"] == 1


def test_euler_velocity_sees_time_grid():
    # dx/dt = t: Euler with N steps gives sum_{k<N} (k/N)(1/N) = (N-1)/(2N)
    x1, _ = common.integrate(lambda x, t: t[:, None].expand_as(x), torch.zeros(2, 1), 4, "euler")
    assert torch.allclose(x1, torch.full((2, 1), 3 / 8))


@pytest.mark.parametrize("method,nfe,tol", [("heun", 20, 1e-3), ("rk45", None, 1e-4)])
def test_heun_rk45_on_rotation_and_backward(method, nfe, tol):
    # dx/dt = A x with A a rotation generator: x(1) = R(1) x(0)
    rot = lambda x, t: torch.stack([-x[:, 1], x[:, 0]], 1)  # noqa: E731
    x0 = torch.tensor([[1.0, 0.0], [0.3, -2.0]], dtype=torch.float64)
    c, s = math.cos(1.0), math.sin(1.0)
    exact = x0 @ torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
    x1, info = common.integrate(rot, x0, nfe, method)
    assert torch.allclose(x1, exact, atol=tol)
    back, _ = common.integrate(rot, x1, nfe, method, t0=1.0, t1=0.0)  # inversion
    assert torch.allclose(back, x0, atol=2 * tol)
    if method == "heun":
        assert info["nfe"] == 40
    else:
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




#################################################################################
#                                common.py: data                                #
#################################################################################

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
    assert torch.equal(to_uint8(x), raw[5]) and y == 1 and i == 5  # exact pixels, [-1, 1] scaling
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


def test_bad_arch_and_patch_size():
    with pytest.raises(SystemExit):  # argparse: invalid choice
        make_args(["--arch", "resnet"])
    with pytest.raises(common.UserError, match="divisible by the DiT patch"):
        make_args(["--dataset", "folder", "--arch", "dit", "--image-size", "15"])
    with pytest.raises(common.UserError, match="2-D data uses --arch mlp"):
        make_args(["--dataset", "moons", "--arch", "unet"])


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


#################################################################################
#                     common.py: checkpoints, faults, GPU path                  #
#################################################################################

def tiny_run(tmp_path, *extra):
    args = make_args(["--dataset", "moons", "--device", "cpu", "--out-dir", str(tmp_path / "run"),
                      "--width", "16", "--depth", "1", *extra])
    return args, common.Run(args)


def test_checkpoint_round_trip_and_clean_keys(tmp_path):
    args, run = tiny_run(tmp_path, "--compile")
    net = common.MLP(2, 16, 1)
    ema, opt = common.EMA(net, 0.9), torch.optim.Adam(net.parameters())
    model = run.wrap(net)  # torch.compile wrapper; checkpoints come from the raw net
    loss = model(torch.randn(8, 2), torch.rand(8)).pow(2).mean()
    common.optimize(opt, loss, net, args, 0)
    ema.update(net)
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


def test_ema_update_rule():
    net = nn.Linear(2, 1)
    ema = common.EMA(net, 0.9)
    old = ema.model.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.model.weight, 0.9 * old + 0.1 * net.weight)
    assert not ema.model.training and not ema.model.weight.requires_grad


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


def test_cli_prints_one_line_error(capsys):
    def main(argv):
        raise common.UserError("something is wrong: do this")
    with pytest.raises(SystemExit) as e:
        common.run_cli(main, [])
    assert e.value.code == 2 and capsys.readouterr().err == "error: something is wrong: do this\n"


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
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))  # synced grads
    assert len(r0["idx"]) == 3 * 32 and not set(r0["idx"].tolist()) & set(r1["idx"].tolist())
    assert common.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["step"] == 3


#################################################################################
#                   common.py: FID, Inception Score, precision/recall           #
#################################################################################

# ---------------------------------------------------------------- Frechet distance

def test_frechet_identical_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8))
    mu, sigma = feature_stats(a)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_frechet_diagonal_by_hand():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    # ||mu diff||^2 = 1 + 0 + 4 = 5; sum (sqrt a - sqrt b)^2 = 1 + 1 + 0 = 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(7.0, abs=1e-12)


def test_frechet_singular_diagonal():
    # a zero-variance direction (fewer samples than dims) must not break the square root
    d = frechet_distance(np.zeros(2), np.diag([0.0, 4.0]), np.zeros(2), np.diag([9.0, 1.0]))
    assert d == pytest.approx(9.0 + 1.0, abs=1e-12)  # (0-3)^2 + (2-1)^2


def test_frechet_non_diagonal_vs_independent():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # independent: eigenvalues of the non-symmetric product (real, >= 0 in theory)
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    got = frechet_distance(mu1, s1, mu2, s2)
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
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


# ---------------------------------------------------------------- precision / recall

def test_precision_recall_identical_and_disjoint():
    x = np.random.default_rng(0).normal(size=(40, 5))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 1000.0) == (0.0, 0.0)


def test_precision_recall_designed_fraction():
    # points on a line, embedded in 4-D: real = 0..9, fake = 0..4 and 1000..1004.
    def line(v):
        return np.pad(np.asarray(v, float)[:, None], ((0, 0), (0, 3)))
    real = line(range(10))
    fake = line(list(range(5)) + list(range(1000, 1005)))
    # precision: fakes 0..4 sit on real points, the far five are outside every real ball -> 5/10.
    # recall: fake radii (3rd NN) are 3 at 0 and 4, so fake balls cover [-3, 7] -> reals 0..7 -> 8/10.
    for batch in (1024, 3):  # chunking must not change the answer
        p, r = precision_recall(real, fake, k=3, batch=batch)
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
    assert precision_recall(real, fake, k=3, batch=7) == (pytest.approx(p), pytest.approx(r))


def test_precision_recall_too_few_points():
    with pytest.raises(ValueError):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


# ---------------------------------------------------------------- Inception Score

def test_inception_score_uniform_is_one():
    mean, std = inception_score(np.zeros((20, 1008)), splits=2)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_distinct_classes():
    logits = np.full((20, 1008), -1e4)
    logits[np.arange(20), np.arange(20) % 10] = 0.0  # each split of 10 covers 10 classes once
    mean, std = inception_score(logits, splits=2)
    assert mean == pytest.approx(10.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    mean, _ = inception_score(logits, splits=1)
    assert mean == pytest.approx(10.0, rel=1e-9)


# ---------------------------------------------------------------- the network

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_fid_inception("cpu", weights="random")


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
    assert isinstance(model.Mixed_5b, FIDInceptionA) and isinstance(model.Mixed_6e, FIDInceptionC)
    assert model.Mixed_7b.pool is not model.Mixed_7c.pool  # avg in 7b, max in 7c


@pytest.mark.parametrize("cls,parent,args,ch", [
    (FIDInceptionA, torchvision.models.inception.InceptionA, (16, 8), 16),
    (FIDInceptionC, torchvision.models.inception.InceptionC, (16, 8), 16),
    (FIDInceptionE, torchvision.models.inception.InceptionE, (16,), 16)])
def test_fid_blocks_branch_order(cls, parent, args, ch):
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
        load_fid_inception("cpu")
    msg = str(e.value)
    assert FID_WEIGHTS_NAME in msg and "\n" not in msg and "--inception-weights" in msg


def test_load_from_path(tmp_path, model):
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    m2 = load_fid_inception("cpu", weights=str(path))
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
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 1]
    assert to_uint8(x).dtype == torch.uint8


def test_inception_features_tensor_and_iterable_agree():
    m = StubInception()
    imgs = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    f1, l1 = inception_features(m, imgs, batch_size=3)
    f2, l2 = inception_features(m, iter([imgs[:4], imgs[4:]]))
    assert f1.dtype == np.float64 and f1.shape == (7, 2048) and l1.shape == (7, 1008)
    assert np.allclose(f1, f2, atol=1e-4) and np.allclose(l1, l2, atol=1e-4)  # float32 batching
    with pytest.raises(TypeError, match="uint8"):
        inception_features(m, imgs.float() / 127.5 - 1)


def test_reference_stats_cached(tmp_path):
    m = StubInception()
    imgs = torch.randint(0, 256, (30, 3, 16, 16), dtype=torch.uint8)
    calls = []

    def batches():
        calls.append(1)
        return iter(imgs.split(8))

    ref = reference_stats("toy-16", batches, m, str(tmp_path), max_features=20)
    assert len(calls) == 1 and os.path.exists(tmp_path / "fid_ref_toy-16.npz")
    assert os.listdir(tmp_path) == ["fid_ref_toy-16.npz"]  # no temp file left behind
    ref2 = reference_stats("toy-16", batches, m, str(tmp_path), max_features=20)
    assert len(calls) == 1
    assert set(ref) == {"mu", "sigma", "features", "n"} and int(ref["n"]) == 30
    assert ref["features"].shape == (20, 2048)
    for k in ref:
        assert np.array_equal(ref[k], ref2[k])
    mu, sigma = feature_stats(inception_features(m, imgs)[0])
    assert np.allclose(ref["mu"], mu, atol=1e-4) and np.allclose(ref["sigma"], sigma, atol=1e-3)


def test_fid_report_same_images(tmp_path):
    m = StubInception(dim=256)  # small features keep the 2 eigendecompositions cheap
    imgs = torch.randint(0, 256, (30, 3, 16, 16), dtype=torch.uint8)
    ref = reference_stats("toy-16", lambda: [imgs], m, str(tmp_path))
    rep = fid_report(m, imgs, ref)
    assert set(rep) >= {"fid", "is", "precision", "recall", "n"} and rep["n"] == 30
    assert abs(rep["fid"]) < 1e-3 * np.trace(ref["sigma"])
    assert rep["precision"] == 1.0 and rep["recall"] == 1.0
    assert rep["is"] >= 1.0
    other = fid_report(m, torch.full_like(imgs, 255) - imgs // 4, ref)
    assert other["fid"] > 1.0
