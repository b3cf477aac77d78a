"""WordPiece tokenizer: trained on the catalogue's own texts, or a pretrained one from a local folder.

Either way it is held as a `tokenizers.Tokenizer` and saved as one tokenizer.json (pure data).
`encode` always lays a product out as [CLS] tokens... [SEP] [PAD]..., fixed length; an empty text
is just [CLS] [SEP].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer as _Tokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from pipeline.errors import UserError

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class Tokenizer:
    def __init__(self, tok: _Tokenizer):
        self.tok = tok
        tok.no_padding()
        tok.no_truncation()
        ids = [tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]")]
        if None in ids:
            missing = [t for t, i in zip(("[PAD]", "[CLS]", "[SEP]"), ids) if i is None]
            raise UserError(f"tokenizer lacks {' '.join(missing)}")
        self.pad_id, self.cls_id, self.sep_id = ids

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both int64 (B, max_length)."""
        ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), max_length), dtype=np.int64)
        for i, enc in enumerate(self.tok.encode_batch([t or "" for t in texts], add_special_tokens=False)):
            row = [self.cls_id, *enc.ids[: max_length - 2], self.sep_id]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask

    def word_starts(self, ids: np.ndarray) -> np.ndarray:
        """Per token id: True where it starts a word (not a WordPiece continuation such as "##s")."""
        prefix = getattr(self.tok.model, "continuing_subword_prefix", None) or "##"
        return np.array([not (self.tok.id_to_token(int(i)) or "").startswith(prefix) for i in ids], bool)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """A tokenizer.json file, or a local pretrained folder (tokenizer.json, or vocab.txt for BERT)."""
        path = Path(path)
        if path.is_dir() and (path / "tokenizer.json").exists():
            path = path / "tokenizer.json"
        if path.is_file():
            return cls(_Tokenizer.from_file(str(path)))
        from transformers import AutoTokenizer  # a folder with only vocab.txt & co.: convert to fast

        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
        return cls(hf.backend_tokenizer)


def checkpoint_tokenizer(folder: str | Path, max_length: int, extra_positions: int = 0) -> Tokenizer:
    """The tokenizer of a Hugging Face BERT folder, checked against its config: every id the
    tokenizer can emit has a row in the embedding matrix, [PAD] [CLS] [SEP] [UNK] exist, [PAD] is
    the model's pad id, and max_length (+ MMBT's image tokens) fits the position embeddings."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"text checkpoint {folder}: no readable config.json ({exc})") from None
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        raise UserError(f"text checkpoint {folder}: no tokenizer.json or vocab.txt (the tokenizer must come "
                        "with the checkpoint: its ids index the embedding matrix)")
    tok = Tokenizer.load(folder)
    where = f"text checkpoint {folder}"
    if tok.tok.token_to_id("[UNK]") is None:
        raise UserError(f"{where}: tokenizer lacks [UNK]")
    vocab = config.get("vocab_size")
    if vocab is None or tok.vocab_size > vocab:
        raise UserError(f"{where}: tokenizer has {tok.vocab_size} tokens but the model's embeddings have "
                        f"{vocab} rows (tokenizer and weights do not belong together)")
    pad = config.get("pad_token_id")
    if pad is not None and pad != tok.pad_id:
        raise UserError(f"{where}: [PAD] is id {tok.pad_id} in the tokenizer but {pad} in config.json")
    positions = config.get("max_position_embeddings", 512)
    if max_length + extra_positions > positions:
        raise UserError(f"{where}: max_length {max_length} + {extra_positions} image tokens exceed its "
                        f"{positions} position embeddings")
    return tok


def _wordpiece(vocab: dict[str, int]) -> _Tokenizer:
    tok = _Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """A WordPiece vocabulary of at most vocab_size tokens, the same for the same texts.

    Not the `tokenizers` trainer: it breaks ties between equally frequent merges in hash-map
    order, so its vocabulary (hence the ids and the model's initial weights) changes from run to
    run. This builder counts normalised words and ranks, by frequency then string, whole words
    and word endings ("##ing", "##s": what WordPiece learns first for catalogue text); every
    character seen is kept, in both positions, so a word is never [UNK] once it was spelled.
    """
    norm = _wordpiece({t: i for i, t in enumerate(SPECIAL)})
    words: dict[str, int] = {}
    for text in texts:
        if text:
            for word, _ in norm.pre_tokenizer.pre_tokenize_str(norm.normalizer.normalize_str(text)):
                words[word] = words.get(word, 0) + 1
    chars = {c for w in words for c in w}
    candidates: dict[str, int] = {}
    for word, n in words.items():
        if len(word) > 1:
            candidates[word] = candidates.get(word, 0) + n
        for k in range(2, min(5, len(word))):
            candidates["##" + word[-k:]] = candidates.get("##" + word[-k:], 0) + n
    ranked = sorted((t for t, n in candidates.items() if n >= min_frequency), key=lambda t: (-candidates[t], t))
    base = sorted(chars) + sorted("##" + c for c in chars)
    keep = base + ranked[: max(0, vocab_size - len(SPECIAL) - len(base))]
    return Tokenizer(_wordpiece({t: i for i, t in enumerate(SPECIAL + sorted(keep))}))
