"""Small building blocks shared by the transformer and the heads: MLP, FFN, inverse sigmoid, Xavier init."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLP", "FeedForward", "inverse_sigmoid", "xavier_weights"]


def xavier_weights(module: nn.Module) -> None:
    """Xavier-uniform on every parameter of ``module`` with two or more dimensions (weight matrices),
    biases and norms untouched: the reference transformer's ``init_weights`` loop."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Logit of values in ``[0, 1]``, clamped away from 0 and 1 by ``eps``; any shape."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last).

    Shapes: ``(..., input_dim) -> (..., output_dim)``.
    """

    def __init__(self, *, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP: num_layers must be >= 1, got {num_layers}")
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class FeedForward(nn.Module):
    """Transformer FFN with residual and post-LayerNorm: ``LN(x + Drop(W2 Drop(ReLU(W1 x))))``.

    Shapes: ``(B, N, C) -> (B, N, C)``.
    """

    def __init__(self, *, embed_dim: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(embed_dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, embed_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear2(self.dropout1(torch.relu(self.linear1(x))))
        return self.norm(x + self.dropout2(y))
