"""
ScoreFlow: Bridging Score and Neural ODE for Reversible Generative Modeling (a reconstruction;
the paper has no public code and its full text was not available to us).

Idea: one neural ODE dx/dt = v(x, t, y) between two distributions -- noise -> data
(generation) or image domain A -> domain B -- whose drift is regressed on the straight
interpolation (with its coefficient fixed this is rectified-flow regression), plus a
"path-constrained" term asking the one-step approximation of the path to stay on the
interpolation. Because the ODE is reversible, the same model inverts images to latents,
reconstructs them, gives exact likelihoods, and one class-conditional model translates
between classes (encode with class a, decode with class b).

Time convention (once, for the whole file): t = 0 is the source (noise, or domain A),
t = 1 is the target (data, or domain B); x_t = t x1 + (1 - t) x0. The paper reverses time.

Equations implemented (mean over elements, t ~ U[eps, 1]):
  Eq. 18  L_van = E ||v(x_t, t, y) - (x1 - x0)||^2                  (= the rectified-flow loss)
  Eq. 19  L_pc  = E lambda(t) ||x(t) - x_t||^2, one-step approximation x(t) ~ x0 + t v(x_t, t, y),
          i.e. lambda(t) t^2 ||v - (x1 - x0)||^2: a t-weighted RF loss (as the reviewers noted)
          L = L_van + beta L_pc; --pc-lambda inv_t (lambda = 1/t, weight t; the paper's),
          one (weight t^2), inv_t2 (weight 1: L_pc = L_van)
  labels  y -> null class with probability --p-uncond (label dropout)
  CFG     v = v_u + w (v_c - v_u)  (--cfg w; w = 1 conditional, w = 0 unconditional)
  translate (two-pass, DDIB): z = ODE_a(x_a; t 1 -> 0), x_b = ODE_b(z; t 0 -> 1); cycle x_b -> x_a'
  ablation (--translate difference): the paper's single ODE dx/dt = v_b(x, t) - v_a(x, t),
          x(0) = x_a, t 0 -> 1 [reconstructed]; reviewers showed the merge of integrals behind
          it is invalid, so it is reported as an ablation only
  likelihood: log p_1(x1) = log N(x0; 0, I) - int_0^1 div v(x_t, t) dt (instantaneous change of
          variables, integrated t 1 -> 0), div by Hutchinson eps^T (dv/dx) eps with Rademacher eps
          fixed along the path (--probes K: K along one solve, mean and sd; --div exact in 2-D).
          Images: x in [-1, 1] from uint8 k, dequantized x = 2 (k + u) / 256 - 1, u ~ U[0, 1)^D,
          so bits/dim = -log p(x) / (D ln 2) + 7. 2-D: NLL in nats per point.

[reconstructed] choices (all flags): eps = 1e-3; beta = 1 and lambda = 1/t (the paper's, in
our time); p_uncond 0.1; the difference ODE's start point and direction; the image recipe
(RF's optimizer settings from common.PRESETS: Adam 2e-4, batch 128, EMA 0.9999); the domain flow
pairs A and B at random (independent batches). Not implemented: the paper's general drift
coefficient (it fixes it, which gives RF regression), reflow, and FID for 2-D (2-D reports
sliced W2 / energy distance instead).

Commands (run from the repo root):
  python scoreflow.py                                             # CPU toy: class-conditional 8 Gaussians (~1 min)
  python scoreflow.py --mode eval --bpd --nfe 1,4,16,rk45 --cfg 2 # metrics, reconstruction, straightness, NLL
  python scoreflow.py --mode translate --src-class 0 --tgt-class 4 --nfe 4,16,rk45  # (--translate difference)
  python scoreflow.py --source tri-src --dataset tri-tgt          # 2-D domain flow A -> B (then --mode translate)
  python scoreflow.py --dataset tri-src --out-dir runs/A && python scoreflow.py --dataset tri-tgt --out-dir runs/B
  python scoreflow.py --mode translate --source tri-src --dataset tri-tgt --ckpt runs/A/ckpt.pt \
      --ckpt-b runs/B/ckpt.pt --out-dir runs/AB --nfe 1,4,rk45                # two models, shared latent
  python scoreflow.py --dataset cifar10 --no-class-cond           # CIFAR-10 unconditional (RF recipe)
  python scoreflow.py --dataset cifar10 --p-uncond 0.1            # class-conditional, then e.g.
  python scoreflow.py --dataset cifar10 --mode translate --src-class 3 --tgt-class 5 --nfe rk45 --fid-n 5000
  python scoreflow.py --dataset celeba --no-class-cond            # CelebA 64x64
  python scoreflow.py --dataset folder --data-dir B/ --source folder --source-dir A/ --image-size 64
  torchrun --standalone --nproc_per_node 8 scoreflow.py --dataset cifar10 --no-class-cond
Translation reports per NFE: distance to the target (FID; 2-D sliced W2, energy), L2/PSNR to the source, cycle RMSE.
"""
import argparse
import functools
import math
import os

import torch

import common

# common.PRESETS plus this method's recipe (command-line flags win): RF's optimizer recipe for images.
PRESETS = {"toy": dict(common.PRESETS["toy"], steps=3000, log_every=500), "tiny": dict(common.PRESETS["tiny"]),
           "cifar10": dict(common.PRESETS["cifar10"]), "celeba64": dict(common.PRESETS["celeba64"])}
EPS = 1e-3  # t ~ U[eps, 1]
PC_LAMBDA = {"inv_t": lambda t: 1 / t, "one": lambda t: torch.ones_like(t), "inv_t2": lambda t: t ** -2}


#################################################################################
#                                   Method                                      #
#################################################################################

def drop_labels(y, p_uncond, null):
    """Label dropout: each label becomes the null class with probability p_uncond."""
    return torch.where(torch.rand(y.shape, device=y.device) < p_uncond, torch.full_like(y, null), y)


class ScoreFlow:
    """Loss (Eq. 18 + beta Eq. 19), guided field, ODE solves, translation and likelihood,
    generic over any net(x, t, y). num_classes > 0: class-conditional, index num_classes = null."""

    def __init__(self, beta=1.0, pc_lambda="inv_t", p_uncond=0.1, num_classes=0, eps=EPS, cfg=1.0):
        self.beta, self.lambda_t, self.p_uncond = beta, PC_LAMBDA[pc_lambda], p_uncond
        self.num_classes, self.eps, self.cfg = num_classes, eps, cfg  # cfg: sample()'s guidance

    def loss(self, net, x1, x0=None, y=None, t=None):
        """L = L_van + beta L_pc (Eq. 18, 19). x0: source batch (noise if None); y: labels."""
        x0 = torch.randn_like(x1) if x0 is None else x0
        if t is None:
            t = self.eps + (1 - self.eps) * torch.rand(x1.shape[0], device=x1.device)
        if y is not None and self.num_classes:
            y = drop_labels(y, self.p_uncond, self.num_classes)
        tb = t.view(-1, *[1] * (x1.ndim - 1))
        x_t = tb * x1 + (1 - tb) * x0
        v = net(x_t, t, y if self.num_classes else None)
        per_van = (v - (x1 - x0)).pow(2).flatten(1).mean(1)  # Eq. 18, per sample
        loss, logs = per_van.mean(), {"l_van": per_van.mean().detach()}
        if self.beta:
            x_one_step = x0 + tb * v  # one-step approximation of x(t)
            per_pc = self.lambda_t(t) * (x_one_step - x_t).pow(2).flatten(1).mean(1)  # Eq. 19
            loss = loss + self.beta * per_pc.mean()
            logs["l_pc"] = per_pc.mean().detach()
        return loss, logs

    def field(self, net, y=None, w=1.0):
        """The sampling velocity v(x, t): conditional on y, guided by CFG weight w when w != 1
        (both branches in one batched call), unconditional (null class) when y is None.
        v.cost = network evaluations per call."""
        if y is None or not self.num_classes:
            v = lambda x, t: net(x, t, None)  # noqa: E731
        elif w == 1:
            v = lambda x, t: net(x, t, y)  # noqa: E731
        else:
            null = torch.full_like(y, self.num_classes)

            def v(x, t):
                v_c, v_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
                return v_u + w * (v_c - v_u)  # classifier-free guidance
        v.cost = 1 if (y is None or not self.num_classes or w == 1) else 2
        return v

    @torch.no_grad()
    def solve(self, v, x, nfe, t0=0.0, t1=1.0):
        """Integrate dx/dt = v from t0 to t1: Euler with nfe steps, or nfe='rk45' (adaptive).
        Returns (x_t1, solver evaluations)."""
        method = "rk45" if nfe == "rk45" else "euler"
        x, info = common.integrate(v, x, None if nfe == "rk45" else nfe, method, t0, t1)
        return x, info["nfe"]

    def sample(self, net, x0, nfe, y=None, w=None):
        """Source x0 (noise or domain A) -> target; returns (x1, {"nfe": network evaluations}).
        A class-conditional model samples classes y (labels; an int: that class for all; None:
        uniformly random classes) with CFG weight w (default: the method's cfg, --cfg)."""
        if self.num_classes and (y is None or isinstance(y, int)):
            y = (torch.randint(0, self.num_classes, (len(x0),), device=x0.device) if y is None
                 else torch.full((len(x0),), y, device=x0.device))
        v = self.field(net, y, self.cfg if w is None else w)
        x, n = self.solve(v, x0, nfe)
        return x, {"nfe": n * v.cost}

    def translate(self, v_a, v_b, x_a, nfe, variant="two-pass"):
        """a -> b with the fields of (model, class) a and b. Two-pass: encode with v_a
        (t 1 -> 0), decode with v_b (t 0 -> 1). Returns (x_b, latent z or None, network evals)."""
        if variant == "two-pass":
            z, n1 = self.solve(v_a, x_a, nfe, 1.0, 0.0)
            x_b, n2 = self.solve(v_b, z, nfe, 0.0, 1.0)
            return x_b, z, n1 * v_a.cost + n2 * v_b.cost
        x_b, n = self.solve(lambda x, t: v_b(x, t) - v_a(x, t), x_a, nfe, 0.0, 1.0)  # ablation
        return x_b, None, n * (v_a.cost + v_b.cost)

    def log_likelihood(self, v, x1, nfe="rk45", div="hutchinson", probes=1, generator=None):
        """log p_1(x1) in nats by the instantaneous change of variables: integrate [x, a] with
        dx/dt = v, da/dt = div v from t = 1 (a = 0) to 0; log p_1(x1) = log N(x_0; 0, I) + a(0).
        Hutchinson: one a per Rademacher probe along the same path (the probes' spread is the
        estimator's). Returns (log p [probes, B] ([1, B] exact), solver evaluations)."""
        shape, D = x1.shape, x1[0].numel()
        probes = 1 if div == "exact" else probes
        eps = (torch.randint(0, 2, (probes, *shape), generator=generator).float() * 2 - 1).to(x1.device)

        def augmented(s, t):
            with torch.enable_grad():
                x = s[:, :D].reshape(shape).detach().requires_grad_(True)
                out = v(x, t)
                if div == "exact":  # D backward passes: fine in 2-D
                    rows = [torch.autograd.grad(out.flatten(1)[:, i].sum(), x, retain_graph=True)[0]
                            .flatten(1)[:, i] for i in range(D)]
                    divergence = torch.stack(rows, 1).sum(1, keepdim=True)
                else:  # Hutchinson: E[eps^T (dv/dx) eps] = tr(dv/dx), one column per probe
                    divergence = torch.stack([(torch.autograd.grad(out, x, e, retain_graph=True)[0] * e)
                                              .flatten(1).sum(1) for e in eps], 1)
            return torch.cat([out.detach().flatten(1), divergence.detach()], 1)

        s0 = torch.cat([x1.flatten(1), torch.zeros(len(x1), probes, device=x1.device)], 1)
        s, n = self.solve(augmented, s0, nfe, 1.0, 0.0)
        z, a = s[:, :D], s[:, D:].T
        log_normal = -0.5 * z.pow(2).sum(1) - 0.5 * D * math.log(2 * math.pi)
        return log_normal + a, n


def bits_per_dim(log_p_dequantized, dim):
    """Image bits/dim from log p of x = 2 (k + u) / 256 - 1 in [-1, 1] (see the docstring)."""
    return -log_p_dequantized / (dim * math.log(2)) + 7.0


def dequantize(x):
    """[-1, 1] images from uint8 k = (x + 1) 127.5 -> 2 (k + u) / 256 - 1, u ~ U[0, 1)."""
    k = ((x + 1) * 127.5).round()
    return 2 * (k + torch.rand_like(x)) / 256 - 1


#################################################################################
#                                 Training loop                                 #
#################################################################################

def train(args, run, data, source, net, method):
    ema = common.EMA(net, args.ema_decay)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    start, _, _ = run.resume(net=net, ema=ema, opt=opt)
    model = run.wrap(net)
    stream = iter(common.ResumableBatches(data, run.local_batch, run, args.seed, start, args.workers))
    # domain A -> B: source batches drawn independently of the target batches (random pairing)
    src_stream = None if source is None else iter(common.ResumableBatches(
        source, run.local_batch, run, args.seed + 1, start, args.workers))
    run.print(f"scoreflow: {common.count_params(net) / 1e6:.2f}M parameters, "
              f"{'source ' + source.name if source else 'noise'} -> {data.name}, "
              f"classes {method.num_classes}, beta {args.beta}, lambda {args.pc_lambda}")
    sampler = lambda: common.sampler(method.sample, ema.model, data, run, starts(run, source))  # noqa: E731
    for step in range(start, args.steps):
        x1, y, _ = next(stream)
        x0 = next(src_stream)[0] if source else None
        if args.hflip and data.is_image:
            x1, x0 = common.random_hflip(x1), (x0 if x0 is None else common.random_hflip(x0))
        with run.autocast:
            loss, logs = method.loss(model, x1, x0, y)
        common.optimize(opt, loss, net, args, step)
        ema.update(net, step)
        run.log(step + 1, loss, **logs)
        if run.due(step + 1, args.ckpt_every) or step + 1 == args.steps:
            run.save(step + 1, net=net, ema=ema, opt=opt)
        if run.master and run.due(step + 1, args.sample_every):
            common.write_samples(args, data, sampler(), run)
        if run.master and run.due(step + 1, args.eval_every):
            common.evaluate(args, run, data, sampler())
    if run.master and not data.is_image and args.steps > start:  # the toy's picture and numbers
        fn = sampler()
        common.write_samples(args, data, fn, run)
        common.evaluate(args, run, data, fn)
    return ema


def draw(data, n, label=None, seed=0):
    """n held-out points (2-D toys: fresh draws) or random training images, optionally of one
    class; returns (x, y) on the CPU."""
    g = torch.Generator().manual_seed(seed)
    if data.name in common.TOY_DATASETS[:-1]:
        x, y = common.toy_sample(data.name, 4 * n * max(1, data.num_classes), g)
    elif data.x is not None:
        x, y = data.x, data.y
    else:
        labels = getattr(data.dataset.dataset, "targets", None)
        if label is not None and labels is None:
            raise common.UserError(f"{data.name} has no class labels: --src-class/--tgt-class "
                                   "need a labelled data set (cifar10, or a folder of class folders)")
        idx = torch.randperm(len(data), generator=g)
        if label is not None:
            idx = idx[torch.as_tensor(labels)[idx] == label]
        items = [data.dataset[int(i)] for i in idx[:n]]
        return torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items])
    keep = torch.randperm(len(x), generator=g) if label is None else (y == label).nonzero()[:, 0]
    return x[keep[:n]], y[keep[:n]]


def starts(run, source):
    """x0(n) for common.sampler: None (noise), or source-domain points, a new draw each call
    seeded from the torch RNG (so a re-seed, as evaluate's per NFE, repeats the draws)."""
    return None if source is None else (
        lambda n: draw(source, n, seed=int(torch.randint(2**31, ())))[0].to(run.device))


#################################################################################
#                     Evaluation: reversibility, likelihood, translation        #
#################################################################################

@torch.no_grad()
def reversibility(args, run, data, source, net, method):
    """data -> latent -> data with each --nfe (Euler N, or RK45 where named): reconstruction RMSE; and
    the straightness S of the simulated flow (RF paper, Eq. 3; Euler 100)."""
    x, y = draw(data, args.n if data.is_image else min(args.fid_n, 2000), seed=args.seed + 7)
    x, y = x.to(run.device), (y.to(run.device) if method.num_classes else None)
    v = method.field(net, y, args.cfg)
    for nfe in args.nfe_list:
        z, n1 = method.solve(v, x, nfe, 1.0, 0.0)
        x_rec, n2 = method.solve(v, z, nfe, 0.0, 1.0)
        rmse = (x_rec - x).pow(2).mean().sqrt().item()
        run.print(f"reconstruction nfe={nfe}: rmse={rmse:.3e} (data->latent->data, "
                  f"{n1 + n2} solver evals, {len(x)} samples)")
    x0 = (torch.randn_like(x) if source is None else
          draw(source, len(x), seed=args.seed + 8)[0].to(run.device))
    run.print(f"straightness S = {common.straightness(v, x0):.4g} (Euler 100, {len(x)} samples, "
              f"cfg {args.cfg})")


@common.own_rng  # the same probes and dequantization whatever ran before
def likelihood(args, run, data, net, method):
    """--bpd: bits/dim (2-D: NLL nats) with the last --nfe, mean and sd over --probes."""
    if args.source:
        raise common.UserError("--bpd needs a noise -> data model (this one starts from --source)")
    torch.manual_seed(args.seed)
    test = common.load_data(args, train=False) if data.is_image else data
    x, y = draw(test, args.n if data.is_image else min(args.fid_n, 2000), seed=args.seed + 9)
    x, y = x.to(run.device), (y.to(run.device) if method.num_classes else None)
    x = dequantize(x) if data.is_image else x
    nfe = args.nfe_list[-1]
    log_p, evals = method.log_likelihood(method.field(net, y, 1.0), x, nfe, args.div, args.probes,
                                         torch.Generator().manual_seed(args.seed))
    per_probe = bits_per_dim(log_p, x[0].numel()).mean(1) if data.is_image else -log_p.mean(1)
    value = f"{per_probe.mean().item():.4f}" + (f" (sd over {len(per_probe)} probes "
                                                 f"{per_probe.std().item():.4f})" if len(per_probe) > 1 else "")
    run.print(f"likelihood (log p(x{'|y' if y is not None else ''}), {nfe}, {evals} solver evals, {len(x)} "
              f"{'images' if data.is_image else 'points'}, {args.div}, {run.eval_precision}): "
              + (f"{value} bits/dim" if data.is_image else f"NLL {value} nats"))


def load_model(args, run, path, shape):
    """The EMA (or --weights online) network of a checkpoint, built with its classes."""
    ckpt = common.read_checkpoint(path)  # load_state copies the weights onto run.device
    classes = int(ckpt.get("config", {}).get("cond_classes", 0))
    net = common.build_net(args, shape, num_classes=classes).to(run.device)
    key = "net" if args.weights == "online" else "ema"
    common.load_state(net, ckpt["state"][key], "network", path, ckpt.get("config"))
    return net.eval(), classes, ckpt.get("config", {})


def image_fid(args, run, fake, real):
    """FID between two sets of [-1, 1] images (Inception features of both; small-n biased)."""
    inception = common.load_fid_inception(run.device, args.inception_weights)
    stats = [common.feature_stats(common.inception_features(inception, common.to_uint8(s))[0])
             for s in (fake, real)]
    return common.frechet_distance(*stats[0], *stats[1])


@common.own_rng
@torch.no_grad()
def class_fidelity(args, run, data, net, method, x0=None):
    """Class-conditional: 2-D, samples of each class vs fresh points of that class; digits (and
    photos), the fraction of samples of each class that the dataset's classifier reads as that
    class (CFG)."""
    n = max(100, args.fid_n // method.num_classes)

    def sample_fn(n, nfe, c):  # n samples, all of class c
        return common.sampler(functools.partial(method.sample, y=c), net, data, run, x0)(n, nfe)
    if args.dataset in common.CLASSIFIER_FD:
        small = common.ClassifierFD(args.dataset, args.image_size, common.fid_cache_dir(args), run.device)
        for nfe in args.nfe_list:
            torch.manual_seed(args.seed)  # the same noise for an NFE, whatever else is listed
            acc = [(small.predict(sample_fn(n, nfe, c)[0]) == c).float().mean().item()
                   for c in range(method.num_classes)]
            run.print(f"eval nfe={nfe}: class accuracy {sum(acc) / len(acc):.4g} (cfg {args.cfg}, "
                      f"{n} samples per class, read by the {args.dataset} classifier)")
        return
    for nfe in args.nfe_list:
        torch.manual_seed(args.seed)
        sw2 = [common.sliced_wasserstein(sample_fn(n, nfe, c)[0].cpu(), draw(data, n, c, 12345)[0])
               for c in range(method.num_classes)]
        run.print(f"eval nfe={nfe}: per-class sw2={sum(sw2) / len(sw2):.4g} "
                  f"(cfg {args.cfg}, {n} samples per class)")


@torch.no_grad()
def translate_cli(args, run, data):
    """--mode translate: class a -> b in one model, model A -> model B, or a domain A -> B
    flow. Reports the distance to the target class/domain (FID for images, sliced W2 and
    energy distance in 2-D), L2 (and PSNR) to the source, and the A -> B -> A cycle error."""
    net_a, classes_a, config = load_model(args, run, args.ckpt, data.shape)
    if config.get("source"):  # a domain A -> B flow: translation is the ODE itself
        kind, source = "flow", common.load_data(args, config["source"], config.get("source_dir"))
        net_b, classes_b = net_a, classes_a
    elif args.ckpt_b:
        if not args.source:
            raise common.UserError("--ckpt-b needs --source (domain A data) besides --dataset (B)")
        kind, source = "two-model", common.load_data(args, args.source, args.source_dir)
        net_b, classes_b, _ = load_model(args, run, args.ckpt_b, data.shape)
    else:
        kind, source, net_b, classes_b = "class", data, net_a, classes_a
        if not classes_a or args.src_class is None or args.tgt_class is None:
            raise common.UserError("translation inside one model needs a class-conditional "
                                   "checkpoint and --src-class a --tgt-class b (or --ckpt-b "
                                   "with --source for two models)")
    if kind == "flow" and args.translate == "difference":
        raise common.UserError("--translate difference needs two fields (two classes or two models)")
    for c, k in ((args.src_class, classes_a), (args.tgt_class, classes_b)):
        if c is not None and not 0 <= c < k:
            raise common.UserError(f"class {c} is out of range: the model has {k} classes "
                                   "(0 for unconditional: leave out --src-class/--tgt-class)")
    n = args.fid_n
    x_a = draw(source, n, args.src_class if kind != "flow" else None, seed=args.seed + 11)[0]
    ref = draw(data, n, args.tgt_class, seed=args.seed + 12)[0]
    x_a = x_a.to(run.device)

    method_a, method_b = ScoreFlow(num_classes=classes_a), ScoreFlow(num_classes=classes_b)

    def translate_chunk(x, nfe):  # -> (x_b, latent z or None, cycle x_a', network evals)
        def label(c):
            return None if c is None else torch.full((len(x),), c, device=run.device)
        if kind == "flow":  # the ODE itself; its labels are target classes
            v = method_a.field(net_a, label(args.tgt_class), args.cfg)
            x_b, n = method_a.solve(v, x, nfe, 0.0, 1.0)
            return x_b, None, method_a.solve(v, x_b, nfe, 1.0, 0.0)[0], n * v.cost
        v_a = method_a.field(net_a, label(args.src_class), args.cfg)
        v_b = method_b.field(net_b, label(args.tgt_class), args.cfg)
        x_b, z, evals = method_a.translate(v_a, v_b, x, nfe, args.translate)
        return x_b, z, method_a.translate(v_b, v_a, x_b, nfe, args.translate)[0], evals

    name = kind + (" [ablation: difference of fields]" if args.translate == "difference" else "")
    for nfe in args.nfe_list:  # images go through in batches of --batch-size
        chunks = [translate_chunk(x, nfe) for x in x_a.split(args.batch_size if data.is_image else len(x_a))]
        x_b, x_cyc = torch.cat([c[0] for c in chunks]), torch.cat([c[2] for c in chunks])
        z = None if chunks[0][1] is None else torch.cat([c[1] for c in chunks])
        evals = chunks[0][3]
        m = {"l2_to_source": (x_b - x_a).flatten(1).norm(dim=1).mean().item(),
             "cycle_rmse": (x_cyc - x_a).pow(2).mean().sqrt().item()}
        if data.is_image:
            mse = (x_b - x_a).pow(2).flatten(1).mean(1)
            m["psnr_to_source"] = (10 * torch.log10(4 / mse)).mean().item()  # peak-to-peak 2
        if args.dataset in common.CLASSIFIER_FD:  # target-class FD, how many read as that class
            small = common.ClassifierFD(args.dataset, args.image_size, common.fid_cache_dir(args), run.device)
            m[f"{args.dataset}_fd_to_target"] = small.report(x_b.cpu(), ref)[f"{args.dataset}_fd"]
            if args.tgt_class is not None:
                m["read_as_target"] = (small.predict(x_b) == args.tgt_class).float().mean().item()
        elif data.is_image:
            m["fid_to_target"] = image_fid(args, run, x_b.cpu(), ref)
        else:
            m.update({f"{k}_to_target": v for k, v in common.toy_metrics(x_b.cpu(), ref).items()})
            m["sw2_source_to_target"] = common.sliced_wasserstein(x_a.cpu(), ref)
        run.print(f"translate {name} nfe={nfe} ({evals} network evals, {len(x_a)} samples, "
                  f"cfg {args.cfg}): " + " ".join(f"{k}={v:.4g}" for k, v in m.items()))
    path = os.path.join(args.out_dir, f"translate_{kind}_{args.translate}.png")
    if data.is_image:  # rows: source, translated, cycle
        common.save_image_grid(torch.cat([x_a[:8], x_b[:8], x_cyc[:8]]).cpu(), path, nrow=8)
    else:
        panels = [("source", x_a)] + ([("latent z", z)] if z is not None else [])
        common.save_scatter(panels + [(f"translated (NFE {evals})", x_b), ("cycle A->B->A", x_cyc)],
                            path, lim=6.0, ref=torch.cat([ref, draw(source, n, seed=1)[0]]))
    run.print(f"wrote {path}")
    return m


#################################################################################
#                                      CLI                                      #
#################################################################################

def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument_group("scoreflow.py (the common flags follow)").add_argument
    a("--beta", type=float, default=1.0, help="weight of the path-constrained loss (0 = rectified flow)")
    a("--pc-lambda", default="inv_t", choices=sorted(PC_LAMBDA), help="lambda(t) in Eq. 19")
    a("--class-cond", action=argparse.BooleanOptionalAction, default=None,
      help="condition on class labels (default: on when the data has classes and no --source)")
    a("--p-uncond", type=float, default=0.1, help="label dropout probability (null class)")
    a("--cfg", type=float, default=1.0, help="classifier-free guidance weight w (1 = conditional)")
    a("--source", default=None, help="source data set for a domain A -> B flow (t = 0 side)")
    a("--source-dir", default=None, help="data dir of --source (default --data-dir)")
    a("--src-class", type=int, default=None, help="translate from this class")
    a("--tgt-class", type=int, default=None, help="translate to this class")
    a("--ckpt-b", default=None, help="model B checkpoint for two-model translation (--ckpt = A)")
    a("--translate", default="two-pass", choices=("two-pass", "difference"),
      help="two-pass encode/decode, or the single-ODE difference-of-fields ablation")
    a("--bpd", action="store_true", help="--mode eval: also the likelihood (solved with the last --nfe)")
    a("--div", default="hutchinson", choices=("hutchinson", "exact"), help="divergence for --bpd")
    a("--probes", type=int, default=1, help="--bpd: Hutchinson probes along one solve (their mean and sd)")
    common.add_common_args(parser, modes=("train", "sample", "eval", "translate", "bench"), presets=PRESETS)
    args = common.parse_args(parser, argv, may_differ={"translate": ("dataset", "source")})
    args = common.finish_args(args, presets=PRESETS, method="scoreflow", default_nfe="1,2,4,8",
                              ranges=RANGES, applies=APPLIES)
    common.check_steps(args)
    args.source_dir = args.source_dir or args.data_dir
    return args


# this script's entries of common.FLAG_RANGES and common.APPLIES (checked before any work);
# --p-uncond and --cfg need a class-conditional model, which main() knows once the data is loaded
RANGES = {"beta": "[0, inf)", "p_uncond": "[0, 1)", "cfg": "(-inf, inf)", "src_class": "[0, inf)",
          "tgt_class": "[0, inf)", "probes": "[1, inf)"}
TRANSLATE = (lambda a: a.mode == "translate", "--mode translate")
APPLIES = {**dict.fromkeys(["src_class", "tgt_class", "ckpt_b", "translate"], TRANSLATE),
           "bpd": (lambda a: a.mode == "eval", "--mode eval"),
           "div": (lambda a: a.mode == "eval" and a.bpd, "--mode eval --bpd"),
           "probes": (lambda a: a.mode == "eval" and a.bpd and a.div == "hutchinson",
                      "--mode eval --bpd --div hutchinson"),
           "source_dir": (lambda a: a.source, "--source"),
           **dict.fromkeys(["beta", "p_uncond"], common.TRAINING_STEPS),  # the loss's (sampling: the field's)
           "pc_lambda": [common.TRAINING_STEPS,
                         (lambda a: a.beta > 0, "--beta > 0 (the path-constrained term)")],
           # eval also reconstructs --n images (and their likelihood), translate is scored like eval;
           # bench trains the wrapped network
           "n": (lambda a: a.mode in ("train", "sample", "eval"), "--mode sample and eval"),
           "fid_n": (lambda a: a.mode in ("train", "eval", "translate"), "--mode eval and translate (and "
                     "evaluations during training)"),
           "inception_weights": [(lambda a: a.mode in ("train", "eval", "translate"), "FID: --mode eval and "
                                  "translate (and --eval-every)"), common.FID_ON_IMAGES],
           "compile": common.TRAINING_STEPS,
           "channels_last": [common.TRAINING_STEPS, (lambda a: a.is_image, "image data")]}


def main(argv=None):
    args = parse(argv)
    run = common.Run(args)
    data = common.load_data(args)
    if args.mode == "translate":
        with run.sampling():
            out = translate_cli(args, run, data)
        run.close()
        return out
    if args.mode in ("sample", "eval"):  # the checkpoint says which classes and source it used
        net, cond, config = load_model(args, run, args.ckpt, data.shape)
        args.source = args.source or config.get("source")
        if "source_dir" not in args.given:  # the folder it trained on, unless named now (data may move)
            args.source_dir = config.get("source_dir") or args.source_dir
    source = common.load_data(args, args.source, args.source_dir) if args.source else None
    if source is not None and source.shape != data.shape:
        raise common.UserError(f"--source {args.source} has shape {source.shape} but --dataset "
                               f"{args.dataset} has {data.shape}: use data of the same shape")
    if args.class_cond and not data.num_classes:
        raise common.UserError(f"--class-cond: {args.dataset} has no class labels")
    if args.mode in ("train", "bench"):
        cond = data.num_classes if args.class_cond or (args.class_cond is None and not source) else 0
        net = common.build_net(args, data.shape, num_classes=cond).to(run.device)
    for flag in ("p_uncond", "cfg"):
        if flag in args.given and not cond:
            raise common.UserError(f"--{flag.replace('_', '-')} does not apply to this run: it is for "
                                   "class-conditional models (this one has no classes); leave it out")
    args.cond_classes = cond  # saved in the checkpoint's config: eval/translate rebuild from it
    method = ScoreFlow(args.beta, args.pc_lambda, args.p_uncond, cond, cfg=args.cfg)
    result = None
    if args.mode == "train":
        result = train(args, run, data, source, net, method)
    elif args.mode == "bench":
        model, opt = run.wrap(net), torch.optim.Adam(net.parameters(), lr=args.lr)
        x1 = draw(data, args.batch_size)[0].to(run.device)
        y = torch.zeros(len(x1), dtype=torch.long, device=run.device) if cond else None

        def step():
            with run.autocast:
                loss, _ = method.loss(model, x1, None, y)
            common.optimize(opt, loss, net, args, 0)
        fn = common.sampler(method.sample, common.EMA(net, 0.0).model, data, run, starts(run, source))
        result = common.benchmark(run, step, fn, args.nfe_list, args.batch_size)
    else:
        x0 = starts(run, source)
        fn = common.sampler(method.sample, net, data, run, x0)
        if args.mode == "sample":
            common.write_samples(args, data, fn, run)
        else:
            result = common.evaluate(args, run, data, fn)
            if cond and (not data.is_image or args.dataset in common.CLASSIFIER_FD):
                class_fidelity(args, run, data, net, method, x0)
            with run.sampling():
                reversibility(args, run, data, source, net, method)
            if args.bpd:
                likelihood(args, run, data, net, method)
    run.close()
    return result


if __name__ == "__main__":
    common.run_cli(main)
