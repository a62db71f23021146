"""Solutions to the exercises of chapter 09 (prompting Gemma)."""

import numpy as np

from tinygemma.layers import softmax


def multi_turn_by_hand(turns):
    """1. The turns alternate user / model; each closed by <end_of_turn> and a newline."""
    roles = ["user", "model"] * len(turns)
    text = "".join(f"<start_of_turn>{r}\n{t}<end_of_turn>\n" for r, t in zip(roles, turns))
    text += "<start_of_turn>model\n"  # the model's turn, left open
    conversation = [{"role": r, "content": t} for r, t in zip(roles, turns)]
    return text, conversation


FEW_SHOT = ("Review: The plot was dull and the acting was worse.\nSentiment: negative\n\n"
            "Review: Great service and delicious food!\nSentiment: positive\n\n"
            "Review: I would not recommend this hotel to anyone.\nSentiment: negative\n\n"
            "Review: The best concert I have been to in years.\nSentiment: positive\n\n")


def sentiment(model, reviews):
    """2. p(' positive') and p(' negative') as the next token after 'Sentiment:'."""
    tok = model.tokenizer
    pos, neg = tok.encode(" positive", add_bos=False), tok.encode(" negative", add_bos=False)
    assert len(pos) == len(neg) == 1, "each label should be one token"
    out = {}
    for review in reviews:
        ids = tok.encode(FEW_SHOT + f"Review: {review}\nSentiment:")
        p = softmax(model.forward(np.array(ids), last_only=True)[0].astype(np.float64))
        out[review] = (float(p[pos[0]]), float(p[neg[0]]))
    return out


def chat_or_plain(model, question, k=5):
    """3. The top-k first tokens with and without the chat format."""
    tok = model.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": question}])
    plain = tok.encode(question + ".\n")
    tops = []
    for ids in (chat, plain):
        z = model.forward(np.array(ids), last_only=True)[0]
        tops.append([tok.id_to_piece(int(i)) for i in np.argsort(-z)[:k]])
    return tops
