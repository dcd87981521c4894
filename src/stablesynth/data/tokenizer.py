"""BERT-uncased question tokenizer, loaded offline from the MiniLM package's files.

all-MiniLM-L6-v2 uses BERT-base-uncased's WordPiece vocabulary (30,522 ids,
``[CLS]`` = 101, ``[SEP]`` = 102, ``[PAD]`` = 0), which is the vocabulary of the
BERT embedding layer the encoder's text side expects. Loading goes through the
``tokenizers`` library from a local path only, so nothing can reach a model hub.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from stablesynth.assets import minilm_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BERT_VOCAB_SIZE = 30522
CLS_ID = 101
SEP_ID = 102
PAD_ID = 0


class QuestionTokenizer:
    """Encode questions to fixed-length BERT ids; padding to ``max_length`` keeps batches stackable."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else minilm_dir()
        tok_json = self.path / "tokenizer.json"
        vocab = self.path / "vocab.txt"
        if tok_json.is_file():
            self._tok = Tokenizer.from_file(str(tok_json))
        elif vocab.is_file():
            self._tok = BertWordPieceTokenizer(str(vocab), lowercase=True)._tokenizer
        else:
            raise FileNotFoundError(f"no tokenizer.json or vocab.txt under {self.path}")
        # The shipped file pads/truncates to 128; every call below sets its own length instead.
        self._tok.no_padding()
        self._tok.no_truncation()
        self._configured: int | None = None

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def encode(self, questions: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Questions → ``(input_ids, attention_mask)``, both long ``[len(questions), max_length]``.

        Longer questions are truncated (``[SEP]`` kept last); shorter ones are right-padded with 0.
        """
        if isinstance(questions, str):
            raise TypeError("encode expects a sequence of questions, not a single string")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
        if self._configured != max_length:
            self._tok.enable_truncation(max_length=max_length)
            self._tok.enable_padding(length=max_length, pad_id=PAD_ID, pad_token="[PAD]")
            self._configured = max_length
        if not questions:
            empty = torch.zeros(0, max_length, dtype=torch.long)
            return empty, empty.clone()
        encs = self._tok.encode_batch([str(q) for q in questions])
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.long)
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


@functools.lru_cache(maxsize=2)
def load_tokenizer(path: str | None = None) -> QuestionTokenizer:
    """The project's question tokenizer (cached per process)."""
    return QuestionTokenizer(path)
