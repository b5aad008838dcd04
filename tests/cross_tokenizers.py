"""Tokenizers for the cross-tokenizer tests, built with `tokenizers` (no hub): character-level, pieces of 1–3
characters, byte-fallback BPE, byte-level BPE and a normalising (NFC) character-level one, each wrapped in
PreTrainedTokenizerFast with <pad>, <eos> and <unk> (or its own EOS name)."""

from __future__ import annotations

import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIALS = ["<pad>", "<eos>", "<unk>"]
TEXT = "abc 12+3=15; #héllo   wörld 🙂👍🏽 中文字 cafe\u0301 ok!\n"  # the character-level alphabet


Fast = transformers.PreTrainedTokenizerFast


def wrap(backend: Tokenizer, eos: str = "<eos>", specials: list[str] = SPECIALS) -> Fast:
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token=eos,
                                                unk_token="<unk>", additional_special_tokens=specials[3:],
                                                padding_side="left")


def char_level(chars: str = TEXT, nfc: bool = False, specials: list[str] = SPECIALS,
               eos: str = "<eos>") -> Fast:
    """One character a token; `nfc`: an NFC normaliser first (e + U+0301 reads as é)."""
    alphabet = sorted(set(chars) | ({"é"} if nfc else set()))
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + alphabet)}, unk_token="<unk>"))
    if nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return wrap(backend, eos, specials)


def pieces(extra: list[str], chars: str = TEXT, byte_fallback: bool = False) -> Fast:
    """BPE over the characters (or with `byte_fallback` over ASCII only, other characters as <0xNN> bytes) plus the
    `extra` pieces of 2–3 characters, each made by merging its prefix with its last character."""
    alphabet = sorted({c for c in chars if c.isascii() or not byte_fallback})
    vocab = SPECIALS + ([f"<0x{b:02X}>" for b in range(256)] if byte_fallback else []) + alphabet
    merges = []
    for piece in extra:
        for n in range(2, len(piece) + 1):
            if piece[:n] not in vocab:
                merges.append((piece[:n - 1], piece[n - 1]))
                vocab.append(piece[:n])
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges, byte_fallback=byte_fallback,
                                   unk_token=None if byte_fallback else "<unk>"))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()]) if byte_fallback \
        else decoders.Fuse()
    return wrap(backend)


def byte_level(corpus: list[str], vocab_size: int = 400, eos: str = "<|endoftext|>") -> Fast:
    """A GPT-2-style byte-level BPE trained on `corpus` (multi-byte characters split across tokens)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<pad>", eos, "<unk>"]
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
    return wrap(backend, eos, specials)
