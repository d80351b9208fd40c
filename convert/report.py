"""`--report`: how far quantization moved the model, measured on a fixed text.

For every position of the text: the KL divergence KL(P_ref || P_quant) of the
next-token distributions, whether both put the same token first, and the
log-likelihood of the actual next token under each (perplexity). The reference
is the unquantized model in the same compute dtype, so the numbers isolate
the quantization.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

# Public domain: Jane Austen, Pride and Prejudice (1813), the opening of chapter 1,
# and Abraham Lincoln, the Gettysburg Address (1863). Fixed: reports stay comparable.
TEXT = """\
It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want \
of a wife. However little known the feelings or views of such a man may be on his first entering a \
neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered \
the rightful property of some one or other of their daughters.
"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"
Mr. Bennet replied that he had not.
"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."
Mr. Bennet made no answer.
"Do you not want to know who has taken it?" cried his wife impatiently.
"You want to tell me, and I have no objection to hearing it."
This was invitation enough.
"Why, my dear, you must know, Mrs. Long says that Netherfield is taken by a young man of large fortune from \
the north of England; that he came down on Monday in a chaise and four to see the place, and was so much \
delighted with it, that he agreed with Mr. Morris immediately; that he is to take possession before \
Michaelmas, and some of his servants are to be in the house by the end of next week."
"What is his name?"
"Bingley."
"Is he married or single?"
"Oh! Single, my dear, to be sure! A single man of large fortune; four or five thousand a year. What a fine \
thing for our girls!"
Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in \
Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great \
civil war, testing whether that nation, or any nation so conceived and so dedicated, can long endure. We \
are met on a great battle-field of that war. We have come to dedicate a portion of that field, as a final \
resting place for those who here gave their lives that that nation might live. It is altogether fitting \
and proper that we should do this.
"""


@dataclass
class Quality:
    positions: int
    mean_kl: float  # nats per position
    top1_agreement: float  # fraction of positions
    ppl_reference: float
    ppl_quantized: float

    def lines(self) -> list:
        return [f"quality on {self.positions} positions of the report text:",
                f"  mean KL(unquantized || quantized): {self.mean_kl:.5f} nats",
                f"  top-1 agreement: {100 * self.top1_agreement:.2f}%",
                f"  perplexity: {self.ppl_reference:.3f} unquantized, {self.ppl_quantized:.3f} quantized"]


def log_probs(model, tokens: list) -> np.ndarray:
    """float64 log-softmax of the logits [L, vocab] of one sequence."""
    logits = model(mx.array([tokens]))[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True), dtype=np.float64)


def compare(reference: np.ndarray, quantized: np.ndarray, tokens: list) -> Quality:
    """Both arguments: log_probs() of the same tokens."""
    p = np.exp(reference)
    kl = np.sum(p * (reference - quantized), axis=-1)
    agree = np.argmax(reference, axis=-1) == np.argmax(quantized, axis=-1)
    nxt = np.asarray(tokens[1:])
    rows = np.arange(len(nxt))
    ppl = [float(np.exp(-np.mean(lp[rows, nxt]))) for lp in (reference, quantized)]
    return Quality(len(tokens), float(np.mean(kl)), float(np.mean(agree)), *ppl)
