"""MAD in-context recall sequences placed in a teacher's vocabulary: batches, accuracy, and the
text + recall training objective.

MAD's in-context recall task uses 16 tokens (8 keys, 8 values; sequences of 32 tokens, a loss
only at the recalled values). ``RecallData`` moves them to ids ``offset .. offset + 15`` of the
teacher's vocabulary, so that the recall sequences can be mixed with its text: the
``gates`` placement trains on them (``convert.gates``), and the known-answer study
(``benchmarks/convert_known_answer.py``) trains its teachers on them (``RecallMix``).
"""

from __future__ import annotations

from typing import Any

import torch

from hcomposer.data.mad import MADData, default_task_config, generate_task
from hcomposer.errors import UserError
from hcomposer.model import lm_loss

__all__ = ["RECALL_CHANCE", "RECALL_TOKENS", "RecallData", "RecallMix", "recall_accuracy"]

RECALL_TOKENS = 16  # MAD in-context recall's default vocabulary
RECALL_CHANCE = 1.0 / 8  # 8 value tokens


class RecallData:
    """MAD in-context recall examples of ``seed`` with their tokens moved to ``offset``.

    ``x``/``y``: the training examples (``y`` is -100 where no loss is taken);
    ``test_x``/``test_y``: the held-out ones.
    """

    def __init__(self, seed: int, offset: int, vocab_size: int, n_test: int = 512):
        if offset < 0 or offset + RECALL_TOKENS > vocab_size:
            raise UserError(
                f"recall tokens at ids {offset}..{offset + RECALL_TOKENS - 1} do not fit the "
                f"teacher's vocabulary of {vocab_size} ids; choose an offset from 0 to "
                f"{vocab_size - RECALL_TOKENS}"
            )
        task = default_task_config("in_context_recall", num_test_examples=n_test)
        data: MADData = generate_task(task, seed)
        self.seed, self.offset, self.data = seed, offset, data
        self.x, self.y = self._moved(data.train_inputs, data.train_targets)
        self.test_x, self.test_y = self._moved(data.test_inputs, data.test_targets)

    def _moved(self, inputs, targets) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(inputs) + self.offset
        y = torch.as_tensor(targets)
        return x, torch.where(y >= 0, y + self.offset, y)

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` training examples drawn (with replacement) by ``generator``."""
        idx = torch.randint(0, len(self.x), (n,), generator=generator)
        return self.x[idx], self.y[idx]

    def batch_for(self, text: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` training examples drawn from a generator seeded by the seed and the text
        batch ``text``: the same text step gets the same recall batch, so a resumed run
        draws what an uninterrupted one does."""
        key = int(text.detach().long().sum()) * 1_000_003 + int(text[..., 0].long().sum())
        g = torch.Generator().manual_seed((self.seed * 2_654_435_761 + key) % (2**63))
        return self.batch(n, g)


@torch.no_grad()
def recall_accuracy(model: torch.nn.Module, data: RecallData) -> float:
    """Share of the held-out recall targets the model's argmax gets right."""
    model.eval()
    device = next(model.parameters(), data.test_x).device
    pred = model(data.test_x.to(device)).argmax(-1).cpu()
    scored = data.test_y >= 0
    return float((pred[scored] == data.test_y[scored]).float().mean())


class RecallMix:
    """Training objective: the LM loss on the text batch plus ``weight`` x the LM loss on
    ``batch`` recall sequences (targets only at the recalled values), drawn with the seed."""

    def __init__(self, data: RecallData, batch: int, weight: float = 1.0):
        self.data, self.batch, self.weight = data, batch, weight
        self.gen = torch.Generator().manual_seed(data.seed)

    def check(self, arch, tokenizer) -> None:
        """``RecallData`` checked the vocabulary."""

    def prepare(self, model, device) -> None:
        """Nothing to load: the model trains from its fresh initialisation. (A resumed run
        draws its recall batches afresh from the seed.)"""

    def loss(self, net, x, y) -> torch.Tensor:
        mx, my = self.data.batch(self.batch, self.gen)
        return lm_loss(net(x), y) + self.weight * lm_loss(net(mx.to(x.device)), my.to(x.device))

    def record(self) -> dict[str, Any]:
        return {"kind": "text+mad-recall", "batch": self.batch, "weight": self.weight}
