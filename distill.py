"""Latent consistency distillation (LCD: Luo et al. 2023, Algorithm 1 with a DDIM solver) of SimDA's adapters, as
`train.py --distill TEACHER` runs it: the adapters become a consistency model that lcm.py samples in a few steps.

Three adapter sets share the one frozen SD (only adapter weights differ; torch.func.functional_call runs the UNet
with another set's tensors in place of the adapters, so no second UNet is held):
  teacher  the adapters of the file --distill names, frozen; run with classifier-free guidance at a scale w drawn
           per sample from --guidance-range (the uncond and cond halves in one batched call);
  student  the adapters trained, starting as the teacher's (or as --init-from's);
  target   an exponential moving average of the student (--ema-rate; 0: the student itself, without gradient).
One step, per sample: the clean latents x0 and the text of every run's data, then from the generator
(seed, "noise", g) a timestep t of the grid lcm.grid(k) (k: --distill-skip), the noise and w;
  x      = add_noise(x0, noise, t)
  x_prev = ddim.step(x, the teacher's guided output, t, t - k)    one DDIM step of the teacher's ODE (t - k < 0:
                                                                  the clean end, where f's boundary makes f = x)
  loss   = pseudo_huber(f_student(x, t), f_target(x_prev, t - k))  f: lcm.consistency; the target without gradient
and after the optimizer's step, target <- rate * target + (1 - rate) * student. Phased (--phases N; PCM: Wang et
al. 2024), f maps t to the end of its phase of the trajectory instead (lcm.phased_consistency: the DDIM step to
the next of N lcm timesteps below t), and at a phase's end the target is x_prev itself. The adapter file of a
distilled run says so in its metadata ("distilled": the teacher, k, the guidance range, the phases), which
sample.py reads to sample with lcm.
"""
from dataclasses import asdict, dataclass

import torch
from torch.func import functional_call

import data
import ddim
import lcm
import loader
import simda
from adapters import adapter_state_dict

HUBER_C = 0.001  # LCM's pseudo-Huber constant (in latent units)


@dataclass
class Settings:
    """What a distillation run is, as the adapter file's metadata and state.pt's config record it."""
    teacher: str
    skip: int = lcm.SKIP
    guidance: tuple = (7.5, 7.5)  # the teacher's guidance scales, drawn uniformly per sample
    ema_rate: float = 0.95
    huber_c: float = HUBER_C
    start: str = None  # distilled adapters the student starts from (None: the teacher's)
    lora_rank: int = 0  # > 0: the student also trains a LoRA of this rank beside the frozen SD (adapters.LoRA)
    phases: int = 0  # > 0: phased consistency (lcm.phased_consistency) over this many phases; 0: LCM's f
    solve_phases: bool = False  # phased: the teacher solves the rest of the phase, which is the target (no target net)


def add_flags(parser):
    g = parser.add_argument_group("consistency distillation (few-step sampling with sample.py --sampler lcm)")
    g.add_argument("--distill", metavar="TEACHER", help="distil these trained adapters (the teacher, with guidance) "
                   "into adapters that sample in a few steps; the student starts from them (default: off)")
    g.add_argument("--distill-skip", type=int, default=lcm.SKIP, metavar="K",
                   help="--distill: the teacher's DDIM step from t to t - K, and the grid of training timesteps "
                        "(default: %(default)s)")
    g.add_argument("--ema-rate", type=float, default=Settings.ema_rate, help="--distill: the target's moving "
                   "average of the student; 0: the student itself, without gradient (default: %(default)s)")
    g.add_argument("--guidance-range", default="7.5", metavar="LO[,HI]", help="--distill: the teacher's guidance "
                   "scale, drawn per sample from LO to HI (default: %(default)s)")
    g.add_argument("--lora-rank", type=int, default=0, metavar="R", help="--distill: the student also trains a LoRA "
                   "of rank R beside every attention projection and ResBlock convolution of the frozen SD, more "
                   "capacity than the adapters alone (default: 0, none)")
    g.add_argument("--phases", type=int, default=0, metavar="N", help="--distill: phased consistency (PCM): f maps "
                   "each of N phases of the trajectory to the phase's end, and N lcm steps sample deterministically "
                   "(default: 0, LCM: every timestep to the clean end)")
    g.add_argument("--solve-phases", action="store_true", help="--distill --phases: the teacher's DDIM steps of K run "
                   "from t to the end of its phase, and the student learns that end directly, with no target network")
    g.add_argument("--huber-c", type=float, default=HUBER_C, help="--distill: the pseudo-Huber loss's constant "
                   "(default: %(default)s)")


def check_flags(args):
    """Settings of --distill (None without it), checked before any model loads; settles --val-sampler and
    --val-steps (lcm and 4, or a step a phase, for distillation, else dpm++ and 25)."""
    args.val_sampler = args.val_sampler or ("lcm" if args.distill else simda.SD_SAMPLING[0])
    args.val_steps = args.val_steps or ((args.phases or simda.LCM_STEPS) if args.val_sampler == "lcm" else 25)
    if args.val_sampler == "lcm" and not args.distill:
        raise ValueError("--val-sampler lcm samples distilled adapters: add --distill TEACHER, or pick ddim or dpm++")
    if args.lora_rank and not args.distill:
        raise ValueError("--lora-rank adds a LoRA to a distillation's student: add --distill TEACHER, or drop it")
    if not args.distill:
        return None
    if args.stage == "sr" or args.given_frames:
        raise ValueError("--distill distils text-to-video sampling: drop --stage sr and --given-frames")
    if args.no_latent_shift or args.no_temporal_adapters or args.no_spatial_adapters:
        raise ValueError("--distill: the student has the teacher's adapters; drop the --no-* ablation flags")
    meta = simda.read_adapters(args.distill)[1]  # a missing or unreadable file: one line
    if meta.get("distilled"):
        raise ValueError(f"--distill {args.distill} holds distilled adapters already: distil the adapters they came "
                         f"from ({meta['distilled']['teacher']})")
    lcm.grid(args.distill_skip)
    try:
        guidance = tuple(float(v) for v in args.guidance_range.split(","))
    except ValueError:
        guidance = ()
    if len(guidance) == 1:
        guidance *= 2
    if len(guidance) != 2 or not 1 <= guidance[0] <= guidance[1]:
        raise ValueError(f"--guidance-range takes LO or LO,HI with 1 <= LO <= HI, got {args.guidance_range!r}")
    if not 0 <= args.ema_rate < 1 or not args.huber_c > 0 or args.lora_rank < 0:
        raise ValueError(f"--ema-rate must be in [0, 1), --huber-c > 0 and --lora-rank >= 0, got {args.ema_rate}, "
                         f"{args.huber_c} and {args.lora_rank}")
    if not 0 <= args.phases <= len(lcm.grid(args.distill_skip)):
        raise ValueError(f"--phases must be in [0, {len(lcm.grid(args.distill_skip))}] (the timesteps of "
                         f"--distill-skip {args.distill_skip}), got {args.phases}")
    made = args.init_from and simda.read_adapters(args.init_from)[1].get("distilled")
    wanted = flags(dict(skip=args.distill_skip, lora_rank=args.lora_rank, phases=args.phases))
    if args.init_from and (not made or flags(made) != wanted):  # the student and its target start there
        raise ValueError(f"--init-from {args.init_from} holds " + (
            f"adapters distilled with {flags(made)}, not {wanted}" if made else "adapters that were not distilled"))
    if args.solve_phases and not args.phases:
        raise ValueError("--solve-phases solves each phase of a phased distillation: add --phases N")
    return Settings(args.distill, args.distill_skip, guidance, args.ema_rate, args.huber_c, args.init_from,
                    args.lora_rank, args.phases, args.solve_phases)


def flags(distilled):
    """The flags a distilled file's student must be continued with (its metadata's "distilled" entry)."""
    return (f"--distill-skip {distilled['skip']} --lora-rank {distilled.get('lora_rank', 0)} "
            f"--phases {distilled.get('phases', 0)}")


def pseudo_huber(a, b, c=HUBER_C):
    """mean(sqrt((a - b)^2 + c^2) - c): L2 near 0, L1 beyond c (Song and Dhariwal 2023; LCM's loss)."""
    return (((a.float() - b.float()) ** 2 + c**2).sqrt() - c).mean()


@torch.no_grad()
def ema_(target, student, rate):
    """target <- rate * target + (1 - rate) * student, in place, for each tensor of the dict `target`."""
    for key, value in target.items():
        value.lerp_(student[key].detach().to(value.dtype), 1 - rate)


def draw(seed, gs, settings, like):
    """(timesteps t [B] of the grid, the noise shaped like `like`, guidance scales w [B]) of the samples gs."""
    steps, ts, noise, w = lcm.grid(settings.skip), [], [], []
    (lo, hi) = settings.guidance
    for g in gs:
        gen = data.generator(seed, "noise", g)
        ts.append(steps[torch.randint(0, len(steps), (1,), generator=gen)])
        noise.append(torch.randn(like.shape[1:], generator=gen))
        w.append(lo + (hi - lo) * torch.rand(1, generator=gen, dtype=torch.float64))
    return torch.cat(ts).to(like.device), torch.stack(noise).to(like.device), torch.cat(w).float().to(like.device)


class Distiller:
    """The teacher's and the target's adapters beside the student's (the UNet's own), and the consistency loss."""

    def __init__(self, pipe, settings, optimizer, state=None):
        """Before train.py's resume loads the student: the UNet holds the teacher's adapters. The target follows
        every step of `optimizer` (a post-step hook); `state`: a saved run's state.pt, whose target it takes."""
        self.pipe, self.settings = pipe, settings
        self.student = {k: p for k, p in pipe.unet.named_parameters() if p.requires_grad}
        self.teacher = {k: v.detach().clone() for k, v in adapter_state_dict(pipe.unet).items()}
        if settings.start:  # the student goes on from adapters distilled before
            simda.load_adapters(pipe.unet, simda.read_adapters(settings.start)[0], settings.start)
        student = adapter_state_dict(pipe.unet)
        self.target = {k: v.detach().clone() for k, v in student.items()} if settings.ema_rate > 0 and not settings.solve_phases else None
        self.uncond = pipe.text_context([""])  # the teacher's unconditional side: the empty prompt
        pipe.distilled = metadata(settings)  # what validation samples with
        optimizer.register_step_post_hook(lambda *_: self.update_target())
        if state is not None:  # a --resume: the saved LoRA must be this run's to load, and the phases its objective
            saved = state["config"].get("distill") or {}
            for flag, key in (("--lora-rank", "lora_rank"), ("--phases", "phases")):
                if saved.get(key, 0) != getattr(settings, key):
                    raise ValueError(f"state.pt was saved by a run with {flag} {saved.get(key, 0)}: resume it with "
                                     f"{flag} {saved.get(key, 0)}")
            self.load_state_dict(state.get("target", {}), "state.pt")

    def loss(self, model, batch, gs, seed, device):
        """The consistency distillation loss of the samples gs ([(clip, caption)]: `batch`, as train.py's
        loader.make_inputs takes them); `model` is the student's UNet (or its DDP wrapper)."""
        latents, context = loader.clean_latents(self.pipe, batch, gs, seed, device)
        return self.consistency_loss(model, latents, context, gs, seed)

    def consistency_loss(self, model, latents, context, gs, seed):
        """The loss of clean scaled latents [B, 4, F, h, w] and their text [B, 77, D] (the samples gs)."""
        pipe = self.pipe
        t, noise, w = draw(seed, gs, self.settings, latents)
        x = ddim.add_noise(latents, noise, t, pipe.alphas)
        end = lcm.phase_ends(t, self.settings.phases, self.settings.skip) if self.settings.phases else None
        if self.settings.solve_phases:
            target = self.teacher_to_end(x, t, w, context, end)
        else:
            x_prev = self.teacher_step(x, t, w, context)
            target = self.target_consistency(x_prev, t - self.settings.skip, context, end)
        student = self.consistency(x, model(x, t, context).float(), t, end)
        return pseudo_huber(student, target, self.settings.huber_c)

    def consistency(self, x, out, t, end):
        """f(x, t) of the UNet's output: to the clean end (LCM), or, phased, to the phase's end `end` [B]."""
        if end is None:
            return lcm.consistency(x, out, t, self.pipe.prediction, self.pipe.alphas)
        return lcm.phased_consistency(x, out, t, end, self.pipe.prediction, self.pipe.alphas)

    @torch.no_grad()
    def teacher_step(self, x, t, w, context, t_prev=None):
        """The teacher's DDIM step from t to t_prev (default t - k) [B] of the noisy latents x, guided at the
        scales w [B]."""
        both = functional_call(self.pipe.unet, self.teacher, (torch.cat([x, x]), torch.cat([t, t]),
                                                              torch.cat([self.uncond.expand_as(context), context])))
        uncond, cond = both.float().chunk(2)
        guided = uncond + w.reshape(-1, *[1] * (x.dim() - 1)) * (cond - uncond)
        t_prev = t - self.settings.skip if t_prev is None else t_prev
        return ddim.step(x, guided, t, t_prev, prediction=self.pipe.prediction, alphas=self.pipe.alphas)

    @torch.no_grad()
    def teacher_to_end(self, x, t, w, context, end):
        """--solve-phases: the teacher's DDIM steps of k from t [B] down to the phase's end `end` [B] (grid
        timesteps: whole steps), each step on the samples not there yet."""
        x, t = x.clone(), t.clone()
        while True:
            todo = (t > end).nonzero().squeeze(1)  # a read back a step: one to five steps a phase of five
            if len(todo) == 0:
                return x
            t_next = t[todo] - self.settings.skip
            x[todo] = self.teacher_step(x[todo], t[todo], w[todo], context[todo], t_next)
            t[todo] = t_next

    @torch.no_grad()
    def target_consistency(self, x, t, context, end=None):
        """f_target(x, t) [B]: the target's adapters (the student's with --ema-rate 0) made a consistency function
        (phased: to the student's phase's end `end`, where x itself is the target)."""
        inputs = (x, t.clamp(min=0), context)
        unet = self.pipe.unet
        out = unet(*inputs) if self.target is None else functional_call(unet, self.target, inputs)
        return self.consistency(x, out.float(), t, end)

    def update_target(self):
        if self.target is not None:
            ema_(self.target, self.student, self.settings.ema_rate)

    def state_dict(self):
        return {k: v.cpu() for k, v in (self.target or {}).items()}

    def load_state_dict(self, state, where):
        if self.target is None:
            return
        if set(state) != set(self.target):
            raise ValueError(f"{where} holds no distillation target for these adapters: was it saved by a --distill "
                             f"run with --ema-rate > 0?")
        for k, v in state.items():
            self.target[k].copy_(v)


def metadata(settings):
    """The adapter file's "distilled" entry: how the adapters were made, and how to sample them (lcm.py)."""
    return {**asdict(settings), "guidance": list(settings.guidance), "sampler": "lcm"}
