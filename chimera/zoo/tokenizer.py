"""A word-level `tokenizers` tokenizer for the tiny family, saved so `AutoTokenizer` loads it offline.

Words and punctuation are split by the `Whitespace` pre-tokenizer, then every digit becomes its own
token (so column arithmetic is learnable). Unknown words map to `<unk>`. Decoding joins tokens with
spaces ("7 3 1"); the scorers accept spaced digits.

Chat format (also stored as `chat_template`):

    <bos><|user|> What is 4 7 3 + 2 5 8 ?<|assistant|> <think> ... </think> The answer is 7 3 1 . <eos>

`<think>`/`</think>` are added tokens but not *special* ones (as in DeepSeek-R1), so
`decode(..., skip_special_tokens=True)` keeps them.
"""
from __future__ import annotations

import re
from pathlib import Path

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
THINK_TOKENS = ["<think>", "</think>"]
PAD, BOS, EOS, UNK, USER, ASSISTANT = SPECIALS

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|> {{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|> {{ message['content'] }} {{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_SPLIT = re.compile(r"\w+|[^\w\s]+")


def words_of(text: str) -> list[str]:
    """The pre-tokenizer's split, in Python (digits split one by one)."""
    out = []
    for w in _SPLIT.findall(text):
        out.extend(list(w) if w.isdigit() else re.findall(r"\d|\D+", w))
    return out


def build(corpus: list[str]):
    """A `tokenizers.Tokenizer` whose vocabulary is every word of `corpus` (sorted, deterministic)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab_words = sorted({w for text in corpus for w in words_of(text)} | {str(d) for d in range(10)})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + THINK_TOKENS)}
    for w in vocab_words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tok


def wrap(tok):
    """The transformers fast tokenizer around a `tokenizers.Tokenizer`, with the chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save(tok, out_dir: str | Path) -> None:
    wrap(tok).save_pretrained(str(out_dir))
