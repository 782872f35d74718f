"""REPA (representation alignment, paper §3.2 Eq. 6): align the LLM's intermediate features of the noisy latent with
the understanding encoder's features of the clean image.

L_REPA = −E[ mean over tokens of cos( h_φ(q_θ(z_t))_k , stop_grad(f_enc(x))_k ) ], with q_θ the residual stream after
block `repa.layer` at the latent token positions, h_φ the 3-layer projector (`model.RepaProjector`) and f_enc the
SigLIP understanding encoder after its final norm on the 384×384 target image. The latent grid (24×24) and the SigLIP
patch grid (24×24) have the same size by design, so token k of one is token k of the other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def negative_cosine_per_example(projected, target, eps: float = 1e-8):
    """−(mean over tokens of cosine similarity): [batch].

    projected: [batch, tokens, dim] h_φ output; target: [batch, tokens, dim] encoder features. The target carries no
    gradient (stop_gradient here, whatever the caller passes). Normalisation as torch's F.normalize (x / max(‖x‖, eps)),
    in fp32.
    """
    if projected.shape != target.shape:
        raise ValueError(f"REPA projection {projected.shape} and target {target.shape} differ: the latent grid and the "
                         "understanding encoder's patch grid must match (e.g. 48/2 = 384/16 = 24)")
    target = jax.lax.stop_gradient(target).astype(jnp.float32)
    projected = projected.astype(jnp.float32)

    def normalize(x):
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)

    cosine = jnp.sum(normalize(projected) * normalize(target), axis=-1)
    return -jnp.mean(cosine, axis=-1)
