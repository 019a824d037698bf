"""Min-SNR-gamma loss weighting (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy",
2023), shared by the backbone build and the branch trainer.

The plain MSE on a v-prediction target weights the x0 error of a step by ``snr + 1``: the nearly clean steps,
where the image is already decided, dominate the gradient. Min-SNR caps that x0 weight at ``gamma``, which
moves the gradient to the noisy steps where layout, colour and shape are decided.
"""

from __future__ import annotations

import torch

from polybridge.errors import PolyBridgeValueError


def timestep_snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` of each timestep (0 at a zero-terminal-SNR end)."""
    alphas = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas / (1 - alphas)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample weights of the MSE on the model's target.

    For ``epsilon``: ``min(snr, gamma) / snr``; for ``v_prediction``: ``min(snr + 1, gamma) / (snr + 1)``, i.e.
    an x0 weight of ``min(snr + 1, gamma)``: 1 at pure noise (where the layout is decided), capped near the data.
    """
    if gamma <= 0:
        raise PolyBridgeValueError(f"min-SNR gamma must be positive, got {gamma}")
    if prediction_type == "epsilon":
        return torch.clamp(snr, max=gamma) / snr
    if prediction_type == "v_prediction":
        return torch.clamp(snr + 1, max=gamma) / (snr + 1)
    raise PolyBridgeValueError(f"prediction_type {prediction_type!r} has no min-SNR weighting; valid: epsilon, v_prediction")
