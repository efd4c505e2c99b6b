"""`bench.py --memory`: the CUDA memory of one training step, estimated without a GPU. torch's MemTracker
(torch.distributed._tools.mem_tracker) follows every tensor of a step run on fake tensors (FakeTensorMode:
shapes and dtypes, no data, no compute) and reports the peak, split into parameters, gradients, optimizer
state, activations and temporaries. Fake tensors live on the CPU here (this torch has no CUDA): the figure
is what the step's tensors take, without the CUDA kernels' workspaces (cuDNN, cuBLAS, flash attention)
and the allocator's caching and fragmentation, so a GPU's `max_memory_reserved` is higher.

    python bench.py --memory                 # ours vs AnimateDiff, 16x256x256, batch 1 and 8, +-checkpointing
    python bench.py --memory --old-case      # also the old bench case (whole UNet float16, AdamW on fp16 adapters)

Ours is built by train.py itself (`train.build_run`, loading through checkpoint.py) from a random SD-1.5 in
the official layout (`random_sd`: checkpoint.read_tensors made to hand out fake tensors), and runs
train.py's step: the text encoder and the VAE encode the clips, the UNet regresses the noise, backward,
gradient clipping, AdamW. AnimateDiff's trainer is diffusers' UNetMotionModel (SD-1.5's UNet with a
MotionAdapter), the motion modules trainable and the rest frozen, held as ours is (frozen weights in the
compute dtype, the trained ones float32, autocast; AnimateDiff's own train.py keeps the frozen weights
float32), on the same text encoder, VAE and inputs.
"""
import tempfile
from unittest import mock

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

import loader
import runtime
import unet as unet_module
from adapters import SimDAConfig, freeze_for_training
from bench_unet import TINY, build_run, diffusers_unet_config, random_sd

GIB = 2**30


class _NoHook:
    def remove(self):
        pass


class Tracker(MemTracker):
    """MemTracker that hooks the gradients of trainable parameters only: a frozen parameter refuses a
    gradient hook ("cannot register a hook on a tensor that doesn't require gradient"), and has no gradient."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        for p in module.parameters():
            if not p.requires_grad:
                self._param_to_grad_hook_handles.setdefault(p, (_NoHook(), _NoHook()))
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    def _pre_fw_hook(self, module, inputs):
        # a module called again outside backward (the VAE's encoder on each chunk of frames, every module in
        # the next step) is refused as "multiple iterative calls": its per-module stats start over instead
        # (the peak, which is global, is kept)
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            del self.memory_tracking[module]
        super()._pre_fw_hook(module, inputs)

    def peak(self):
        """{kind: bytes} at the peak, summed over devices, and "total"."""
        out = {}
        for snapshot in self.get_tracker_snapshot("peak").values():
            for kind, size in snapshot.items():
                name = getattr(kind, "value", kind)  # a _MemRefType, or "Total"
                out[name] = out.get(name, 0) + size
        return out


def step(run, model, params, optimizer, inputs):
    """train.py's step (train.train_step but the host-side loss check, which a fake tensor cannot take)
    on `model`: the inputs made by train.py's loader, the MSE, backward, clipping, AdamW."""
    with run.autocast():
        x, t, target, context, y = loader.make_inputs(run.pipe, *inputs, run.args.seed, run.device)
        loss = F.mse_loss(model(x, t, context, y).float(), target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, run.args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def animatediff(run, dtype, checkpointing):
    """(model(x, t, context, y), trainable params, AdamW): diffusers' UNetMotionModel on SD-1.5's UNet,
    AnimateDiff's MotionAdapter trainable in float32, the rest frozen in `dtype`."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
    c = run.pipe.unet.config
    adapter = MotionAdapter(block_out_channels=[c.model_channels * m for m in c.channel_mult],
                            motion_layers_per_block=c.num_res_blocks, motion_norm_num_groups=32,
                            motion_num_attention_heads=c.num_heads, motion_max_seq_length=32)
    with mock.patch.object(torch.nn.Module, "to", lambda self, *args, **kwargs: self):  # all float32 on the CPU
        model = UNetMotionModel.from_unet2d(UNet2DConditionModel(**diffusers_unet_config(c)), adapter)
    model.freeze_unet2d_params()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in model.parameters():  # .data: Module.to cannot swap fake tensors
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()

    def forward(x, t, context, y=None):  # AnimateDiff takes the text of every frame: [B*F, 77, D]
        return model(x, t, encoder_hidden_states=context.repeat_interleave(x.shape[2], 0)).sample
    return forward, params, torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)


def with_state(optimizer, params):
    """`optimizer` with its state made (an AdamW step on zero gradients): the tracked step is then a step of
    a run underway, AdamW's moments held from its start (two tracked steps estimated the same peaks)."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def estimate(who, frames=16, size=256, batch=1, precision="bfloat16", checkpointing=True, configs=None):
    """{kind: bytes} at the peak of one training step of a run underway (AdamW's state made before)."""
    with tempfile.TemporaryDirectory() as folder, random_sd(configs), \
            FakeTensorMode(allow_non_fake_inputs=True):  # the clips and token ids are made as real tensors
        run = build_run(folder, frames, size, batch, precision, checkpointing)
        if who == "ours":
            model, params, optimizer = run.model, run.params, run.optimizer
        else:
            model, params, optimizer = animatediff(run, runtime.DTYPES[precision], checkpointing)
        gs, samples = run.feed.next()
        tracker = Tracker()
        tracker.track_external(with_state(optimizer, params))
        with tracker:
            step(run, model, params, optimizer, (samples, gs))
        return tracker.peak()


def estimate_old_case(frames=16, size=256, batch=1):
    """The old `bench.py --cases simda_train` (docs/benchmarks.md's 2.99 GB on an H200): the whole SimDA UNet
    cast to float16, no autocast, no scaler, AdamW on float16 adapters, random float16 latents and text."""
    with FakeTensorMode():
        config = unet_module.UNetConfig()
        model = unet_module.UNet(config, SimDAConfig())
        for p in model.parameters():  # .half(); .data: Module.to cannot swap fake tensors
            p.data = p.data.half()
        params = freeze_for_training(model)
        model.gradient_checkpointing = True
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        x = torch.randn(batch, 4, frames, size // 8, size // 8, dtype=torch.float16)
        context = torch.randn(batch, 77, config.context_dim, dtype=torch.float16)
        tracker = Tracker()
        tracker.track_external(with_state(optimizer, params))
        with tracker:
            model(x, torch.full((batch,), 500), context).float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return tracker.peak()


def row(label, peak):
    kinds = ["Parameter", "Gradient", "Optstate", "Activation", "Temp"]
    parts = "".join(f"{peak.get(k, 0) / GIB:>10.2f}" for k in kinds)
    return f"{label:<44}{peak['Total'] / GIB:>8.2f}{parts}"


def run(args):
    """Print the estimated peaks: ours and AnimateDiff's side by side at batch 1 and 8, with and without
    gradient checkpointing, in bfloat16 and float16 (--dtypes), at --frames x --size x --size."""
    print(f"estimated CUDA peak of one training step (MemTracker on fake tensors, GiB; no kernel workspaces, no "
          f"allocator caching), SD-1.5, {args.frames} frames x {args.size}x{args.size}")
    header = "".join(f"{k:>10}" for k in ("params", "grads", "AdamW", "activ.", "temp."))
    print(f"{'trainer, batch, precision, checkpointing':<44}{'peak':>8}{header}")
    if args.old_case:
        print(row("old bench case (UNet fp16, fp16 AdamW), 1", estimate_old_case(args.frames, args.size)), flush=True)
    whos = ["ours", "animatediff"] if not args.no_peers else ["ours"]
    for batch in (int(b) for b in args.memory_batches.split(",")):
        for precision in args.memory_dtypes.split(","):
            for checkpointing in (True, False):
                for who in whos:
                    peak = estimate(who, args.frames, args.size, batch, precision, checkpointing,
                                    TINY if args.tiny else None)
                    print(row(f"{who}, {batch}, {precision}, {'on' if checkpointing else 'off'}", peak), flush=True)
