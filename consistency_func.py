"""
CM-Func: "One-step Image-function Generation via Consistency Training" (ICLR 2025 submission,
withdrawn; no public code). One network call turns noise into an image *function* (the
weights of a small coordinate MLP, an INR) that renders at any resolution. The network is
trained from data alone with improved consistency training (iCT, Song & Dhariwal 2023).

Noise convention (EDM/Karras, the only one here): x_sigma = x1 + sigma z, data x1, z ~ N(0, I),
sigma in [sigma_min, sigma_max] = [0.002, 80]; sampling goes from sigma_max down.

Equations implemented (iCT, exact):
  Karras grid     sigma_i = (smin^(1/rho) + (i-1)/(N-1) (smax^(1/rho) - smin^(1/rho)))^rho, rho = 7
  curriculum      N(k) = min(s0 2^floor(k/K'), s1) + 1,  K' = floor(K / (log2 floor(s1/s0) + 1)),
                  s0 = 10, s1 = 1280, K = --steps (consistency steps, after pre-training)
  index           p(i) ~ erf((ln s_(i+1) - Pm)/(sqrt2 Ps)) - erf((ln s_i - Pm)/(sqrt2 Ps)),
                  i = 1..N-1, Pm = -1.1, Ps = 2
  model           f(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s)),
                  c_skip = sd^2/((s - smin)^2 + sd^2), c_out = sd (s - smin)/sqrt(sd^2 + s^2),
                  c_in = 1/sqrt(s^2 + sd^2), c_noise = 0.25 ln s (networks scale t by 1000
                  inside their sin-cos embedding), sd = sigma_data = 0.5, so f(x, smin) = x
  loss            lambda(s_i) d(f(x + s_(i+1) z, s_(i+1)), stopgrad f(x + s_i z, s_i)),
                  lambda = 1/(s_(i+1) - s_i), d(a, b) = sqrt(||a - b||^2 + c^2) - c,
                  c = 0.00054 sqrt(dim); same z and same dropout randomness in both branches;
                  the teacher is the online network under no_grad (no EMA teacher); EMA
                  (0.99993) is for evaluation only
  sampling        one step x = f(smax z, smax); multistep x <- f(x + sqrt(tau^2 - smin^2) z, tau)

CM-Func pieces ([reconstructed]: the paper's architecture and pre-training are not public):
  - F is common.FuncGenerator (--arch func): DiT features with adaLN-Zero on the noise
    embedding; each patch token gives a code, and the function at coordinate c is a shared
    ReLU MLP of (the code of a nearby patch, Fourier features of c minus that patch's centre),
    the 4 nearest patch functions blended bilinearly (LIIF's local ensemble): one continuous
    function, local enough to cancel pixel-level noise (a function of Fourier features and
    global weights alone kept exactly c_skip(sigma) of the input noise at every sigma). The
    generator's parts are flags (README, the generator study): --inr-head tokens (Trans-INR
    weight tokens modulating the MLP, with LIIF reads of the unpatchified tokens; the
    earlier default), --raw-read (the MLP also reads x at c: a path for the input
    noise to the output, off by default), --no-local-read (tokens head without its map).
  - One function of the coordinates: f(x, s)(c) = c_skip sample_at(x, c) + c_out F(c), the
    skip term through the same bilinear interpolant of x and at the same coordinates as F:
    in training on ANR's jittered "variational coordinates" (one grid per batch, shared by
    student and teacher), at sampling on the pixel-centre grid of any size (where the
    interpolant at the training grid is x itself). For one step c_skip(80) = 4e-5.
  - Pre-training before iCT (--pretrain, --pretrain-epochs: 5 epochs on tiny, 30 on real
    data for --arch func as in the paper; 0 for unet/dit unless asked; EMA reset after it):
    recon (default), the paper's: clean image -> function -> render, L2, the image fed as
    the input of the lowest noise level; or denoise: EDM denoising over iCT's lognormal
    sigmas (not the paper's). The log prints the loss and the denoise MSE at sigma 0.5 next
    to the per-pixel-mean floor. On digits neither changes CM-Func's one step (README).
  - Backbone check, not CM-Func: --pretrain denoise --steps 0 trains a plain EDM denoiser,
    sampled by Euler on its probability-flow ODE (--sampler edm --nfe 100).
  - Multi-step sampling sigmas: two steps (smax, --two-step-sigma 0.821) as in iCT; more
    steps the Karras grid with nfe + 1 points, without smin.
Baselines one flag away: --arch unet (CM-UNet), --arch dit (CM-DiT). Parameter counts are
printed at start; on the tiny preset --arch func --width 72 (0.42M) matches the U-Net (0.43M).
Absent: class-conditional training (labels are ignored); the paper's UViT baseline.

Commands:
  python consistency_func.py                                    # CPU toy: 2-D 8gaussians, MLP, < 1 min
  python consistency_func.py --dataset folder --data-dir IMGS   # CPU tiny: 16x16, func, minutes
  python consistency_func.py --dataset folder --data-dir IMGS --mode sample --sample-res 16,32,64
  python consistency_func.py --dataset folder --data-dir IMGS --mode bench --sample-res 32,64,128
  python consistency_func.py --mode eval --ckpt RUN/ckpt.pt --nfe 1,2   # + one-step samples' correlation
                                                                  # with their own noise (0: global)
  python consistency_func.py --dataset celeba --data-dir data     # CelebA-64, paper: batch 32, 900k
  python consistency_func.py --dataset cifar10 --batch-size 32    # CIFAR-10 (iCT recipe is batch 1024)
  torchrun --standalone --nproc_per_node 8 consistency_func.py --dataset cifar10
  python consistency_func.py --dataset celeba --arch unet         # the CM-UNet baseline
  python consistency_func.py --dataset digits --arch dit --pretrain denoise --pretrain-epochs 64 --steps 0
  python consistency_func.py --mode eval --ckpt RUN/ckpt.pt --sampler edm --nfe 100   # backbone check
"""
import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

import common

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # iCT / EDM noise range
S0, S1 = 10, 1280  # curriculum: discretization steps at the start and the cap
P_MEAN, P_STD = -1.1, 2.0  # lognormal noise-index proposal
HUBER = 0.00054  # c = HUBER * sqrt(dim)

# common.PRESETS plus the method's recipe (command-line flags win): iCT's CIFAR-10 recipe (RAdam 1e-4,
# EMA 0.99993, dropout 0.3, 400k steps, batch 1024; the CM-Func paper: batch 32), the paper's CelebA-64
# run (batch 32, 900k steps). iCT clips no gradients; the 2-D toy clips at norm 1 [reconstructed]: at
# lr 1e-3 unclipped toy runs were chaotic (moons one-step energy 0.02-0.06 clipped vs 0.11-0.79
# unclipped, three seeds). FUNC: the generator's size and pre-training for --arch func (the paper's
# 30 epochs on real data); unet/dit (the baselines) have no pre-training unless asked.
IMAGE_RECIPE = dict(warmup=0, grad_clip=0.0, pretrain="recon", pretrain_epochs=0)
PRESETS = {
    "toy": dict(common.PRESETS["toy"], steps=3000, width=128, batch_size=256, lr=1e-3, ema_decay=0.99,
                grad_clip=1.0, pretrain_epochs=0, inr_width=64, inr_depth=3),
    "tiny": dict(common.PRESETS["tiny"], **IMAGE_RECIPE, lr=1e-3, ema_decay=0.999, inr_width=64,
                 inr_depth=3),
    "cifar10": dict(common.PRESETS["cifar10"], **IMAGE_RECIPE, lr=1e-4, ema_decay=0.99993, dropout=0.3,
                    steps=400_000, batch_size=1024, inr_width=128, inr_depth=4),
    "celeba64": dict(common.PRESETS["celeba64"], **IMAGE_RECIPE, lr=1e-4, ema_decay=0.99993,
                     dropout=0.0, steps=900_000, batch_size=32, inr_width=128, inr_depth=4),
}
FUNC = {"tiny": dict(width=64, depth=4, heads=4, patch=2, pretrain_epochs=5),
        "cifar10": dict(width=384, depth=12, heads=6, patch=2, pretrain_epochs=30),
        "celeba64": dict(width=384, depth=12, heads=6, patch=4, pretrain_epochs=30)}


#################################################################################
#                            iCT: improved consistency training                 #
#################################################################################

def karras_sigmas(N, smin=SIGMA_MIN, smax=SIGMA_MAX, rho=RHO):
    """sigma_1 < ... < sigma_N (float64): the Karras grid, sigma_1 = smin, sigma_N = smax."""
    i = torch.arange(N, dtype=torch.float64)  # i - 1
    return (smin ** (1 / rho) + i / (N - 1) * (smax ** (1 / rho) - smin ** (1 / rho))) ** rho


def num_scales(k, K, s0=S0, s1=S1):
    """iCT curriculum: N(k) = min(s0 2^floor(k/K'), s1) + 1 at consistency step k of K."""
    K_prime = max(1, math.floor(K / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // K_prime), s1) + 1


def index_probs(sigmas, p_mean=P_MEAN, p_std=P_STD):
    """p(i) for i = 1..N-1: the lognormal mass between sigma_i and sigma_(i+1), normalized."""
    cdf = torch.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def pseudo_huber(a, b, c):
    """d(a, b) = sqrt(||a - b||^2 + c^2) - c over each whole sample -> [B]."""
    return ((a - b).float().flatten(1).pow(2).sum(1) + c ** 2).sqrt() - c


class ConsistencyTraining:
    """iCT, generic over the network: images (UNet / DiT / FuncGenerator) or 2-D points (MLP)."""

    def __init__(self, total_steps, sigma_data=0.5, two_step_sigma=0.821):
        self.K, self.sigma_data, self.two_step_sigma = total_steps, sigma_data, two_step_sigma

    def scalings(self, sigma):
        """c_skip, c_out, c_in for sigma [B]; c_skip(smin) = 1 and c_out(smin) = 0 exactly."""
        sd = self.sigma_data
        c_skip = sd ** 2 / ((sigma - SIGMA_MIN) ** 2 + sd ** 2)
        c_out = sd * (sigma - SIGMA_MIN) / (sd ** 2 + sigma ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
        return c_skip, c_out, c_in

    def denoise(self, net, x, sigma, y=None, coords=None):
        """f(x, sigma) = c_skip x + c_out F(c_in x, 0.25 ln sigma). With coords (FuncGenerator),
        both terms are evaluated there: c_skip sample_at(x, coords) + c_out render(coords); the
        bilinear interpolant at the pixel centres is x itself, so coords=None means those."""
        c_skip, c_out, c_in = (c.view(-1, *[1] * (x.ndim - 1)) for c in self.scalings(sigma))
        if coords is None:
            return c_skip * x + c_out * net(c_in * x, 0.25 * sigma.log(), y)
        return (c_skip * common.sample_at(x, coords)
                + c_out * net(c_in * x, 0.25 * sigma.log(), y, coords=coords))

    @staticmethod
    def train_coords(net, x):
        """ANR's jittered pixel-centre grid for a FuncGenerator in training mode (one per
        sample, shared by every branch of a loss); None otherwise (the exact pixel grid)."""
        inner = getattr(net, "module", net)  # DDP
        if isinstance(inner, common.FuncGenerator) and inner.training and inner.jitter:
            return common.pixel_grid(x.shape[-2:], x.device, x.shape[0], jitter=True)
        return None

    def loss(self, net, x, k, y=None):
        """iCT loss at consistency step k: (mean over the batch, logged numbers)."""
        N = num_scales(k, self.K)
        sigmas = karras_sigmas(N)
        i = torch.multinomial(index_probs(sigmas), x.shape[0], replacement=True)  # 0-based i
        sigma_i, sigma_next = (sigmas[j].to(x.device, torch.float32) for j in (i, i + 1))
        z = torch.randn_like(x)  # the same z in both branches
        coords = self.train_coords(net, x)  # the same (jittered) coordinates in both branches
        bshape = (-1, *[1] * (x.ndim - 1))
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            # teacher first; leaving fork_rng restores the RNG, so the student's dropout masks
            # are drawn from the same state
            teacher = self.denoise(net, x + sigma_i.view(bshape) * z, sigma_i, y, coords)
        student = self.denoise(net, x + sigma_next.view(bshape) * z, sigma_next, y, coords)
        weight = (1 / (sigmas[i + 1] - sigmas[i])).to(x.device, torch.float32)  # lambda, float64
        d = pseudo_huber(student, teacher.detach(), HUBER * math.sqrt(x[0].numel()))
        return (weight * d).mean(), {"N": N}

    def sampling_sigmas(self, nfe):
        """tau_1 = smax > tau_2 > ...: two steps use iCT's (smax, 0.821) (--two-step-sigma);
        more steps the first nfe points of the Karras grid of nfe + 1 points, read from the top
        ([reconstructed]: iCT reports only one and two steps)."""
        if nfe == 2:
            return [SIGMA_MAX, self.two_step_sigma]
        return karras_sigmas(nfe + 1).flip(0)[:nfe].tolist()

    @torch.no_grad()
    def sample(self, net, z, nfe=1, y=None, sizes=()):
        """One step x = f(smax z, smax); multistep x <- f(x + sqrt(tau^2 - smin^2) z, tau).
        With `sizes` (FuncGenerator only) the last step's functions are rendered at each
        size: returns (x, {"nfe", "renders": {size: image}})."""
        x, renders, taus = SIGMA_MAX * z, {}, self.sampling_sigmas(nfe)
        for step, tau in enumerate(taus):
            if step > 0:
                x = x + math.sqrt(tau ** 2 - SIGMA_MIN ** 2) * torch.randn_like(x)
            sigma = torch.full((x.shape[0],), tau, device=x.device)
            if step == len(taus) - 1 and sizes:  # f on the pixel centres of every size
                c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in self.scalings(sigma))
                functions, R = net.generate(c_in * x, 0.25 * sigma.log(), y), x.shape[-1]
                for s in sorted(set(sizes) | {R}):
                    grid = common.pixel_grid(s, x.device)
                    skip = x if s == R else common.sample_at(x, grid)  # one interpolant of x
                    renders[s] = c_skip * skip + c_out * net.render(functions, coords=grid)
                x = renders[R]
            else:
                x = self.denoise(net, x, sigma, y)
        return x, {"nfe": len(taus), "renders": renders}

    @torch.no_grad()
    def sample_ode(self, net, z, nfe, y=None):
        """--sampler edm: Euler on EDM's probability-flow ODE dx/dsigma = (x - f(x, sigma)) /
        sigma, with f as the denoiser, over the Karras grid of nfe + 1 points from smax to smin:
        x <- x + (s' - s)(x - f(x, s)) / s, nfe network calls (f(x, smin) = x ends it). For a
        network trained as a denoiser (--pretrain denoise --steps 0: the backbone check); on a
        consistency model it is not what iCT samples with."""
        sigmas, x = karras_sigmas(nfe + 1).flip(0).tolist(), SIGMA_MAX * z
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            d = self.denoise(net, x, torch.full((x.shape[0],), s, device=x.device), y)
            x = x + (s_next - s) * (x - d) / s
        return x, {"nfe": nfe}


def pretrain_loss(net, x, method, kind):
    """Pre-training before iCT (--pretrain, --pretrain-epochs), both on iCT's (jittered) grid:
    recon    the CM-Func paper's [reconstructed]: clean image -> network -> its function
             rendered -> L2 to the image. The clean image is the input of the lowest noise
             level (c_in(smin) x, c_noise(smin)) and the raw network F is trained: f(x, smin)
             = x whatever F is, so the level is free for it.
    denoise  [reconstructed, not the paper's] EDM denoising over iCT's lognormal sigmas
             (Pm, Ps), clamped to [5 smin, smax] where c_out > 0, weighted by 1/c_out^2:
             ||F(c_in x_s) - (x - c_skip x_s)/c_out||^2 = ||f(x_s, s) - x||^2 / c_out^2.
             Run alone (--steps 0) it trains a plain EDM denoiser: the backbone check,
             sampled with --sampler edm."""
    coords, bshape = method.train_coords(net, x), (-1, *[1] * (x.ndim - 1))
    target = x if coords is None else common.sample_at(x, coords)
    kw = {} if coords is None else {"coords": coords}
    if kind == "recon":
        sigma = torch.full((x.shape[0],), SIGMA_MIN, device=x.device)
        c_in = method.scalings(sigma)[2].view(bshape)
        return (net(c_in * x, 0.25 * sigma.log(), None, **kw).float() - target).pow(2).mean(), {}
    sigma = (P_MEAN + P_STD * torch.randn(x.shape[0], device=x.device)).exp()
    sigma = sigma.clamp(5 * SIGMA_MIN, SIGMA_MAX)
    z = torch.randn_like(x)
    out = method.denoise(net, x + sigma.view(bshape) * z, sigma, coords=coords)
    c_out = method.scalings(sigma)[1].view(bshape)
    return ((out.float() - target) / c_out).pow(2).mean(), {}


@torch.no_grad()
def denoise_mse(net, x, method, sigma=0.5):
    """The warm start's progress: ||f(x + sigma z, sigma) - x||^2 per pixel at sigma =
    sigma_data, on a fixed noise draw (own RNG: training draws are untouched)."""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(0)
        s = torch.full((x.shape[0],), sigma, device=x.device)
        return (method.denoise(net, x + sigma * torch.randn_like(x), s) - x).pow(2).mean().item()


@torch.no_grad()
def noise_correlation(net, method, shape, n=500, batch=250, device="cpu"):
    """Mean Pearson correlation between each one-step sample f(smax z, smax) and its own noise
    z (seeded, own RNG): near 0 for a model that turns noise into images globally, near 1 for
    one that passes the noise through pixel by pixel (how CM-Func fails at small budgets)."""
    g, corr = torch.Generator(device).manual_seed(0), []
    for i in range(0, n, batch):
        z = torch.randn(min(batch, n - i), *shape, generator=g, device=device)
        a, b = (v.float().flatten(1) for v in (method.sample(net, z, 1)[0], z))
        corr.append(F.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)))
    return torch.cat(corr).mean().item()


#################################################################################
#                                 Training loop                                 #
#################################################################################

def train(args, run, data, net, method, sample):
    ema = common.EMA(net, args.ema_decay)
    opt = torch.optim.RAdam(net.parameters(), lr=args.lr)  # iCT: RAdam
    batches = common.ResumableBatches(data, run.local_batch, run, args.seed, 0, args.workers)
    # global step = pre-training steps, then the K = --steps consistency steps
    pretrain = round(args.pretrain_epochs * batches.per_epoch)
    start, ckpt, _ = run.resume(pretrain + args.steps, net=net, ema=ema, opt=opt)
    was = (ckpt or {}).get("config", {}).get("steps", args.steps)
    if was != args.steps and start > pretrain:  # K = --steps is the length of iCT's curriculum N(k)
        run.print(f"--steps {args.steps}, the checkpoint's run had {was}: iCT's curriculum N(k) "
                  f"follows K = {args.steps} from consistency step {start - pretrain} on (N jumps there)")
    batches.step = start  # the data stream goes on where the checkpoint stopped
    model = run.wrap(net)
    if pretrain:
        ref = torch.stack([data.dataset[i][0] for i in range(min(len(data), 1000))])
        floor = (ref - ref.mean(0)).pow(2).mean().item()  # MSE of the per-pixel data mean
        done = f"; done: resumed at consistency step {start - pretrain} of {args.steps}" if start >= pretrain else ""
        run.print(f"{args.pretrain} pre-training: {pretrain} steps ({args.pretrain_epochs} epochs); "
                  f"per-pixel-mean floor {floor:.4f}{done}")
    if start == pretrain + args.steps == 0:  # --steps 0: keep the initial weights as a baseline
        run.save(0, net=net, ema=ema, opt=opt)
    stream = iter(batches)
    fn = common.sampler(sample, ema.model, data, run)  # for --sample-every / --eval-every
    for step in range(start, pretrain + args.steps):
        if step == pretrain and pretrain:
            ema.model.load_state_dict(net.state_dict())  # EMA starts at the pre-trained net
        x, _, _ = next(stream)
        if args.hflip and data.is_image:
            x = common.random_hflip(x)
        with run.autocast:
            if step < pretrain:
                loss, logs = pretrain_loss(model, x, method, args.pretrain)
            else:
                loss, logs = method.loss(model, x, step - pretrain)
        common.optimize(opt, loss, net, args, step)
        ema.update(net, step - pretrain if step >= pretrain else step)  # warm-up restarts
        if step >= pretrain:
            run.log(step + 1 - pretrain, loss, **logs)
        elif run.progress_due(step + 1, pretrain):
            if not torch.isfinite(loss):
                raise common.UserError(f"pre-training loss is {loss.item()} at step "
                                       f"{step + 1}: lower --lr or use --amp fp32")
            run.print(f"pretrain step {step + 1}/{pretrain} | epoch {batches.epoch} | loss "
                      f"{loss.item():.4f} | denoise MSE at sigma 0.5 {denoise_mse(net, x, method):.4f} "
                      f"(per-pixel-mean floor {floor:.4f})")
        if run.due(step + 1, args.ckpt_every) or step + 1 in (pretrain, pretrain + args.steps):
            run.save(step + 1, net=net, ema=ema, opt=opt)
        if run.master and step >= pretrain and run.due(step + 1 - pretrain, args.sample_every):
            common.write_samples(args, data, fn, run)
        if run.master and step >= pretrain and run.due(step + 1 - pretrain, args.eval_every):
            common.evaluate(args, run, data, fn)
    return ema


#################################################################################
#                       Any resolution: renders and speed                        #
#################################################################################

def write_multires(args, run, data, net, method):
    """--mode sample --sample-res: render the same functions at several sizes, plus a figure
    of a 4x render against bilinear upsampling of the training-resolution render."""
    R, n, nfe = data.shape[-1], min(args.n, args.batch_size), args.nfe_list[0]
    sizes = sorted(set(args.sample_res) | {R, 4 * R})
    x, info = method.sample(net, torch.randn(n, *data.shape, device=run.device), nfe, sizes=sizes)
    for s in args.sample_res:
        common.export_samples(os.path.join(args.samples_out, f"res{s}.npz"), info["renders"][s], nfe)
        common.save_image_grid(info["renders"][s], os.path.join(args.samples_out, f"res{s}.png"))
    k = min(n, 8)
    bilinear = F.interpolate(x[:k], scale_factor=4, mode="bilinear")
    path = os.path.join(args.samples_out, "render4x_vs_bilinear.png")
    common.save_image_grid(torch.cat([bilinear, info["renders"][4 * R][:k]]).clamp(-1, 1), path, nrow=k)
    pooled = F.avg_pool2d(info["renders"][4 * R], 4)
    run.print(f"wrote {n} samples (NFE {nfe}) at {args.sample_res} to {args.samples_out}; {path}: "
              f"top bilinear x4, bottom INR render x4; |avgpool(render 4x) - render 1x| mean "
              f"{(pooled - x).abs().mean().item():.4f}")


def bench_multires(args, run, data, net, method):
    """Images/s for producing every sample at all --sample-res sizes. func: one generation,
    one render per size. unet/dit: one model per resolution, one generation each."""
    n, sizes = args.batch_size, args.sample_res
    z = torch.randn(n, *data.shape, device=run.device)
    if args.arch == "func":
        fns = [lambda: method.sample(net, z, 1, sizes=sizes)]
    else:
        fns = []
        for s in sizes:
            a = argparse.Namespace(**{**vars(args), "image_size": s})  # same flags, --image-size s
            other = common.build_net(a, (data.shape[0], s, s)).to(run.device).eval()
            zs = torch.randn(n, data.shape[0], s, s, device=run.device)
            fns.append(lambda other=other, zs=zs: method.sample(other, zs, 1))
    for fn in fns:  # warm-up
        fn()
    t0 = time.perf_counter()
    for fn in fns:
        fn()
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t0)
    run.print(f"bench multires {args.arch} ({common.count_params(net) / 1e6:.2f}M params): "
              f"{rate:.1f} images/s with every sample at {','.join(map(str, sizes))} (batch {n}, 1 step)")
    return rate


#################################################################################
#                                      CLI                                      #
#################################################################################

# this script's entries of common.FLAG_RANGES and common.APPLIES (checked before any work)
RANGES = {"pretrain_epochs": "[0, inf)", "two_step_sigma": f"({SIGMA_MIN}, {SIGMA_MAX})",
          "sigma_data": "(0, inf)", "inr_width": "[1, inf)", "inr_depth": "[2, inf)"}
FUNC_ARCH = (lambda a: a.arch == "func", "--arch func (the INR generator)")
# what a --arch func checkpoint written before --inr-head existed holds (the earlier generator)
OLD_DEFAULTS = (lambda config: {"inr_head": "tokens", "raw_read": True, "local_read": True}
                if config.get("arch") == "func" and "inr_head" not in config else {})
APPLIES = {**dict.fromkeys(["inr_width", "inr_depth", "inr_head", "raw_read"], FUNC_ARCH),
           "local_read": (lambda a: a.arch == "func" and a.inr_head == "tokens",
                          "--arch func --inr-head tokens"),
           "jitter": [common.TRAINING_STEPS, FUNC_ARCH],  # a network in eval mode samples on the exact grid
           **dict.fromkeys(["pretrain", "pretrain_epochs"],
                           [common.TRAINING, (lambda a: a.is_image, "images")]),
           "two_step_sigma": (lambda a: a.sampler == "cm" and (a.mode == "train" or 2 in a.nfe_list),
                              "two-step sampling (--nfe with 2, --sampler cm), or training (the checkpoint "
                              "keeps it as its default)"),
           "sample_res": (lambda a: a.is_image and a.mode in ("sample", "bench") and a.sampler == "cm",
                          "images in --mode sample or bench, with iCT's sampler (--sampler cm)"),
           **dict.fromkeys(["ckpt", "weights"], (lambda a: a.mode != "train", "sampling, evaluation and bench"))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("consistency_func.py (the common flags follow)")
    group.add_argument("--pretrain", choices=["recon", "denoise"], default=None,
                        help="pre-training before iCT: recon (the paper's: image -> its function; "
                        "default for --arch func) or denoise (EDM denoising; not the paper's)")
    group.add_argument("--pretrain-epochs", type=float, default=None,
                        help="pre-training epochs (default 5 on tiny, 30 on CIFAR-10/CelebA for "
                        "--arch func; 0 for unet/dit); with --steps 0 --pretrain denoise: a denoiser")
    group.add_argument("--sampler", choices=["cm", "edm"], default="cm",
                        help="cm: iCT's one/multistep sampler; edm: Euler on the probability-flow "
                        "ODE of the network as a denoiser (for --pretrain denoise --steps 0)")
    group.add_argument("--two-step-sigma", type=float, default=0.821,
                        help="the second sigma of two-step sampling (iCT: 0.821)")
    group.add_argument("--sigma-data", type=float, default=None,
                        help="data std in the scalings (default 0.5 for images as in iCT; "
                        "for 2-D data the training set's std [reconstructed])")
    group.add_argument("--inr-width", type=int, default=None, help="hidden width of the INR")
    group.add_argument("--inr-depth", type=int, default=None, help="linear layers of the INR")
    group.add_argument("--inr-head", choices=["tokens", "patch"], default="patch",
                        help="--arch func's head: patch (LIIF: a code per patch token, the 4 nearest "
                        "patch functions blended bilinearly; default) or tokens (Trans-INR weight tokens)")
    group.add_argument("--raw-read", action=argparse.BooleanOptionalAction, default=False,
                        help="--arch func: the function also reads the noisy input x at each coordinate "
                        "(a path for the noise to the output; off by default)")
    group.add_argument("--local-read", action=argparse.BooleanOptionalAction, default=True,
                        help="--arch func --inr-head tokens: the function reads the unpatchified "
                        "token features at each coordinate (LIIF-style)")
    group.add_argument("--jitter", action=argparse.BooleanOptionalAction, default=True,
                        help="variational (jittered) coordinates when training --arch func")
    group.add_argument("--sample-res", default=None,
                        help="comma list of render sizes for --mode sample/bench (func: any)")
    func_presets = {k: dict(v, arch="func", **FUNC[k]) if k in FUNC else v for k, v in PRESETS.items()}
    common.add_common_args(parser, presets=func_presets)  # --help lists the default, --arch func
    parser.epilog += "\n  --arch unet: " + "; ".join(f"{k} --width {PRESETS[k]['width']} --depth {PRESETS[k]['depth']}"
                                                    for k in FUNC)
    parser.set_defaults(grad_clip=None, nfe="1,2")  # from the preset: 0 on images (iCT), 1 on 2-D
    args = common.parse_args(parser, argv, old_defaults=OLD_DEFAULTS)
    presets = func_presets if args.arch in (None, "func") else PRESETS  # func: the default for images
    args = common.finish_args(args, presets, method="cm", default_nfe="1,2", name="consistency_func",
                              archs=common.ARCHS, no_rk45="a consistency model has no ODE to solve; "
                              "--nfe is the number of model steps (1 or more)", ranges=RANGES, applies=APPLIES)
    R = args.image_size
    try:
        args.sample_res = [int(s) for s in (args.sample_res or str(R)).split(",")] if R else []
    except ValueError:
        raise common.UserError(f"--sample-res '{args.sample_res}': use sizes like 32,64,128") from None
    if min(args.sample_res, default=1) < 1:
        raise common.UserError(f"--sample-res {args.sample_res}: sizes must be positive, e.g. 32,64")
    if args.is_image and args.arch != "func" and args.mode == "sample" and set(args.sample_res) != {R}:
        raise common.UserError(f"--arch {args.arch} samples only at its training size {R}; "
                               "rendering other sizes needs --arch func")
    run = common.Run(args, OLD_DEFAULTS)
    if args.mode in ("sample", "bench") and args.is_image:  # renders: B x s x s x (INR or net width) floats
        pixels = min(args.n, args.batch_size) * max(args.sample_res) ** 2
        common.check_fits(4 * pixels * (args.inr_width if args.arch == "func" else args.width), run.device,
                          "--sample-res", "lower it (or --n)")
    data = common.load_data(args)
    net = (common.FuncGenerator(*data.shape[:2], args.patch, args.width, args.depth, args.heads, args.dropout,
                                inr_width=args.inr_width, inr_depth=args.inr_depth, head=args.inr_head,
                                raw=args.raw_read, local=args.local_read)
           if args.arch == "func" else common.build_net(args, data.shape)).to(run.device)
    net.jitter = args.jitter
    run.print(f"consistency_func: {args.arch} with {common.count_params(net) / 1e6:.3f}M parameters")
    if args.sigma_data is None:
        args.sigma_data = 0.5 if data.is_image else data.x.std().item()
    method = ConsistencyTraining(args.steps, args.sigma_data, args.two_step_sigma)
    if args.mode != "train" and (args.mode != "bench" or os.path.isfile(args.ckpt)):
        common.load_weights(net, args.ckpt, args.weights)  # EMA by default
    sample = method.sample_ode if args.sampler == "edm" else method.sample  # iCT's, or the denoiser's ODE
    fn = common.sampler(sample, net.train(args.mode == "train"), data, run)  # eval mode unless training
    if args.mode == "train":
        train(args, run, data, net, method, sample)
    elif args.mode == "sample":
        common.write_samples(args, data, fn, run)
        if args.arch == "func" and args.sampler == "cm":  # renders come from iCT's sampler
            write_multires(args, run, data, net, method)
    elif args.mode == "eval":
        common.evaluate(args, run, data, fn)
        if args.is_image:
            run.print(f"one-step samples vs their own noise: mean correlation "
                      f"{noise_correlation(net, method, data.shape, device=run.device):.3f}")
    elif args.mode == "bench":
        opt = torch.optim.RAdam(net.parameters(), lr=args.lr)
        x = torch.randn(args.batch_size, *data.shape, device=run.device)

        def train_step():
            net.train()
            with run.autocast:
                loss, _ = method.loss(net, x, 0)
            common.optimize(opt, loss, net, args, 0)
            net.eval()
        common.benchmark(run, train_step, fn, args.nfe_list, args.batch_size)
        if args.is_image:
            bench_multires(args, run, data, net, method)
    run.close()


if __name__ == "__main__":
    common.run_cli(main)
