"""PyTorch eager baselines of the same work `bench.py` times in JAX: the velocity forward, a training step, and the
official demo's CFG sampling loop (docs/reference.md §5). For speed comparisons; weights are random.

The model is the one PyTorch reference of JanusFlow (`reference/janusflow_torch.py`: transformers `LlamaForCausalLM`,
timm's SigLIP, diffusers' time embedding, the ShallowUViT towers; the same module the parity tests check against
the JAX model) at the sizes of a `JanusFlowConfig`, plus the REPA projector the objective needs. The LLM runs
PyTorch's SDPA attention here (the parity tests use the eager one: same numbers up to rounding, slower). Tensors
follow torch's layouts: images and latents NCHW.

torch is an optional extra: this module imports it at import time, so import the module lazily
(`bench.py` does, only in its `torch` mode).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from janusflow_jax.convert.janusflow import config_to_official
from janusflow_jax.models.config import JanusFlowConfig
from janusflow_jax.reference import janusflow_torch as ref


class JanusFlowTorch(nn.Module):
    """The reference model and the REPA projector (Linear -> SiLU -> Linear -> SiLU -> Linear), at `cfg`'s sizes."""

    def __init__(self, cfg: JanusFlowConfig):
        super().__init__()
        self.cfg = cfg
        self.model = ref.build_reference(config_to_official(cfg, torch_dtype="float32")).train()
        self.model.language_model.set_attn_implementation("sdpa")
        c, h = cfg.llm.hidden_size, cfg.repa.hidden_dim
        self.repa_projector = nn.Sequential(nn.Linear(c, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(),
                                            nn.Linear(h, cfg.und_encoder.width))

    @property
    def und_encoder(self) -> nn.Module:
        return self.model.vision_und_enc_model

    def understand_logits(self, input_ids, images, image_token_mask, attention_mask):
        """input_ids [batch, seq]; images [batch, 3, H, W] or None -> logits [batch, seq, vocab]."""
        if images is None:
            return self.model.language_model(input_ids=input_ids, attention_mask=attention_mask).logits
        b = images.shape[0]
        slots = torch.ones(b, 1, 1 + self.cfg.und_encoder.num_patches, dtype=torch.bool, device=images.device)
        return ref.understand_logits(self.model, input_ids, images[:, None], image_token_mask, slots, attention_mask)

    def velocity(self, prompt_ids, prompt_mask, z_t, t, return_repa_features=False):
        """v(z_t, t | prompt), recomputing the whole [prompt, t_emb, latent tokens] sequence (the official demo);
        with `return_repa_features` also the REPA projection of the stream after block `repa.layer`."""
        out = ref.velocity(self.model, prompt_ids, prompt_mask, z_t, t, return_repa_features=return_repa_features,
                           repa_layer=self.cfg.repa.layer)
        if not return_repa_features:
            return out
        v, hidden = out
        return v, self.repa_projector(hidden)


def build_model(cfg: JanusFlowConfig, freeze_und_encoder: bool = True, seed: int = 0,
                device: torch.device | str | None = None) -> JanusFlowTorch:
    """Random-initialised model in the config's compute dtype on `device` (default: `default_device()`), created
    there directly (a 1.3B model initialised on the host takes long); SigLIP frozen as in stages 1-2 (no grads)."""
    torch.manual_seed(seed)
    with torch.device(device or default_device()):
        model = JanusFlowTorch(cfg)
    model = model.to(torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)
    if freeze_und_encoder:
        model.und_encoder.requires_grad_(False)
    return model


def default_device() -> torch.device:
    """The GPU when torch sees one, else the CPU (the baselines run where the JAX side runs)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device | str | None = None):
    """Waits for the device's queued work (CUDA runs asynchronously; timings must include it)."""
    if torch.device(device or default_device()).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------- the work
def to_torch_batch(batch: dict, dtype=torch.float32, device: torch.device | str | None = None) -> dict:
    """A `batch.py` batch (numpy, NHWC) -> torch tensors on `device` (NCHW images and latents)."""
    out = {}
    for k, x in batch.items():
        t = torch.from_numpy(x).to(device or default_device())
        if k in ("und/images", "gen/images", "gen/latents"):
            if k == "und/images":
                t = t[:, 0]  # first image of each row (images_per_row = 1 in the configs benchmarked)
            t = t.permute(0, 3, 1, 2).contiguous().to(dtype)
        out[k] = t
    return out


def _next_token_loss_sum(logits, ids, loss_mask):
    ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return (ce * loss_mask[:, 1:].flatten().float()).sum()


def loss(model: JanusFlowTorch, batch: dict, generator: torch.Generator):
    """The JanusFlow objective (AR + rectified flow + REPA, each averaged as `objective.total_loss`) on a batch.

    Attention masks only hide padding (packed rows are not split into segments: same matmul work)."""
    total, ar, ar_count = 0.0, 0.0, 0.0
    for kind in ("und", "text"):
        if f"{kind}/input_ids" in batch:
            ids = batch[f"{kind}/input_ids"].long()
            mask = (batch[f"{kind}/segment_ids"] > 0).long()
            images = batch.get("und/images") if kind == "und" else None
            logits = model.understand_logits(ids, images, batch.get("und/image_token_mask"), mask)
            ar = ar + _next_token_loss_sum(logits, ids, batch[f"{kind}/loss_mask"])
            ar_count = ar_count + batch[f"{kind}/loss_mask"][:, 1:].sum().float()  # a tensor: no host sync
    total = ar / torch.clamp(torch.as_tensor(ar_count), min=1.0)
    if "gen/latents" in batch:
        x = batch["gen/latents"]
        n = x.shape[0]
        # Host generator (reproducible on any device), moved to the batch's device.
        t = torch.sigmoid(torch.randn(n, generator=generator)).to(x.device, x.dtype)  # logit-normal t
        z0 = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        keep = (torch.rand(n, generator=generator) >= 0.1).long()[:, None].to(x.device)  # CFG drop: BOS kept
        prompt_mask = batch["gen/prompt_mask"].long()
        first = (prompt_mask.cumsum(1) == 1) & (prompt_mask != 0)
        prompt_mask = torch.where(keep.bool(), prompt_mask, first.long())
        z_t = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * z0
        v, projected = model.velocity(batch["gen/prompt_ids"].long(), prompt_mask, z_t, t, return_repa_features=True)
        total = total + ((v.float() - (x - z0).float()) ** 2).mean()
        with torch.no_grad():
            target = model.und_encoder(batch["gen/images"])
        cosine = F.cosine_similarity(projected.float(), target.float(), dim=-1)
        total = total - cosine.mean()
    return total


def make_train_step(model: JanusFlowTorch, lr: float = 1e-4, clip_norm: float = 1.0):
    """step(batch) -> loss: forward, backward, global-norm clipping, AdamW (b2 0.95) — the JAX step's work."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    model.train()

    def step(batch):
        opt.zero_grad(set_to_none=True)
        value = loss(model, batch, generator)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        return float(value.detach())

    return step


@torch.no_grad()
def sample_official(model: JanusFlowTorch, prompt_ids, prompt_mask, z0, steps: int, cfg: float):
    """The demo's ODE loop (demo/app_janusflow.py): rows [cond; uncond] (uncond = BOS only), the WHOLE sequence
    recomputed at every Euler step, v = w v_cond - (w - 1) v_uncond, z += v dt. z0 [batch, C, G, G] -> latents."""
    b = z0.shape[0]
    first = (prompt_mask.cumsum(1) == 1) & (prompt_mask != 0)
    ids = torch.cat([prompt_ids, prompt_ids]).long()
    mask = torch.cat([prompt_mask.long(), first.long()])
    z, dt = z0.clone(), 1.0 / steps
    for step in range(steps):
        t = torch.full((2 * b,), step / steps, dtype=z.dtype, device=z.device)
        v = model.velocity(ids, mask, torch.cat([z, z]), t)
        z = z + dt * (cfg * v[:b] - (cfg - 1.0) * v[b:])
    return z
