"""
Integration Flow Models (ICLR 2025 submission), built on Directly Denoising Diffusion
Models (DDDM, Zhang et al. 2024, code: TheLuoFengLab/DDDM). No code of the paper is public;
this is a reconstruction from the DDDM code and the paper's OpenReview page.

Idea: learn the *result* of integrating the probability-flow ODE from x_t back to the data,
x1 = G(x_t, t, anchor), in one network call. The anchor is the model's own earlier estimate
of x1 for the same training example, kept in a bank with one slot per example; at sampling
time the fixed point x1 = G(x_T, T, x1) is sought by iterating the anchor from noise.

Notation as in every script here: x1 = data, x0 = noise ~ N(0, I) (DDPM's and DDDM's x0 is our x1).
Time conventions (one per --ode; the network gets t_net in [0, 1], it multiplies by 1000):
  vp  discrete DDPM steps n = 0..N-1 (N = --vp-steps 1000, linear or cosine betas):
      x_t = sqrt(abar_n) x1 + sqrt(1 - abar_n) x0;  t_net = n / N;  sampling starts at n = N-1
      (2-D), or, as DDDM's image sampler does, at n = N: x_T = x0, t_net = 1, one past the
      last trained index.
  ve  sigma = smin (smax/smin)^u, u ~ U[0, 1] (continuous form of DDDM's geometric grid),
      smin 0.01, smax 50:  x_t = x1 + sigma x0;  t_net = u = ln(sigma/smin) / ln(smax/smin).
  rf  our flow time, t = 0 noise, t = 1 data: x_t = t x1 + (1 - t) x0, t ~ U[0, 1); t_net = t.
Parameterizations (out = estimate of x1, F = network output; --param paper):
  vp  out = x_t - F                                   (DDDM; no exact boundary on a discrete grid)
  ve  out = k x_t + (1 - k) F, k = smin / sigma       (out = x_t exactly at sigma = smin)
  rf  out = x_t + (1 - t) F  [reconstructed]          (F = average velocity; out = x_t at t = 1)
  --param residual uses out = x_t - F for all three (ablation).
Anchor input (--anchor-input): xattn is DDDM's (unet.py, use_CA): x_t alone is the input; the
anchor enters only as cross-attention context, a 1x1 conv of the full-resolution anchor
flattened to H*W tokens with no position embedding, at the attention resolutions and the
middle block, so the network cannot copy the anchor pixel by pixel (common.CrossAttnBlock, one
after each self-attention block; DDDM's SpatialTransformer also has a feed-forward, omitted).
Default for --arch unet. concat (the deviation; default for mlp and dit) appends the anchor
as input channels, which makes copying it trivial. A 2-D point has no pixels and no tokens:
there is no analogue of xattn for --arch mlp (a "position-free" 2-D anchor, its coordinates
as two unordered tokens, was tried and did not help); --arch dit has no cross-attention here.

Training (DDDM Algorithm 1):
  bank[i] ~ N(0, I) for every training example i (GLOBAL dataset index)
  w = 1 / (epoch + 1)                                 (--w-schedule inv-epoch; or const --w)
  L = mean_i  w d(out_i, x1_i) + (1 - w) d(out_i, anchor_i)     anchor_i = bank[i], no gradient
  bank[i] <- out_i.detach()     --bank-update output: the paper's text (Algorithm 1).
  bank[i] <- x1_i               --bank-update data: the released code (train_util.py writes the
        clean batch; the output write is commented out in gaussian_diffusion.py). This bank is
        x1 after one epoch; the output bank converges to about x1 too (toy: mean ||bank_i - x1_i||
        0.07-0.14), and the two give the same numbers (README). Neither leaks the answer.
  --bank-update none trains plain x1 regression with a zero anchor (the baseline).
  --bank-update self [NOT the paper's method: the reviewers' suggestion, "why shouldn't x-hat be
        sampled independently for all new pairs, and the iterative update be done until
        convergence?"]: no bank; every pair gets, drawn fresh, the anchor the sampler would give it
        from the same noisy point x_t: a_0 ~ N(0, I), a_(k+1) = sg(G(x_t, t, a_k)) for k < K
        (--anchor-iters; the online network, clamped to [-1, 1] for images as the sampler does),
        anchor_i = a_K. At t = T this is the sampler's anchor at its (K+1)-th call; at t < T the
        same iteration from x_t (the sampler never runs it there). The anchor never comes from
        the example's bank slot or from x1; logs['anchor_change'] is ||a_K - a_(K-1)||.
  d = pseudo-Huber sqrt(||a - b||^2 + c^2) - c over the whole sample, c = --huber-c sqrt(dim)
      [reconstructed: DDDM applies it per element with c = 1.4e-4, close to L1], or l2
      (mean squared error). Only L2's minimizer is the conditional mean: for L2 the optimum is
      out = w E[x1 | x_t, anchor] + (1 - w) anchor; pseudo-Huber / L1 give a median-like point.
Sampling: x_T = sigma_T x0, anchor ~ N(0, I); K = --nfe times: anchor <- G(x_T, T, anchor),
  clamped to [-1, 1] after every iteration for images (as DDDM). K = 1 is one step (DDDM
  Algorithm 2). The released sampler passes (x_bar, T) in swapped positions and arguments its
  functions do not accept, so it crashes: a real bug, not copied.
  --sampler renoise [not in the paper: a consistency-model style extension, labeled]: step k
  re-noises the current estimate to the k-th of K levels from T down and denoises it again.
Convergence (the reviewers' question): mean ||a_new - a_old|| per epoch (training, kept in the
checkpoint) and per sampling iteration; both plotted to <out-dir>/anchor_convergence.png.
The answer (README): the bank converges to about x1. At t = T, x_T carries no information on
x1, so the regression target is the mean of the data or a copy of the anchor; as the anchors
seen in training become data (w -> 0), it learns to return its anchor, and a random N(0, I)
anchor at sampling comes back about unchanged.
--bank-update self answers the reviewers' other question (README, toy and digits): drawn fresh,
the anchor carries nothing about x1 beyond x_t, so for L2 the optimum is G(x_t, t, a) =
w E[x1 | x_t] + (1 - w) a, whose one fixed point is plain regression's E[x1 | x_t]. The sampler's iteration then
converges (the banks' diverges), to x_T (K = 1: out = x_t zeroes the anchor term, and the data
term fades with w) or, with larger K or w, to E[x1 | x_T], the data mean: it does not generate.
On digits it does not either: seed by seed, one fixed image or a drifting copy of the anchor.

Commands:
  python integration_flow.py                                   # CPU toy, 8 gaussians, ~1 min
  python integration_flow.py --bank-update none                # plain x1-regression baseline
  python integration_flow.py --bank-update self --anchor-iters 1   # the reviewers' suggestion
  python integration_flow.py --mode sample --nfe 1,2,4,8       # scatter plots in runs/.../samples
  python integration_flow.py --mode bench                      # step time vs a plain RF step
  python integration_flow.py --dataset digits                  # 16x16 digits, anchor by cross-attention
  python integration_flow.py --dataset digits --anchor-input concat   # anchor as input channels
  python integration_flow.py --dataset cifar10 --data-dir data # the cifar10 preset below
  torchrun --nproc_per_node 8 integration_flow.py --dataset cifar10 --data-dir data
  python integration_flow.py --dataset cifar10 --mode eval --nfe 1,2 --fid-n 50000
CIFAR-10 recipe [reconstructed from the DDDM scripts, the paper's is not public]: VE,
pseudo-Huber, 35.7M U-Net with 3 res-blocks per level, dropout 0.3, Adam 1e-4, batch 128,
EMA 0.9999, 800k steps (~2000 epochs); float32 bank on the device (--bank-dtype float16 halves it).
"""
import argparse
import math
import os

import torch

import common

# common.PRESETS plus this method's recipe (command-line flags win): VE and pseudo-Huber for
# images, the flow ODE and L2 for 2-D; CIFAR-10 from the DDDM scripts [reconstructed].
PRESETS = {
    "toy": dict(common.PRESETS["toy"], steps=3000, ode="rf", distance="l2"),
    "tiny": dict(common.PRESETS["tiny"], ode="ve", distance="pseudo-huber"),
    "cifar10": dict(common.PRESETS["cifar10"], ode="ve", distance="pseudo-huber", depth=3, dropout=0.3,
                    lr=1e-4, attn_res=(16, 8)),
    "celeba64": dict(common.PRESETS["celeba64"], ode="ve", distance="pseudo-huber"),
}


#################################################################################
#                                    Method                                     #
#################################################################################

class IntegrationFlow:
    """Forward processes, parameterizations, loss and anchor-iteration sampler, generic over
    a network called net(x, t_net, extra=anchor). `time` below is n (vp), sigma (ve) or t (rf)."""

    def __init__(self, ode="rf", param="paper", distance="l2", huber_c=0.00054,
                 bank_update="output", vp_steps=1000, vp_schedule="linear", vp_betas=(1e-4, 0.02),
                 sigma_min=0.01, sigma_max=50.0, sigma_data=0.5, anchor_input="concat",
                 sampler="anchor", images=False, anchor_iters=1):
        self.ode, self.param, self.distance, self.huber_c = ode, param, distance, huber_c
        self.anchor_input, self.sampler, self.images = anchor_input, sampler, images
        self.bank_update, self.N, self.anchor_iters = bank_update, vp_steps, anchor_iters
        self.smin, self.smax, self.sigma_data = sigma_min, sigma_max, sigma_data
        if vp_schedule == "linear":  # DDPM betas, scaled so any N gives the same process
            scale = 1000 / vp_steps
            betas = torch.linspace(scale * vp_betas[0], scale * vp_betas[1], vp_steps, dtype=torch.float64)
        else:  # cosine schedule (Nichol & Dhariwal), betas clipped at 0.999
            f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = torch.tensor([min(1 - f((n + 1) / vp_steps) / f(n / vp_steps), 0.999)
                                  for n in range(vp_steps)], dtype=torch.float64)
        self.abar = torch.cumprod(1 - betas, 0)  # abar_n, n = 0..N-1

    # ---- forward processes -----------------------------------------------------------
    def sample_time(self, B, device):
        u = torch.rand(B, device=device)
        if self.ode == "vp":
            return torch.randint(0, self.N, (B,), device=device).float()
        return self.smin * (self.smax / self.smin) ** u if self.ode == "ve" else u

    def level(self, s, B, device):
        """The time at noise fraction s (1 = where sampling starts, 0 = data)."""
        s = torch.full((B,), float(s), device=device)
        if self.ode == "vp":
            return (s * (self.N - 1)).round()
        return self.smin * (self.smax / self.smin) ** s if self.ode == "ve" else 1 - s

    def coeffs(self, time, ndim):
        """(alpha, sigma) with x_t = alpha x1 + sigma x0, shaped to broadcast over data."""
        if self.ode == "vp":
            abar = torch.cat([self.abar, self.abar.new_zeros(1)])  # abar_N = 0: DDDM's sampling start
            abar = abar.to(time.device)[time.long()].float()
            alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        elif self.ode == "ve":
            alpha, sigma = torch.ones_like(time), time
        else:
            alpha, sigma = time, 1 - time
        view = (-1,) + (1,) * (ndim - 1)
        return alpha.view(view), sigma.view(view)

    def net_time(self, time):
        if self.ode == "vp":
            return time / self.N
        return torch.log(time / self.smin) / math.log(self.smax / self.smin) if self.ode == "ve" else time

    # ---- parameterization: out = estimate of x1 -------------------------------------------
    def denoise(self, net, x_t, time, anchor):
        """out = param(x_t, t, F(c_in x_t, t_net, anchor)); see the module docstring."""
        alpha, sigma = self.coeffs(time, x_t.ndim)
        c_in = 1 / (sigma ** 2 + self.sigma_data ** 2).sqrt() if self.ode == "ve" else 1.0
        a = {"context" if self.anchor_input == "xattn" else "extra": anchor}
        F = net(c_in * x_t, self.net_time(time), **a)  # [reconstructed] VE input scaling
        if self.param == "residual" or self.ode == "vp":
            return x_t - F
        if self.ode == "ve":
            k = self.smin / sigma  # k = 1 at sigma_min: boundary condition out = x_t
            return k * x_t + (1 - k) * F
        return x_t + (1 - alpha) * F  # rf: alpha = t; out = x_t at t = 1

    def d(self, a, b):
        """Per-sample distance [B]."""
        diff = (a.float() - b.float()).flatten(1)
        if self.distance == "l2":
            return diff.pow(2).mean(1)
        c = self.huber_c * math.sqrt(diff.shape[1])
        return (diff.pow(2).sum(1) + c * c).sqrt() - c

    # ---- the anchor iteration a <- G(x_t, t, a): Algorithm 2's step, and --bank-update self's -----
    def anchor_step(self, net, x_t, time, a, images):
        """G(x_t, t, a), clamped to [-1, 1] for images after every iteration (as DDDM samples)."""
        new = self.denoise(net, x_t, time, a).float()
        return new.clamp(-1, 1) if images else new

    @torch.no_grad()
    def sampler_anchor(self, net, x_t, time):
        """--bank-update self [the reviewers' suggestion, not the paper's]: the anchor the sampler
        would give this pair, from the same (x_t, t): a_0 ~ N(0, I), then K = anchor_iters
        stop-gradient iterations. Returns (a_K, ||a_K - a_(K-1)|| per example)."""
        a = torch.randn_like(x_t)  # drawn only by this variant: the others' draws are unchanged
        for _ in range(self.anchor_iters):
            previous, a = a, self.anchor_step(net, x_t, time, a, self.images)
        return a, (a - previous).flatten(1).norm(dim=1)

    # ---- Algorithm 1 (one step of it: read the anchors, loss, write the bank) ---------------
    def loss(self, net, x1, idx, bank, w, hflip=False):
        """L = mean(w d(out, x1) + (1 - w) d(out, anchor)), anchor = bank[idx] (the batch's global
        indices; bank None: --bank-update none); then bank[idx] <- out (or x1, --bank-update data).
        --bank-update self keeps no bank (one passed is ignored): anchor = sampler_anchor(x_t, t).
        hflip flips images and their anchors with one mask (the bank stays unflipped). Used by
        train, bench and toy2d.py. Returns (loss, logs), logs['anchor_change'] ||new - old||."""
        bank = bank if self.bank_update in BANKS else None
        anchor = bank.read(idx) if bank is not None else torch.zeros_like(x1)
        flip = torch.rand(x1.shape[0], 1, 1, 1, device=x1.device) < 0.5 if hflip else None
        if flip is not None:
            x1, anchor = torch.where(flip, x1.flip(3), x1), torch.where(flip, anchor.flip(3), anchor)
        time = self.sample_time(x1.shape[0], x1.device)
        alpha, sigma = self.coeffs(time, x1.ndim)
        x_t = alpha * x1 + sigma * torch.randn_like(x1)
        if self.bank_update == "none":  # plain x1 regression: zero anchor, w = 1
            anchor, w = torch.zeros_like(x1), 1.0
        elif self.bank_update == "self":  # drawn fresh for this pair, from its x_t
            anchor, change = self.sampler_anchor(net, x_t, time)
        out = self.denoise(net, x_t, time, anchor.to(x1.dtype))
        d_data, d_anchor = self.d(out, x1).mean(), self.d(out, anchor).mean()
        loss = w * d_data + (1 - w) * d_anchor
        logs = {"d_data": d_data.detach(), "d_anchor": d_anchor.detach(), "w": torch.tensor(w)}
        if bank is not None:
            new = out.detach().float() if self.bank_update == "output" else x1.float()
            logs["anchor_change"] = bank.write(idx, torch.where(flip, new.flip(3), new) if hflip else new)
        elif self.bank_update == "self":
            logs["anchor_change"] = change
        return loss, logs

    # ---- Algorithm 2: anchor iteration (and the labeled re-noising extension) ------------
    @torch.no_grad()
    def sample(self, net, x0, nfe=1, anchor=None, sampler=None, images=None):
        """x_T = sigma_T x0; K = nfe anchor iterations a <- G(x_T, T, a). Returns (x1, info) with
        info['change'] = [mean ||a_new - a_old|| per iteration] (a float per iteration).
        images=True follows DDDM's image sampler: clamp to [-1, 1] after every iteration, and
        VP starts at n = N (x_T = x0, t_net = 1; one past the last trained index, as released).
        sampler and images default to the method's (--sampler; the data)."""
        sampler, images = sampler or self.sampler, self.images if images is None else images
        B, dev = x0.shape[0], x0.device
        time = self.level(1.0, B, dev)
        if self.ode == "vp" and images:
            time = torch.full((B,), float(self.N), device=dev)
        x_T = self.coeffs(time, x0.ndim)[1] * x0
        free = self.bank_update == "none"
        a = torch.zeros_like(x0) if free else (torch.randn_like(x0) if anchor is None else anchor)
        if free and sampler == "anchor":
            nfe = 1  # the anchor-free model ignores the anchor: more iterations change nothing
        changes = []
        for k in range(nfe):
            x_t = x_T
            if sampler == "renoise" and k > 0:  # re-noise the estimate to level (K - k) / K
                time = self.level(1 - k / nfe, B, dev)
                alpha, sigma = self.coeffs(time, x0.ndim)
                x_t = alpha * a + sigma * torch.randn_like(x0)
            new = self.anchor_step(net, x_t, time, torch.zeros_like(x0) if free else a, images)
            changes.append((new - a).flatten(1).norm(dim=1).mean().item())
            a = new
        return a, {"nfe": nfe, "change": changes}


BANKS = ("output", "data")  # the --bank-update rules that keep a bank (self and none keep none)


class AnchorBank:
    """One anchor per training example, indexed by the global dataset index, initialized
    N(0, I) from --seed (identical on every rank). Under DDP, write() all-gathers the
    (index, out) pairs of every rank so every rank's copy stays identical."""

    def __init__(self, n, shape, dtype=torch.float32, device="cpu", seed=0):
        g = torch.Generator().manual_seed(seed)
        self.anchors = torch.randn(n, *shape, generator=g).to(device=device, dtype=dtype)

    def read(self, idx):
        return self.anchors[idx].float()  # a copy: no gradient, never aliases the bank

    @torch.no_grad()
    def write(self, idx, new):
        """bank[idx] <- new (detached); returns ||new - old|| per written example [B * world]."""
        new = new.detach().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            idxs, news = [torch.empty_like(idx) for _ in range(world)], [torch.empty_like(new) for _ in range(world)]
            torch.distributed.all_gather(idxs, idx)
            torch.distributed.all_gather(news, new)
            idx, new = torch.cat(idxs), torch.cat(news)
        change = (new - self.anchors[idx].float()).flatten(1).norm(dim=1)
        self.anchors[idx] = new.to(self.anchors.dtype)
        return change

    def check_consistent(self):
        """Raise if the ranks' copies differ (cheap checksum, called at checkpoints)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        a = self.anchors.float().flatten(1)
        weights = torch.arange(1, len(a) + 1, device=a.device, dtype=torch.float64)
        s = torch.stack([a.sum().double(), (a.sum(1).double() * weights).sum()])
        lo, hi = s.clone(), s.clone()
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError("anchor banks differ between ranks: this is a bug, please report it")


#################################################################################
#                                 Training loop                                 #
#################################################################################

def train(args, run, data, net, method):
    ema = common.EMA(net, args.ema_decay)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    bank = None
    if method.bank_update in BANKS:
        dtype = torch.float16 if args.bank_dtype == "float16" else torch.float32
        bank = AnchorBank(len(data), data.shape, dtype, run.device, args.seed)
    history, acc = [], torch.zeros(2, device=run.device)  # per-epoch change; (sum, count) now
    start, ckpt, _ = run.resume(net=net, ema=ema, opt=opt)
    if ckpt is not None and method.bank_update != "none":  # the bank (output, data), the change history
        need = ["anchor_change"] + (["bank"] if bank is not None else [])
        if any(k not in ckpt["state"] for k in need):
            raise common.UserError(f"checkpoint '{run.ckpt_path}' has no {' or '.join(need)} (trained with "
                                   "another --bank-update): pass the same flag or another --out-dir")
        if bank is not None:
            bank.anchors.copy_(ckpt["state"]["bank"])
        history = ckpt["state"]["anchor_change"].tolist()
        acc.copy_(ckpt["state"]["anchor_acc"])
    model = run.wrap(net)
    batches = common.ResumableBatches(data, run.local_batch, run, args.seed, start, args.workers)
    stream = iter(batches)
    for step in range(start, args.steps):
        epoch = batches.epoch
        x1, _, idx = next(stream)
        w = 1.0 / (epoch + 1) if args.w_schedule == "inv-epoch" else args.w
        with run.autocast:
            loss, logs = method.loss(model, x1, idx, bank, w, hflip=args.hflip and data.is_image)
        common.optimize(opt, loss, net, args, step)
        ema.update(net, step)
        if "anchor_change" in logs:  # the bank's write, or self's ||a_K - a_(K-1)|| (under DDP: this rank's)
            change = logs["anchor_change"]
            acc += torch.stack([change.sum(), torch.tensor(float(change.numel()), device=change.device)])
            logs["anchor_change"] = change.mean()
            if (step + 1) % batches.per_epoch == 0:  # this batch closed an epoch
                history.append((acc[0] / acc[1]).item())
                acc.zero_()
                run.print(f"epoch {epoch}: w {w:.4f} | mean ||a_new - a_old|| {history[-1]:.4g}")
        run.log(step + 1, loss, **logs)
        if run.due(step + 1, args.ckpt_every) or step + 1 == args.steps:
            extra = {}
            if method.bank_update != "none":
                extra = dict(anchor_change=torch.tensor(history, dtype=torch.float64), anchor_acc=acc)
            if bank is not None:
                bank.check_consistent()
                extra["bank"] = bank.anchors
            run.save(step + 1, net=net, ema=ema, opt=opt, **extra)
        if run.master and run.due(step + 1, args.sample_every):
            common.write_samples(args, data, common.sampler(method.sample, ema.model, data, run), run)
        if run.master and run.due(step + 1, args.eval_every):
            common.evaluate(args, run, data, common.sampler(method.sample, ema.model, data, run))
    if run.master and start < args.steps:
        report(args, run, data, ema.model, method, history)
    return ema


def report(args, run, data, net, method, history):
    """End of training: anchor change per sampling iteration, the convergence plot, and (2-D)
    distances to fresh data at each --nfe."""
    z = torch.randn(args.n_conv, *data.shape, device=run.device)
    per_iter = method.sample(net, z, args.conv_iters)[1]["change"]
    run.print("sampling: mean ||a_(k+1) - a_k|| per iteration: "
              + " ".join(f"{c:.3g}" for c in per_iter))
    plot_convergence(history, per_iter, os.path.join(args.out_dir, "anchor_convergence.png"),
                     f"training: a_K vs a_(K-1), K = {method.anchor_iters}" if method.bank_update == "self"
                     else "training: bank update")
    if not data.is_image:
        common.evaluate(args, run, data, common.sampler(method.sample, net, data, run), n=args.fid_n)


def plot_convergence(per_epoch, per_iter, path, train_title="training: bank update"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, ys, xl, title in ((axes[0], per_epoch, "epoch", train_title),
                              (axes[1], per_iter, "sampling iteration k", "sampling: a_k -> a_(k+1)")):
        ax.semilogy(range(len(ys)), [max(y, 1e-12) for y in ys], marker=".")
        ax.set(xlabel=xl, ylabel="mean ||a_new - a_old||", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


#################################################################################
#                                   Benchmark                                   #
#################################################################################

def bench(args, run, data, net, method):
    """Step time of Integration Flow (bank read, loss, update, bank write; or self's K anchor
    iterations, loss, update) vs a plain rectified-flow regression step on the same backbone
    without the anchor channels."""
    B, dev = run.local_batch, run.device
    bank = AnchorBank(max(len(data), B), data.shape, device=dev, seed=args.seed) if method.bank_update in BANKS \
        else None
    x1 = torch.randn(B, *data.shape, device=dev)
    idx = torch.arange(B, device=dev)
    rf_net = common.build_net(args, data.shape).to(dev)
    opt, rf_opt = torch.optim.Adam(net.parameters(), args.lr), torch.optim.Adam(rf_net.parameters(), args.lr)

    def if_step():
        with run.autocast:
            loss, _ = method.loss(net, x1, idx, bank, 0.5)
        common.optimize(opt, loss, net, args, 10**9)

    def rf_step():
        x0, t = torch.randn_like(x1), torch.rand(B, device=dev)
        tb = t.view(-1, *[1] * (x1.ndim - 1))
        with run.autocast:
            loss = (rf_net(tb * x1 + (1 - tb) * x0, t) - (x1 - x0)).pow(2).mean()
        common.optimize(rf_opt, loss, rf_net, args, 10**9)

    fn = common.sampler(method.sample, net, data, run)
    iters = f", K = {method.anchor_iters} anchor iterations without gradient" if method.bank_update == "self" else ""
    run.print(f"Integration Flow step (--bank-update {method.bank_update}{iters}):")
    ours = common.benchmark(run, if_step, fn, args.nfe_list, B)
    run.print("plain rectified-flow step, same backbone:")
    base = common.benchmark(run, rf_step, fn, [], B)
    run.print(f"bench ratio: Integration Flow step / RF step = {ours['step_s'] / base['step_s']:.2f}x "
              "(target <= 1.2x)")
    return ours["step_s"] / base["step_s"]


#################################################################################
#                                      CLI                                      #
#################################################################################

def build_method(args):
    try:
        betas = tuple(float(b) for b in args.vp_betas.split(","))
        assert len(betas) == 2 and 0 < betas[0] < betas[1] < 1
    except (ValueError, AssertionError):
        raise common.UserError(f"--vp-betas '{args.vp_betas}': give two numbers 0 < min < max < 1, "
                               "e.g. 1e-4,0.02") from None
    if not args.sigma_min < args.sigma_max:
        raise common.UserError("--sigma-min and --sigma-max need 0 < sigma-min < sigma-max")
    return IntegrationFlow(args.ode, args.param, args.distance, args.huber_c, args.bank_update,
                           args.vp_steps, args.vp_schedule, betas, args.sigma_min, args.sigma_max,
                           args.sigma_data, args.anchor_input, args.sampler, args.is_image, args.anchor_iters)


# this script's entries of common.FLAG_RANGES and common.APPLIES (checked before any work)
RANGES = {"huber_c": "(0, inf)", "w": "[0, 1]", "vp_steps": "[2, 100000]", "sigma_min": "(0, inf)",
          "sigma_max": "(0, inf)", "sigma_data": "(0, inf)", "conv_iters": "[1, 10000]", "n_conv": "[1, inf)",
          "anchor_iters": "[1, 10000]"}
VE_ONLY = (lambda a: a.ode == "ve", "--ode ve")
ANCHOR = (lambda a: a.bank_update != "none", "training with an anchor (--bank-update output, data or self)")
BANK = (lambda a: a.bank_update in BANKS, "training with an anchor bank (--bank-update output or data)")
APPLIES = {"distance": common.TRAINING_STEPS,
           "huber_c": [common.TRAINING_STEPS,
                       (lambda a: a.distance == "pseudo-huber", "--distance pseudo-huber")],
           "w": [common.TRAINING, ANCHOR, (lambda a: a.w_schedule == "const", "--w-schedule const")],
           "w_schedule": [common.TRAINING, ANCHOR], "bank_dtype": [common.TRAINING, BANK],
           "anchor_iters": [common.TRAINING_STEPS, (lambda a: a.bank_update == "self", "--bank-update self")],
           **dict.fromkeys(["conv_iters", "n_conv"], common.TRAINING),  # the plot at the end of training
           **dict.fromkeys(["vp_steps", "vp_schedule"], (lambda a: a.ode == "vp", "--ode vp")),
           "param": (lambda a: a.ode != "vp", "--ode ve and rf (vp's is always out = x_t - F)"),
           "vp_betas": (lambda a: a.ode == "vp" and a.vp_schedule == "linear", "--ode vp --vp-schedule linear"),
           "sigma_min": VE_ONLY, "sigma_max": VE_ONLY, "sigma_data": VE_ONLY}


def anchor_input(args):
    """--anchor-input: default xattn (DDDM) for the U-Net, concat where no cross-attention exists."""
    if args.anchor_input is None:
        args.anchor_input = "xattn" if args.arch == "unet" else "concat"
    if args.anchor_input == "xattn" and args.arch != "unet":
        raise common.UserError(f"--anchor-input xattn needs --arch unet (got '{args.arch}'; a 2-D point "
                               "has no pixels to attend over): use --anchor-input concat")
    return args.anchor_input


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument_group("integration_flow.py (the common flags follow)").add_argument
    a("--ode", default=None, choices=("vp", "ve", "rf"), help="forward process (default: preset)")
    a("--param", default="paper", choices=("paper", "residual"),
      help="paper: per-ODE form in the docstring; residual: out = x_t - F for all")
    a("--bank-update", default="output", choices=("output", "data", "self", "none"),
      help="output: the model's estimate (the paper's text); data: the clean x1 (the released code); "
           "both banks converge to about x1 and give the same numbers; self: no bank, each pair's "
           "anchor drawn fresh as the sampler draws it, a_0 ~ N(0, I) then --anchor-iters iterations "
           "of the model's own estimate at the same x_t (the reviewers' suggestion, NOT the paper's); "
           "none: plain x1 regression without anchor (baseline)")
    a("--anchor-iters", type=int, default=1,
      help="--bank-update self: K, the anchor iterations per training pair (each a forward pass "
           "without gradient; the sampler's (K+1)-th call sees the same kind of anchor)")
    a("--anchor-input", default=None, choices=("concat", "xattn"),
      help="xattn: x_t alone is the input, the anchor only cross-attention tokens without positions "
           "(DDDM; default for --arch unet); concat: anchor as extra input channels (deviation; "
           "default for mlp and dit, which have no cross-attention)")
    a("--bank-dtype", default="float32", choices=("float32", "float16"))
    a("--distance", default=None, choices=("pseudo-huber", "l2"))
    a("--huber-c", type=float, default=0.00054, help="pseudo-Huber c = huber_c * sqrt(dim) [reconstructed]")
    a("--w-schedule", default="inv-epoch", choices=("inv-epoch", "const"), help="w = 1/(epoch+1) or --w")
    a("--w", type=float, default=0.5, help="data weight for --w-schedule const")
    a("--sampler", default="anchor", choices=("anchor", "renoise"),
      help="anchor: K anchor iterations at T (paper); renoise: re-noise to K levels (extension)")
    a("--vp-steps", type=int, default=1000)
    a("--vp-schedule", default="linear", choices=("linear", "cosine"))
    a("--vp-betas", default="1e-4,0.02", help="linear schedule beta_1,beta_N at N=1000 [DDPM]")
    a("--sigma-min", type=float, default=0.01)
    a("--sigma-max", type=float, default=50.0)
    a("--sigma-data", type=float, default=0.5, help="VE input scaling 1/sqrt(sigma^2+sd^2) [reconstructed]")
    a("--conv-iters", type=int, default=20,
      help="sampling iterations for the convergence plot (end of training)")
    a("--n-conv", type=int, default=2000, help="samples for the convergence plot")
    common.add_common_args(parser, presets=PRESETS)
    args = common.finish_args(common.parse_args(parser, argv), PRESETS, method="integration_flow",
                              default_nfe="1,2,4", no_rk45="Integration Flow has no ODE to solve; "
                              "--nfe is the number of anchor iterations", ranges=RANGES, applies=APPLIES)
    common.check_steps(args)
    xattn = anchor_input(args) == "xattn"
    method = build_method(args)
    run = common.Run(args)
    data = common.load_data(args)
    net = common.build_net(args, data.shape, extra_ch=0 if xattn else data.shape[0],
                           context_ch=data.shape[0] if xattn else 0).to(run.device)
    run.print(f"integration_flow: {args.ode}, anchor {anchor_input(args)}, {args.arch} with "
              f"{common.count_params(net) / 1e6:.3f}M parameters")
    if args.mode == "train":
        train(args, run, data, net, method)
    elif args.mode == "bench":
        bench(args, run, data, net, method)
    else:
        common.load_weights(net, args.ckpt, args.weights)
        net.eval()
        fn = common.sampler(method.sample, net, data, run)
        if args.mode == "sample":
            common.write_samples(args, data, fn, run)
        elif args.mode == "eval":
            common.evaluate(args, run, data, fn)
    run.close()


if __name__ == "__main__":
    common.run_cli(main)
