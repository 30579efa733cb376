"""
Every method of this repo on 2-D data, on CPU (about 1.5 minutes on 2 cores): one figure, one table.

    python toy2d.py                                   # all methods, 8gaussians + 3-to-3 Gaussians
    python toy2d.py --methods rf,reflow,asfm --dist moons --steps 3000
    python toy2d.py --data my_points.npy              # your own [N, 2] points as the target

Two set-ups:
  (a) noise -> data: x0 ~ N(0, I), x1 ~ --dist (or --data).
  (b) data -> data, the rectified-flow paper's example: x0 ~ three Gaussians on the left,
      x1 ~ three Gaussians on the right, paired at random (an independent coupling). The
      straight interpolations between random pairs cross, so 1-RF's paths bend; reflow and
      ASFM straighten them. Integration Flow and consistency training start from Gaussian
      noise by construction, so they appear in (a) only.

Methods (the classes come from the method files, with a 3x128 MLP):
  rf        1-RF                               asfm.RectifiedFlow
  reflow    2-RF: 1-RF retrained on its own (z, ODE(z)) pairs
  asfm      ASFM from the 1-RF, training memory + adversarial loss   asfm.ASFM
  if        Integration Flow (rf ODE, anchor bank)                   integration_flow.IntegrationFlow
  ct        improved consistency training                            consistency_func.ConsistencyTraining
  scoreflow ScoreFlow (beta = 1 path-constrained loss)               scoreflow.ScoreFlow
For each: sliced W2 distance to fresh data at NFE 1, 2 and 100, straightness S (flows only) and
training time. Lower is better; with 2000 points the floor (two independent draws of the data
itself) is 0.13 on 8gaussians and 0.07 on the three Gaussians.
Flows use Euler with NFE steps; Integration Flow iterates its anchor NFE times; consistency
training uses NFE-step multistep sampling.

Outputs: <out>/toy2d.png (per method: paths from the same starting points, then samples at
NFE 1, 2, 100 over the data in grey) and <out>/toy2d.md (the command as run, then the table,
also printed).
"""
import argparse
import copy
import os
import shlex
import sys
import time

import torch

import asfm
import common
import consistency_func
import integration_flow
import scoreflow

METHODS = ("rf", "reflow", "asfm", "if", "ct", "scoreflow")
FLOWS = ("rf", "reflow", "asfm", "scoreflow")  # methods with a velocity field (straightness S)
NFES = (1, 2, 100)
WIDTH, DEPTH, BATCH, LR = 128, 3, 256, 2e-3


#################################################################################
#                         One training loop for every method                    #
#################################################################################

def fit(net, step_fn, steps, lr=LR, ema_decay=0.995):
    """Adam with a 100-step warm-up, gradient clipping at 1 (common.optimize) and EMA around
    step_fn(net, step, update): the method's own training step, which calls update(loss) once.
    Returns the EMA network (used for all sampling)."""
    opt, hp = torch.optim.Adam(net.parameters(), lr=lr), argparse.Namespace(lr=lr, warmup=100, grad_clip=1.0)
    ema, progress = common.EMA(net, ema_decay), common.Progress("training steps", steps)
    for step in range(steps):
        step_fn(net, step, lambda loss: common.optimize(opt, loss, net, hp, step))
        ema.update(net, step)
        progress.update(step + 1)
    return ema.model


def mlp(extra_dim=0):
    return common.MLP(2, WIDTH, DEPTH, extra_dim=extra_dim)


def batch_of(x):
    return x[torch.randint(0, len(x), (BATCH,))]


class Setup:
    """Source sampler x0(n), target training points, fresh target points for metrics."""

    def __init__(self, name, target_train, target_ref, source=None):
        self.name, self.target, self.ref, self.source_pts = name, target_train, target_ref, source

    def x0(self, n):
        return torch.randn(n, 2) if self.source_pts is None else self.source_pts[torch.randint(0, len(self.source_pts), (n,))]


def train_method(method, setup, steps, cache):
    """Train one method; returns sample(x0, nfe) -> (x1, path list or None) and, for flows,
    the velocity network v(x, t) (for straightness), else None."""
    flow_sample = lambda net: lambda x0, nfe: _flow(net, x0, nfe)  # noqa: E731
    loss_step = lambda loss_fn: lambda net, s, update: update(loss_fn(net, s)[0])  # noqa: E731
    if method in ("rf", "reflow", "asfm"):
        if "rf" not in cache:  # 1-RF is shared by reflow and ASFM (they start from it)
            rf, t0 = asfm.RectifiedFlow(), time.time()
            cache["rf"] = fit(mlp(), loss_step(lambda net, s: rf.loss(net, batch_of(setup.target), setup.x0(BATCH))), steps)
            cache["rf_seconds"] = time.time() - t0
        teacher = cache["rf"]
        if method == "rf":
            return flow_sample(teacher), teacher
    if method == "reflow":
        rf, z = asfm.RectifiedFlow(), setup.x0(10_000)
        x1 = asfm.RectifiedFlow.sample(teacher, z, 100)[0]  # fixed pairs from the frozen 1-RF

        def loss(net, s):
            i = torch.randint(0, len(z), (BATCH,))
            return rf.loss(net, x1[i], z[i])
        net = fit(copy.deepcopy(teacher).train().requires_grad_(True), loss_step(loss), steps // 2)
        return flow_sample(net), net
    if method == "asfm":  # asfm.ASFM.train_step, as in asfm.py's loop
        rf, net = asfm.RectifiedFlow(), copy.deepcopy(teacher).train().requires_grad_(True)
        method_ = asfm.ASFM(rf, lambda_fm=1.0, lambda_adv=asfm.PRESETS["toy"]["lambda_adv"], r1=0.1)
        D = asfm.make_discriminator((2,))
        opt_d = torch.optim.Adam(D.parameters(), lr=LR, betas=(0.0, 0.99))
        memory = asfm.TrainingMemory(20, BATCH, (2,), "cpu")
        generate = asfm.generator(net, (2,), 20, "cpu", common.nullcontext, source=setup.x0)
        for _ in range(20):
            memory.refresh(generate)

        def step(net_, s, update):  # memory refresh every 5 steps
            method_.train_step(net_, D, opt_d, memory, lambda: batch_of(setup.target), update,
                               generate if (s + 1) % 5 == 0 else None)
        net = fit(net, step, steps // 2)
        return flow_sample(net), net
    if method == "scoreflow":
        sf = scoreflow.ScoreFlow(beta=1.0, pc_lambda="inv_t")
        net = fit(mlp(), loss_step(lambda net, s: sf.loss(net, batch_of(setup.target), setup.x0(BATCH))), steps)
        return flow_sample(net), net
    if method == "if":  # integration_flow.IntegrationFlow.loss reads and writes the anchor bank
        IF = integration_flow.IntegrationFlow(ode="rf", distance="l2")
        bank = integration_flow.AnchorBank(len(setup.target), (2,), seed=0)
        per_epoch = len(setup.target) // BATCH

        def loss(net, s):
            if s % per_epoch == 0:
                loss.perm = torch.randperm(len(setup.target))
            idx = loss.perm[(s % per_epoch) * BATCH:(s % per_epoch + 1) * BATCH]
            return IF.loss(net, setup.target[idx], idx, bank, 1.0 / (s // per_epoch + 1))  # w = 1/(epoch+1)
        net = fit(mlp(extra_dim=2), loss_step(loss), steps)
        return (lambda x0, nfe: (IF.sample(net, x0, nfe)[0], None)), None
    if method == "ct":
        # sigma_data = the data's std for 2-D (consistency_func.py's 2-D default) [reconstructed]
        ct = consistency_func.ConsistencyTraining(total_steps=steps, sigma_data=setup.target.std().item())
        net = fit(mlp(), loss_step(lambda net, s: ct.loss(net, batch_of(setup.target), s)), steps, lr=1e-3)
        return (lambda x0, nfe: (ct.sample(net, x0, nfe)[0], None)), None
    raise common.UserError(f"unknown method '{method}': choose from {', '.join(METHODS)}")


@torch.no_grad()
def _flow(net, x0, nfe):
    x, info = asfm.RectifiedFlow.sample(net, x0, nfe, return_traj=True)
    return x, info["traj"]


#################################################################################
#                    One metric function for every method                      #
#################################################################################

@torch.no_grad()
def evaluate(sample, velocity, setup, n=2000, seed=1):
    """Sliced W2 to fresh target points at each NFE (common.toy_metrics, n points), and
    straightness S (RF Eq. 3, Euler 100, first 500 points) when the method has a velocity
    field. Every method gets the same x0."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 2, generator=g) if setup.source_pts is None else \
        setup.source_pts[torch.randint(0, len(setup.source_pts), (n,), generator=g)]
    row, samples = {}, {}
    for nfe in NFES:
        samples[nfe], _ = sample(x0, nfe)
        finite = torch.isfinite(samples[nfe]).all()  # an iteration that diverged reports nan
        row[f"nfe{nfe}"] = common.toy_metrics(samples[nfe], setup.ref)["sw2"] if finite else float("nan")
    row["S"] = common.straightness(lambda x, t: velocity(x, t), x0[:500]) if velocity is not None else None
    return row, samples, x0


#################################################################################
#                                Figure and table                               #
#################################################################################

def plot(results, path, lim=6.0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    setups = list(dict.fromkeys(s for s, _ in results))
    methods = list(dict.fromkeys(m for _, m in results))
    cols = 1 + len(NFES)
    fig, axes = plt.subplots(len(methods), cols * len(setups), figsize=(2.2 * cols * len(setups), 2.2 * len(methods)),
                             squeeze=False)
    for ax in axes.flat:
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[], aspect="equal")
    for j, setup in enumerate(setups):
        for i, method in enumerate(methods):
            row = axes[i, j * cols:(j + 1) * cols]
            if (setup, method) not in results:
                for ax in row:
                    ax.axis("off")
                row[0].text(0, 0, f"{method}: noise -> data only", ha="center", fontsize=7)
                continue
            r = results[(setup, method)]
            ref = r["setup"].ref[:1500]
            for ax in row:
                ax.scatter(*ref.T, s=0.5, c="0.85")
            traj = r["traj"]
            if traj is not None:  # Euler-100 paths of 40 starting points
                pts = torch.stack([p[:40] for p in traj])
                row[0].plot(pts[:, :, 0], pts[:, :, 1], lw=0.5, c="C0")
            else:  # no ODE path: draw the one-step map from each start to its sample
                a, b = r["x0"][:40], r["samples"][1][:40]
                row[0].plot(torch.stack([a[:, 0], b[:, 0]]), torch.stack([a[:, 1], b[:, 1]]), lw=0.5, c="C1")
            row[0].scatter(*r["x0"][:40].T, s=3, c="k")
            row[0].set_title(f"{method} ({setup}): paths", fontsize=7)
            for ax, nfe in zip(row[1:], NFES):
                ax.scatter(*r["samples"][nfe][:1500].T, s=0.5, c="C3")
                ax.set_title(f"NFE {nfe}: W2 {r['row'][f'nfe{nfe}']:.2f}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(results):
    fmt = lambda v: f"{v:.3f}" if v == v else "diverged"  # noqa: E731 (nan: non-finite samples)
    lines = ["| set-up | method | W2 @ NFE 1 | W2 @ NFE 2 | W2 @ NFE 100 | straightness S | train s |",
             "|---|---|---|---|---|---|---|"]
    for (setup, method), r in results.items():
        row = r["row"]
        S = "-" if row["S"] is None else f"{row['S']:.3f}"
        lines.append(f"| {setup} | {method} | {fmt(row['nfe1'])} | {fmt(row['nfe2'])} | {fmt(row['nfe100'])} | {S} "
                     f"| {r['seconds']:.1f} |")
    return "\n".join(lines)


#################################################################################
#                                      CLI                                      #
#################################################################################

def main(argv=None):
    p = common.one_line_errors(argparse.ArgumentParser(description=__doc__,
                                                       formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)}")
    p.add_argument("--dist", default="8gaussians", help="target of set-up (a): a common.py 2-D toy")
    p.add_argument("--data", default=None, help="FILE.npy of [N, 2] points: target of set-up (a)")
    p.add_argument("--setups", default="a,b", help="a = noise -> data, b = 3 Gaussians -> 3 Gaussians")
    p.add_argument("--steps", type=int, default=2000, help="training steps (reflow/ASFM: half, from 1-RF)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/toy2d", help="folder for toy2d.png and toy2d.md")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = common.parse_given(p, common.attach_negative_values(argv))
    common.check_numbers(args, {"steps": "[10, 1000000]", "seed": "[0, 4294967295]"})
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise common.UserError(f"unknown method '{m}': choose from {', '.join(METHODS)}")
    if not methods:
        raise common.UserError(f"--methods '{args.methods}' names no method: choose from {', '.join(METHODS)}")
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:  # the second would reuse the first's training (and report 0 s)
        raise common.UserError(f"--methods {args.methods} names {', '.join(twice)} more than once: "
                               "name each once")
    chosen = args.setups.split(",")
    if not args.setups or set(chosen) - {"a", "b"}:
        raise common.UserError(f"--setups {args.setups}: use a, b or a,b")
    flows = set(methods) & set(FLOWS)
    if "a" not in chosen and not flows:
        raise common.UserError(f"--methods {args.methods} start from noise, so they run in set-up a only: "
                               "add --setups a, or a flow (rf, reflow, asfm, scoreflow)")
    if "b" in chosen and "setups" in args.given and not flows:
        raise common.UserError(f"--setups {args.setups}: set-up b runs the flows only (rf, reflow, asfm, "
                               f"scoreflow) and --methods {args.methods} names none: add one, or pass "
                               "--setups a")
    target = sorted({"dist", "data"} & args.given)  # the flags that name set-up a's target
    if len(target) == 2:
        raise common.UserError("--dist and --data both name the target of set-up a: pass one")
    if target and "a" not in chosen:
        raise common.UserError(f"--{target[0]} names the target of set-up a, which --setups {args.setups} "
                               f"does not run: add a to --setups, or leave --{target[0]} out")
    try:  # fail now, not after the training
        os.makedirs(args.out, exist_ok=True)
        open(os.path.join(args.out, "toy2d.md"), "a").close()
    except OSError as e:
        raise common.UserError(f"--out {args.out}: cannot write there ({e.strerror})") from None
    torch.set_num_threads(min(2, torch.get_num_threads()))
    g = torch.Generator().manual_seed(0)
    setups = []
    if "a" in chosen:
        if args.data:
            x = common.load_data(argparse.Namespace(dataset="points", data_dir=args.data, image_size=None)).x
            perm = torch.randperm(len(x), generator=g)
            train_pts, ref = (x, x) if len(x) < 400 else (x[perm[len(x) // 5:]], x[perm[: len(x) // 5]])
            name = os.path.basename(args.data)
        else:
            train_pts, ref, name = common.toy_sample(args.dist, 20_000, g)[0], common.toy_sample(args.dist, 2000, g)[0], args.dist
        setups.append(Setup(f"noise->{name}", train_pts, ref))
    if "b" in chosen:
        setups.append(Setup("3->3 gaussians", common.toy_sample("tri-tgt", 20_000, g)[0],
                            common.toy_sample("tri-tgt", 2000, g)[0], source=common.toy_sample("tri-src", 20_000, g)[0]))
    results, t_all = {}, time.time()
    for setup in setups:
        cache = {}
        for method in methods:
            if setup.source_pts is not None and method not in FLOWS:
                continue  # noise -> data methods only
            torch.manual_seed(args.seed)
            t0, had_rf = time.time(), "rf" in cache
            sample, velocity = train_method(method, setup, args.steps, cache)
            seconds = time.time() - t0
            if method == "rf":  # the shared 1-RF's time is its own row's, whichever method trained it
                seconds = cache["rf_seconds"]
            elif method in ("reflow", "asfm") and not had_rf:
                seconds -= cache["rf_seconds"]
            row, samples, x0 = evaluate(sample, velocity, setup)
            traj = sample(x0[:40], 100)[1]
            results[(setup.name, method)] = dict(row=row, samples=samples, x0=x0, traj=traj,
                                                 seconds=seconds, setup=setup)
            print(f"{setup.name:>18} {method:>9}: W2 NFE1 {row['nfe1']:.3f} NFE2 {row['nfe2']:.3f} "
                  f"NFE100 {row['nfe100']:.3f}  S {row['S'] if row['S'] is None else round(row['S'], 3)}"
                  f"  ({seconds:.1f} s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    md = table(results)
    header = (f"`{shlex.join(['python', 'toy2d.py'] + argv)}`" +  # the command as run, flags and all
              f" — {len(results)} runs, {args.steps} steps, seed {args.seed}, "
              f"{time.time() - t_all:.0f} s in all on {os.cpu_count()} CPU cores\n\n")
    with open(os.path.join(args.out, "toy2d.md"), "w") as f:
        f.write(header + md + "\n")
    plot(results, os.path.join(args.out, "toy2d.png"))
    print("\n" + md)
    print(f"\nwrote {args.out}/toy2d.png and {args.out}/toy2d.md ({time.time() - t_all:.0f} s)")
    return results


if __name__ == "__main__":
    common.run_cli(main)
