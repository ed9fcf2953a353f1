"""A byte-level BPE tokenizer for the tiny family, trained on its own corpus, saved so `AutoTokenizer`
loads it offline.

Pre-tokenization: every digit is its own piece, together with a space before it (column arithmetic
stays learnable: " 473" is " 4", "7", "3"), then GPT-2's byte-level split. The vocabulary starts from the 256 bytes, so no text
is ever unknown: an unseen word ("Mondkalb", "supercalifragilistic") falls apart into known pieces
instead of becoming `<unk>`. Decoding gives back the exact text ("The answer is 731.").

Chat format (also stored as `chat_template`):

    <bos><|user|>What is 473 + 258?<|assistant|><think> We add ... </think> The answer is 731.<eos>

`<think>`/`</think>` are added tokens but not *special* ones (as in DeepSeek-R1), so
`decode(..., skip_special_tokens=True)` keeps them.
"""
from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
THINK_TOKENS = ["<think>", "</think>"]
PAD, BOS, EOS, UNK, USER, ASSISTANT = SPECIALS
VOCAB_SIZE = 768

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build(corpus: list[str], vocab_size: int = VOCAB_SIZE):
    """A `tokenizers.Tokenizer`: byte-level BPE trained on `corpus` (deterministic for a given corpus)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?[0-9]"), behavior="isolated"),  # one digit per piece (with its space)
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
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
