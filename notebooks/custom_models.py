"""A small custom model for notebook 02: paramcalc counts it from ``custom_models:lstm_classifier``.

paramcalc calls the factory with no arguments (on the meta device), so the sizes are module constants
that the notebook reads back for its hand derivation.
"""

from torch import nn

VOCAB = 10_000  # tokens
EMBED = 128  # embedding width
HIDDEN = 256  # LSTM hidden size
LAYERS = 2  # stacked LSTM layers
CLASSES = 5  # output labels


class LSTMClassifier(nn.Module):
    """Token ids -> embedding -> stacked LSTM -> linear classifier on the last hidden state."""

    def __init__(self, vocab=VOCAB, embed=EMBED, hidden=HIDDEN, layers=LAYERS, classes=CLASSES):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed, padding_idx=0)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, ids):
        output, _ = self.lstm(self.embedding(ids))
        return self.classifier(output[:, -1])


def lstm_classifier():
    """The factory paramcalc calls: ``paramcalc custom_models:lstm_classifier``."""
    return LSTMClassifier()
