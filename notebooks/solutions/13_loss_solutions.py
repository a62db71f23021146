"""Solutions to the exercises of chapter 13 (the loss). Run by the hidden last cell of
13_loss.ipynb."""

import numpy as np

from tinygemma.evaluate import nll, token_nll


def my_cross_entropy(logits, targets):
    """Your turn: -log softmax(logits)[t, targets[t]] per row, stable, in float64."""
    z = np.asarray(logits, np.float64)  # [T, V]: float64 before the sum over V
    z = z - z.max(axis=-1, keepdims=True)  # [T, V]: the largest is 0, so exp cannot overflow
    log_sum = np.log(np.exp(z).sum(axis=-1))  # [T]: log of the softmax's denominator
    return log_sum - z[np.arange(len(targets)), targets]  # [T]


def shuffled_words_loss(model, text, seed=0):
    """1. (loss of the text, loss of the same words in a random order), in nats per token.

    The shuffled text has the same words, so a model of word frequencies alone would give it
    the same loss; what it costs more is what the model knows about order: grammar, phrases,
    the sense of a sentence.
    """
    words = text.split()
    shuffled = " ".join(np.random.default_rng(seed).permutation(words))
    return (model.loss(model.tokenizer.encode(text)),
            model.loss(model.tokenizer.encode(shuffled)))


def loss_at_temperatures(model, ids, taus):
    """2. The loss of ``ids`` when every distribution is softmax(z / tau), for each tau.

    One forward pass: the logits do not depend on tau. The loss is lowest near tau = 1
    (a model trained by this very loss is calibrated on text like its training data): a
    smaller tau makes it overconfident where it is wrong, a larger one underconfident where
    it is right.
    """
    ids = np.asarray(ids)
    z = model.forward(ids[:-1])  # [T-1, V]
    return np.array([nll(z / tau, ids[1:]).mean() for tau in taus])  # [len(taus)]


def loss_without_bos(model, text):
    """3. (loss with BOS first, loss of the same tokens without BOS).

    Without BOS the first text token has nothing to be predicted from, so both losses score
    the same predictions of tokens 2.. only; the difference is what the missing BOS does to
    the model's state. Gemma was trained with BOS always first: without it the first
    position is out of distribution, and every later position attends to it.
    """
    ids = np.asarray(model.tokenizer.encode(text))  # BOS first
    with_bos = np.concatenate(list(token_nll(model, ids)))[1:]  # skip the prediction from BOS
    without = np.concatenate(list(token_nll(model, ids[1:])))
    return float(with_bos.mean()), float(without.mean())

