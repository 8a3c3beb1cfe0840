"""The short causal depthwise convolution in front of the S and D scans, with its decoding cache.

Both mixers run ``silu(conv1d(x))`` over their projected channels with a kernel of a few taps
(``ssm_conv``, ``dn_conv``). Decoding keeps the last ``kernel - 1`` conv inputs: new tokens run
the conv over [cached inputs, new], so any split of a sequence gives the full forward's outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_conv_silu"]


def causal_conv_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor | None,
) -> torch.Tensor:
    """SiLU of the causal depthwise conv over ``x`` [B, T, C] -> [B, T, C].

    ``weight`` is a depthwise ``nn.Conv1d``'s [C, 1, K]. With ``conv_state`` [B, C, K - 1]
    (the last conv inputs, zeros for a new sequence) the conv continues from it, and the
    state is updated in place to the last K - 1 inputs.
    """
    T = x.shape[1]
    x = x.transpose(1, 2)
    k = weight.shape[-1]
    channels = weight.shape[0]
    if conv_state is None:
        # The conv pads both ends; the first T outputs are the causal ones.
        out = F.conv1d(x, weight, bias, padding=k - 1, groups=channels)[..., :T]
    else:
        padded = torch.cat([conv_state.to(x.dtype), x], dim=-1)
        keep = padded.shape[-1] - (k - 1)
        conv_state.copy_(padded[..., keep:])
        out = F.conv1d(padded, weight, bias, groups=channels)
    # Back to [B, T, C] and contiguous once, so that every later elementwise op and
    # product reads dense memory instead of a transposed view.
    return F.silu(out.transpose(1, 2).contiguous())
