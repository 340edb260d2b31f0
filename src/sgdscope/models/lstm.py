"""Word-level LSTM language model (the "small" PTB configuration of Zaremba et al., unidirectional)."""

from __future__ import annotations

from torch import Tensor, nn

from sgdscope.models.layers import maybe_dropout

INIT_SCALE = 0.1


class LSTMLanguageModel(nn.Module):
    """Embedding → Dropout → stacked LSTM (dropout between layers) → Dropout → Linear decoder.

    Maps tokens (B, T) int64 to next-token logits (B, T, V). Each batch starts from a zero state, so
    the loss of a batch depends on that batch alone. Every parameter starts U(−0.1, 0.1), the PTB "small"
    ``init_scale``.
    """

    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.dropout = maybe_dropout(dropout)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden, vocab)
        for p in self.parameters():
            nn.init.uniform_(p, -INIT_SCALE, INIT_SCALE)

    def forward(self, tokens: Tensor) -> Tensor:
        h, _ = self.lstm(self.dropout(self.embedding(tokens)))
        return self.decoder(self.dropout(h))
