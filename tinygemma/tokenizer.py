"""Gemma's tokenizer: SentencePiece BPE, from a ``tokenizer.model`` or from a GGUF vocabulary.

Gemma tokenizes with SentencePiece in BPE mode: byte fallback (a character missing from the
vocabulary becomes its UTF-8 bytes, ``<0xE2>`` ...), digits split one by one, no dummy prefix
(``"hi"`` and ``" hi"`` tokenize differently), no Unicode normalization, spaces written ``▁``.
BOS is always prepended.

Two sources, one tokenizer:

* A Hugging Face checkpoint folder ships ``tokenizer.model``, a serialized SentencePiece
  ``ModelProto``; SentencePiece loads it as it is.
* A GGUF file stores the vocabulary as three arrays (``tokenizer.ggml.tokens``, ``scores``,
  ``token_type``). We write them back into a ``ModelProto`` with the protobuf classes the
  sentencepiece wheel ships (``sentencepiece_model_pb2``, see :func:`build_model_proto`) and
  load that. Two GGUF traps: the whitespace-run pieces are stored with literal spaces
  (llama.cpp's spelling) and must be respelled ``▁▁``..., or SentencePiece never matches
  them; and ``<unk>`` is stored as a CONTROL piece, while SentencePiece needs exactly one
  UNKNOWN piece.

Control pieces (``<bos>``, ``<start_of_turn>``, ``<end_of_turn>``, ``<unused0>`` ...) are never
produced by SentencePiece's BPE from text. transformers treats them as special tokens that are
cut out of the text first (leftmost, longest match) and BPE runs on the text between them;
:meth:`Tokenizer.encode` does the same, so ``"<start_of_turn>user\\n"`` is three tokens:
``<start_of_turn>``, ``user``, ``\\n``. (Written as USER_DEFINED pieces, SentencePiece would
match them itself, but not ``<unk>``, the one UNKNOWN piece, and ``parse_special=False`` needs
them unmatched; so :class:`_SpecialFinder` cuts them out.)

One place where transformers and SentencePiece disagree: a run of more spaces than the longest
whitespace piece (31 in Gemma). SentencePiece takes the longest piece first (40 spaces: 31 + 9);
transformers merges pairwise (16 + 24). We follow transformers, the project's reference
(see :class:`_SpaceRuns`).
"""

from __future__ import annotations

import codecs
import heapq
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model

from .checkpoints.ggml import TokenizerKeys, TokenType

__all__ = ["Tokenizer", "StreamDecoder", "build_model_proto", "render_chat", "chat_parts",
           "check_unicode"]

# Piece types: GGUF's tokenizer.ggml.token_type (gguf.TokenType) numbers them as SentencePiece
# does (sentencepiece_model.proto, ModelProto.SentencePiece.Type).
UNKNOWN, CONTROL, USER_DEFINED, BYTE = (
    int(TokenType[name]) for name in ("UNKNOWN", "CONTROL", "USER_DEFINED", "BYTE"))
KIND_NAMES = {int(t): t.name.lower() for t in TokenType}

SPACE = "\u2581"  # '▁', SentencePiece's spelling of a space

GGUF_KEYS = (TokenizerKeys.LIST, TokenizerKeys.SCORES, TokenizerKeys.TOKEN_TYPE)


# ---------------------------------------------------------------------------------------------
# The SentencePiece ModelProto, through the protobuf classes sentencepiece ships
# ---------------------------------------------------------------------------------------------

def build_model_proto(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int],
                      *, unk_id: int, bos_id: int = -1, eos_id: int = -1, pad_id: int = -1,
                      add_dummy_prefix: bool = False) -> bytes:
    """A serialized SentencePiece BPE ``ModelProto`` for Gemma's settings.

    ``pieces`` must already be in SentencePiece's spelling (spaces as ``▁``) and ``types``
    hold exactly one UNKNOWN piece (at ``unk_id``). Only the fields that change how text is
    encoded matter to SentencePiece at run time (model type, byte fallback, the normalizer);
    the special ids and pieces are written too so that the model file is self-describing.
    """
    def piece_or_empty(i):
        return pieces[i] if 0 <= i < len(pieces) else ""

    proto = sp_model.ModelProto()
    add = proto.pieces.add  # one call per piece: the fastest way to fill 262K of them
    for piece, score, kind in zip(pieces, scores, types):
        add(piece=piece, score=score, type=kind)
    trainer = proto.trainer_spec
    trainer.model_type = sp_model.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    trainer.byte_fallback = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = unk_id, bos_id, eos_id, pad_id
    trainer.unk_piece, trainer.bos_piece, trainer.eos_piece, trainer.pad_piece = (
        piece_or_empty(i) for i in (unk_id, bos_id, eos_id, pad_id))
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"             # no Unicode normalization (no NFKC)
    normalizer.add_dummy_prefix = add_dummy_prefix
    normalizer.remove_extra_whitespaces = False  # keep every space
    normalizer.escape_whitespaces = True     # ' ' -> '▁'
    return proto.SerializeToString()


def _piece_types(model_proto: bytes) -> list[int]:
    """Each piece's type as the ModelProto states it (SentencePiece's API cannot tell a
    USER_DEFINED piece from a NORMAL one)."""
    return [piece.type for piece in sp_model.ModelProto.FromString(model_proto).pieces]


# ---------------------------------------------------------------------------------------------
# Reading a GGUF vocabulary
# ---------------------------------------------------------------------------------------------

def _gguf_metadata(source) -> Mapping:
    """The metadata of a GGUF file: given as the dict ``read_gguf`` gives, or as a path."""
    if isinstance(source, (str, os.PathLike)):
        from .checkpoints.gguf_header import read_gguf
        return read_gguf(os.fspath(source)).metadata
    if isinstance(source, Mapping):
        return source
    raise TypeError(f"from_gguf wants a GGUF metadata dict or a path, not {type(source).__name__}")


def _respell(piece: str, kind: int) -> str:
    """A GGUF piece in SentencePiece's spelling: literal spaces back to '▁'.

    llama.cpp writes the user-defined whitespace runs ("  ", "   " ...) with real spaces.
    SentencePiece matches pieces against the text after turning spaces into '▁', so a piece
    spelled with spaces would never match. Control and byte pieces are left alone.
    """
    if kind in (CONTROL, BYTE) or " " not in piece:
        return piece
    return piece.replace(" ", SPACE)


def _gguf_vocab(meta: Mapping):
    """(pieces, scores, types, special ids) from GGUF metadata, checked."""
    missing = [k for k in GGUF_KEYS if k not in meta]
    if missing:
        raise ValueError(f"the GGUF metadata has no {', '.join(missing)}: no vocabulary to build "
                         "a tokenizer from")
    model = meta.get(TokenizerKeys.MODEL, "llama")
    if model != "llama":
        raise ValueError(f"GGUF tokenizer model {model!r} is not a SentencePiece vocabulary "
                         "(Gemma's is 'llama')")
    tokens = list(meta[TokenizerKeys.LIST])
    scores = [float(s) for s in meta[TokenizerKeys.SCORES]]
    types = [int(t) for t in meta[TokenizerKeys.TOKEN_TYPE]]
    if not len(tokens) == len(scores) == len(types):
        raise ValueError(f"GGUF vocabulary arrays disagree in length: {len(tokens)} tokens, "
                         f"{len(scores)} scores, {len(types)} types")
    special = {name: meta.get(key) for name, key in
               (("unk", TokenizerKeys.UNK_ID), ("bos", TokenizerKeys.BOS_ID),
                ("eos", TokenizerKeys.EOS_ID), ("pad", TokenizerKeys.PAD_ID))}
    for name, i in special.items():
        if i is not None and not 0 <= int(i) < len(tokens):
            raise ValueError(f"GGUF {name} token id {i} is outside the vocabulary "
                             f"of {len(tokens)}")
    return tokens, scores, types, special


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------

class Tokenizer:
    """Text <-> Gemma token ids, matching transformers' Gemma tokenizer.

    Build it with :meth:`from_file` (``tokenizer.model``) or :meth:`from_gguf`.
    """

    def __init__(self, model_proto: bytes, source: str = "<model proto>",
                 piece_types: Sequence[int] | None = None,
                 special_text: Mapping[int, str] | None = None,
                 special_ids: Mapping[str, int | None] | None = None):
        """Load a serialized SentencePiece ModelProto.

        Usually called through :meth:`from_file` or :meth:`from_gguf`. ``piece_types`` (the
        SentencePiece type of every id, by default read from the ModelProto) saves parsing it;
        ``special_text`` maps control ids to the text that stands for them in a prompt (by
        default their piece); ``special_ids`` may pin bos/eos/pad (a GGUF states them),
        otherwise they are found by their piece.
        """
        self.source = source
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception:  # sentencepiece's RuntimeError/OSError says only where in its C++
            raise ValueError(f"{source}: not a valid SentencePiece model ({len(model_proto)} "
                             "bytes that do not parse as one)") from None
        # No copy of the model or list of the 262K pieces beside SentencePiece's own (they took
        # 27 MB): a piece is asked of SentencePiece when needed (decoded bytes are memoised).
        self._size = self.sp.get_piece_size()
        types = list(piece_types) if piece_types is not None else _piece_types(model_proto)
        self._build_tables(types, special_text or {})
        self._find_special_ids(special_ids or {})

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """From a SentencePiece ``tokenizer.model`` (or a folder holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such tokenizer.model")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise OSError(f"{path}: cannot read the tokenizer model ({e.strerror or e})") from None
        if not data:
            raise ValueError(f"{path}: the tokenizer model is empty")
        return cls(data, source=path)

    @classmethod
    def from_gguf(cls, source) -> "Tokenizer":
        """From a GGUF vocabulary: the file's metadata (a dict) or its path.

        The GGUF says which pieces are control/user-defined/byte; we rebuild the SentencePiece
        BPE model from that (see the module docstring for the two spelling traps).
        """
        meta = _gguf_metadata(source)
        tokens, scores, types, special = _gguf_vocab(meta)
        unk = special.pop("unk")
        if unk is None:
            unk = next((i for i, t in enumerate(tokens) if t == "<unk>"), None)
        if unk is None:
            raise ValueError("the GGUF vocabulary has no unknown token (tokenizer.ggml."
                             "unknown_token_id, or a '<unk>' piece); SentencePiece needs one")
        # SentencePiece wants exactly one UNKNOWN piece; GGUF marks <unk> as CONTROL.
        types = [UNKNOWN if i == unk else (CONTROL if t == UNKNOWN else t)
                 for i, t in enumerate(types)]
        pieces = [_respell(p, t) for p, t in zip(tokens, types)]
        _check_pieces(pieces)
        proto = build_model_proto(
            pieces, scores, types, unk_id=unk,
            **{f"{k}_id": (-1 if v is None else v) for k, v in special.items()},
            add_dummy_prefix=bool(meta.get(TokenizerKeys.ADD_PREFIX, False)))
        # A special piece is written in a prompt as its GGUF spelling (e.g. "<unk>").
        special_text = {i: tokens[i] for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)}
        return cls(proto, source="GGUF vocabulary", piece_types=types,
                   special_text=special_text, special_ids=special)

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece ``ModelProto`` (as SentencePiece holds it)."""
        return self.sp.serialized_model_proto()

    def state(self) -> dict:
        """What rebuilds this tokenizer without its source: ``Tokenizer(**tok.state())``
        (the loader caches a GGUF vocabulary's so)."""
        return {"model_proto": self.model_proto, "source": self.source,
                "piece_types": list(self._types), "special_text": dict(self._special_text),
                "special_ids": {"bos": self._bos, "eos": self._eos, "pad": self._pad}}

    def _build_tables(self, types: Sequence[int], special_text: Mapping[int, str]):
        """What each id decodes to, which ids are special, and how to find specials in text."""
        if len(types) != self._size:
            raise ValueError(f"{len(types)} piece types for {self._size} pieces")
        self._types = bytes(types)  # one byte per id: SentencePiece's piece type
        special = _ids_of_types(self._types, CONTROL, UNKNOWN)
        piece = self.sp.id_to_piece
        self._special_text = {i: special_text.get(i, piece(i)) for i in special}
        self._special_ids = frozenset(special)
        self._bytes = _Memo(lambda i: self._decoded_bytes(i, self._types[i]))  # per id, when
        # first decoded: 262K of them up front took ~0.1 s of every start
        self._special_by_text = {t: i for i, t in self._special_text.items() if t}
        self._special_finder = _SpecialFinder(self._special_by_text)
        space = self.sp.piece_to_id(SPACE)  # the unknown id when there is no '▁' piece
        self._space_runs = _SpaceRuns(piece, _ids_of_types(self._types, USER_DEFINED),
                                      space if piece(space) == SPACE else None)

    def _decoded_bytes(self, i: int, kind: int) -> bytes:
        """What id ``i`` contributes to decoded text, as UTF-8 bytes.

        Byte pieces give their one byte (so a character split over several byte pieces is
        reassembled), special pieces their literal text (as transformers' decode with
        ``skip_special_tokens=False``), other pieces their text with '▁' as a space.
        """
        if i in self._special_text:
            return self._special_text[i].encode("utf-8")
        piece = self.sp.id_to_piece(i)
        if kind == BYTE:
            return bytes([int(piece[3:5], 16)])  # "<0xE2>"
        return piece.replace(SPACE, " ").encode("utf-8")

    def _find_special_ids(self, pinned: Mapping[str, int | None]):
        """bos/eos/pad from the source's own statement, else by piece; chat-turn ids by piece."""
        names = {"bos": ("<bos>", "<s>"), "eos": ("<eos>", "</s>"), "pad": ("<pad>",)}
        ids = {}
        for name, candidates in names.items():
            ids[name] = pinned.get(name)
            if ids[name] is None:
                ids[name] = self._id_of(*candidates)
        self._bos, self._eos, self._pad = ids["bos"], ids["eos"], ids["pad"]
        self._start_of_turn = self._id_of("<start_of_turn>")
        self._end_of_turn = self._id_of("<end_of_turn>")

    def _id_of(self, *pieces: str) -> int | None:
        for piece in pieces:
            i = self._special_by_text.get(piece)
            if i is None:
                i = self.sp.piece_to_id(piece)
                if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i):
                    i = None
            if i is not None:
                return i
        return None

    # ---- the vocabulary -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def pad_id(self) -> int | None:
        return self._pad

    @property
    def start_of_turn_id(self) -> int | None:
        return self._start_of_turn

    @property
    def end_of_turn_id(self) -> int | None:
        return self._end_of_turn

    @property
    def stop_ids(self) -> frozenset[int]:
        """The ids that end generation: EOS, and ``<end_of_turn>`` (the end of a chat turn)."""
        return frozenset(i for i in (self._eos, self._end_of_turn) if i is not None)

    @property
    def special_ids(self) -> frozenset[int]:
        """The control (and unknown) ids: cut out of text whole, skipped on request in decode."""
        return self._special_ids

    def id_to_piece(self, i: int) -> str:
        """The piece of id ``i`` in SentencePiece's spelling (spaces as '▁')."""
        return self.sp.id_to_piece(self._check_id(i))

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a piece (SentencePiece spelling, or a special's text), None if absent."""
        return self._id_of(piece)

    def piece_kind(self, i: int) -> str:
        """What id ``i`` is: "normal", "control", "byte", "unknown", "user_defined" or "unused"
        (SentencePiece's piece types, as the tokenizer.model or the GGUF states them)."""
        return KIND_NAMES[self._types[self._check_id(i)]]

    def piece_score(self, i: int) -> float:
        """The BPE score of id ``i``: encoding merges first the pair that makes the
        highest-scoring piece."""
        return float(self.sp.GetScore(self._check_id(i)))

    def save_model(self, path: str | os.PathLike) -> None:
        """Write the SentencePiece model as a ``tokenizer.model`` file."""
        with open(path, "wb") as f:
            f.write(self.model_proto)

    def __repr__(self):
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"

    # ---- encode ---------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``, BOS first (unless ``add_bos=False``).

        Special pieces written in the text (``<start_of_turn>``, ``<bos>`` ...) become their
        single id, as in transformers; so text that already starts with ``"<bos>"`` gets a
        second BOS unless ``add_bos=False``. With ``parse_special=False`` they are ordinary
        text (``<``, ``end``, ``_``, ... as llama.cpp's ``parse_special=false``): for text from
        a user, who must not be able to close their turn and write the model's.

        Text that is not valid Unicode (a lone surrogate such as ``"\ud800"``, or the
        ``"\udcff"`` Python makes of an invalid UTF-8 byte on the command line) is refused
        with a ValueError naming its position; it is never replaced silently.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() wants a str, not {type(text).__name__}")
        check_unicode(text)
        ids = [self._bos] if add_bos and self._bos is not None else []
        if not parse_special:
            return ids + self._encode_plain(text)
        for chunk in self._special_finder.split(text):
            if isinstance(chunk, int):
                ids.append(chunk)
            else:
                ids.extend(self._encode_plain(chunk))
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        """BPE of text holding no special piece; long space runs cut as transformers does."""
        ids = []
        for part in self._space_runs.split(text):
            ids.extend(part if isinstance(part, list) else self.sp.encode(part))
        return ids

    # ---- decode ---------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``.

        As transformers' ``decode``: special pieces appear as their text (``<bos>``,
        ``<end_of_turn>``) unless ``skip_special_tokens``; byte pieces are joined into
        characters. Malformed UTF-8 (e.g. a character cut short) becomes U+FFFD.
        ``decode(encode(t)[1:]) == t`` for every string ``t`` without a literal '▁' (which
        is SentencePiece's space, so it comes back as ' ', as in transformers).
        """
        stream = self.stream_decoder(skip_special_tokens)
        return "".join(stream.push(i) for i in ids) + stream.flush()

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        """An incremental decoder for generation (see :class:`StreamDecoder`)."""
        return StreamDecoder(self, skip_special_tokens)

    def _check_id(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"token ids are ints, not {type(i).__name__} ({i!r})")
        i = int(i)
        if not 0 <= i < self._size:
            raise ValueError(f"token id {i} is outside the vocabulary (0..{self._size - 1})")
        return i

    # ---- chat -----------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
                            tokenize: bool = True, parse_special: bool = False
                            ) -> list[int] | str:
        """A conversation in Gemma's chat format, as ids (one BOS) or as the string.

        ``<bos><start_of_turn>user\\n{content}<end_of_turn>\\n<start_of_turn>model\\n{content}``
        ``<end_of_turn>\\n`` ... and, with ``add_generation_prompt``, a final
        ``<start_of_turn>model\\n`` for the model to continue. This is the official Gemma 3
        template:

        * roles are ``user`` and ``model`` (``assistant`` is accepted as ``model``), strictly
          alternating, starting with ``user``;
        * each message's content is stripped of surrounding whitespace;
        * Gemma has no system role: a ``system`` message, allowed only first, is folded into
          the first user turn as ``system_content + "\\n\\n"`` before that turn's (stripped)
          content. As in the official template, the system text itself is not stripped.

        The string starts with ``"<bos>"``; the ids are the string's tokens without adding
        another BOS, so they hold exactly one (the double-BOS trap).

        The messages' content is text: ``"<end_of_turn>"`` typed by a user is the pieces
        ``<``, ``end``, ... , not the control token, so a user cannot close their turn and
        write the model's (llama.cpp's ``parse_special=false``). ``parse_special=True`` parses
        control pieces in the content too, as transformers' template does (it tokenizes the
        rendered string); the ids differ only for content that spells a control piece. The
        string (``tokenize=False``) is the same either way.
        """
        bos = self._special_text.get(self._bos, "<bos>") if self._bos is not None else ""
        parts = chat_parts(messages, add_generation_prompt, bos)
        text = "".join(part for part, _ in parts)
        if not tokenize:
            return text
        if parse_special:  # transformers: the rendered string, control pieces parsed anywhere
            return self.encode(text, add_bos=False)
        # The template's control pieces by id; the text between them (content included) as text.
        return [i for part, control in parts
                for i in self.encode(part, add_bos=False, parse_special=control)]


def _ids_of_types(types: bytes, *kinds: int) -> list[int]:
    """The ids whose type (one byte per id) is one of ``kinds``, in order: a regular
    expression scans the 262K bytes in C, where a Python loop took ~30 ms at every start."""
    return [m.start() for m in re.finditer(b"[" + re.escape(bytes(kinds)) + b"]", types)]


class _Memo(dict):
    """``memo[i]`` is ``make(i)``, computed when first asked for."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, i):
        value = self[i] = self.make(i)
        return value


class StreamDecoder:
    """Incremental detokenizer for generation: ``push(id)`` returns the text now complete.

    Each id adds its bytes (:meth:`Tokenizer._decoded_bytes`) to an incremental UTF-8 decoder,
    so a character spread over several byte-fallback pieces (an emoji is four ``<0x..>``
    pieces) is held back until its last byte arrives and then comes out whole. ``flush()``
    ends the stream (an unfinished character becomes U+FFFD). The pieces joined equal
    ``tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        tok = self.tokenizer
        i = tok._check_id(token_id)
        if self.skip_special_tokens and i in tok._special_ids:
            return ""
        return self._utf8.decode(tok._bytes[i])

    def flush(self) -> str:
        """The text still held back (an unfinished character as U+FFFD); resets the decoder."""
        tail = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return tail


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _check_pieces(pieces: Sequence[str]) -> None:
    """SentencePiece refuses empty or repeated pieces with a C++ message; say which."""
    if len(set(pieces)) == len(pieces) and all(pieces):
        return
    seen = {}
    for i, p in enumerate(pieces):
        if not p:
            raise ValueError(f"vocabulary piece {i} is empty")
        j = seen.setdefault(p, i)
        if j != i:
            raise ValueError(f"vocabulary pieces {j} and {i} are both {p!r}")


class _SpecialFinder:
    """Cuts text at special pieces: leftmost, longest match, as transformers' added tokens.

    6K control pieces make one big regex alternation slow to compile (~0.6 s), so a
    character class finds where a special piece may start and a set lookup per candidate
    length confirms it.
    """

    def __init__(self, special_by_text: Mapping[str, int]):
        self.ids = dict(special_by_text)
        lengths: dict[str, set[int]] = {}
        for text in self.ids:
            lengths.setdefault(text[0], set()).add(len(text))
        self.lengths = {c: sorted(ls, reverse=True) for c, ls in lengths.items()}
        self.starts = (re.compile("[" + "".join(map(re.escape, sorted(self.lengths))) + "]")
                       if self.ids else None)

    def split(self, text: str) -> list[str | int]:
        """Plain text runs (str) and special ids (int), in order."""
        if self.starts is None:
            return [text] if text else []
        out, done, pos = [], 0, 0
        while (m := self.starts.search(text, pos)) is not None:
            i = m.start()
            match = next((text[i:i + n] for n in self.lengths[text[i]]
                          if text[i:i + n] in self.ids), None)
            if match is None:
                pos = i + 1
                continue
            if i > done:
                out.append(text[done:i])
            out.append(self.ids[match])
            done = pos = i + len(match)
        if done < len(text):
            out.append(text[done:])
        return out


class _SpaceRuns:
    """The ids transformers gives a run of spaces longer than the longest whitespace piece.

    Gemma's vocabulary has user-defined pieces for runs of 2..31 spaces. SentencePiece (and
    llama.cpp) match them longest first: 40 spaces -> 31 + 9. transformers' Gemma tokenizer
    keeps them as ordinary BPE vocabulary whose merges rank before every other merge, so a
    long run is merged pairwise: 40 spaces -> 16 + 24, and 32 spaces before "y" give
    16 + 16 + "y" where SentencePiece gives 31 + "▁y". Runs up to the longest piece agree.
    We follow transformers (the project's reference): such a run is cut out of the text and
    merged here by the same rule -- the pair whose merged piece has the lowest id first, then
    the longer left part, then the leftmost.
    """

    def __init__(self, piece: Callable[[int], str], user_defined: Iterable[int],
                 space: int | None):
        """``piece(id)``: a piece's spelling; ``user_defined``: those ids; ``space``: the id of
        the piece '▁' (None if there is none)."""
        # The runs are user-defined pieces (a few hundred ids); their spelling gives the length.
        self.ids = {len(piece(i)): i for i in user_defined
                    if len(piece(i)) > 1 and set(piece(i)) == {SPACE}}
        # A lone space left over would merge with the next character in transformers; with
        # Gemma's pieces (every run from 2 to 31) a long run never leaves one.
        self.ids[1] = space
        shortest = max(self.ids) + 1  # the shortest run that needs cutting
        self.active = shortest > 2 and self.ids[1] is not None
        self.needle = " " * shortest
        self.pattern = re.compile(" {%d,}" % shortest)
        self._cache: dict[int, list[int]] = {}

    def split(self, text: str) -> list[str | list[int]]:
        """Text runs (str) and the ids of long space runs (list), in order."""
        if not self.active or self.needle not in text:
            return [text]
        out, done = [], 0
        for m in self.pattern.finditer(text):
            if m.start() > done:
                out.append(text[done:m.start()])
            out.append(self.run_ids(m.end() - m.start()))
            done = m.end()
        if done < len(text):
            out.append(text[done:])
        return out

    def run_ids(self, n: int) -> list[int]:
        if n not in self._cache:
            self._cache[n] = [self.ids[k] for k in self.merge(n)]
        return list(self._cache[n])

    def merge(self, n: int) -> list[int]:
        """BPE over n single spaces with only the whitespace merges; returns the run lengths.

        The usual BPE loop: a heap of adjacent pairs keyed by merge rank then position; a
        popped pair is stale if either side has been merged since.
        """
        length = [1] * n                      # run length starting at each position (0: gone)
        nxt = list(range(1, n + 1))           # the next live position (n: the end)
        prv = list(range(-1, n - 1))
        heap = []

        def push(p):
            q = nxt[p] if p >= 0 else n
            if p >= 0 and q < n and length[p] + length[q] in self.ids:
                a, b = length[p], length[q]
                heapq.heappush(heap, (self.ids[a + b], -a, p, a, b))

        for p in range(n - 1):
            push(p)
        while heap:
            _, _, p, a, b = heapq.heappop(heap)
            q = nxt[p]
            if length[p] != a or q >= n or length[q] != b:
                continue  # stale
            length[p], length[q] = a + b, 0
            nxt[p] = nxt[q]
            if nxt[q] < n:
                prv[nxt[q]] = p
            push(prv[p])
            push(p)
        return [k for k in length if k]


def _content(message: Mapping, index: int) -> str | list[str]:
    """A message's text: a str, or a list of ``{"type": "text", "text": ...}`` parts; checked
    to be valid Unicode (the position named within the message)."""
    content = message.get("content")
    if isinstance(content, list):
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ValueError(f"message {index}: only text content is supported "
                                 f"(got part {part!r})")
        content = [part["text"] for part in content]
    elif not isinstance(content, str):
        raise ValueError(f"message {index}: content must be a str (got {type(content).__name__})")
    for text in content if isinstance(content, list) else [content]:
        try:
            check_unicode(text)
        except ValueError as e:
            raise ValueError(f"message {index}: {e}") from None
    return content


def _stripped(content) -> str:
    """Content stripped as the template's ``| trim`` (each text part on its own)."""
    if isinstance(content, list):
        return "".join(t.strip() for t in content)
    return content.strip()


def check_unicode(text: str) -> None:
    """Refuse text that cannot be UTF-8 (a lone surrogate), naming the position.

    Python gives an invalid UTF-8 byte on the command line (and on stdin read with
    ``errors="surrogateescape"``) as a lone surrogate U+DC80..U+DCFF: that one is named as
    the byte it was.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = (f"the byte 0x{c - 0xDC00:02X}, which is not valid UTF-8," if 0xDC80 <= c <= 0xDCFF
                else f"a lone surrogate U+{c:04X}")
        raise ValueError(f"the text is not valid Unicode: {what} at character {e.start}"
                         ) from None


def render_chat(messages: Sequence[Mapping], add_generation_prompt: bool = True,
                bos: str = "<bos>") -> str:
    """The Gemma chat string (see :meth:`Tokenizer.apply_chat_template`)."""
    return "".join(part for part, _ in chat_parts(messages, add_generation_prompt, bos))


def chat_parts(messages: Sequence[Mapping], add_generation_prompt: bool = True,
               bos: str = "<bos>") -> list[tuple[str, bool]]:
    """The Gemma chat string in parts: ``(piece, True)`` for the template's control pieces
    (``<bos>``, ``<start_of_turn>``, ``<end_of_turn>``), ``(text, False)`` for the text between
    them (a role, a message's content, newlines). Joined, they are :func:`render_chat`'s
    string; kept apart, a message that spells ``"<end_of_turn>"`` is tokenized as text."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content': {m!r}")
    if not messages:
        raise ValueError("no messages: a conversation needs at least one user message")
    prefix, turns = "", list(enumerate(messages))
    if turns and turns[0][1]["role"] == "system":
        system = _content(turns[0][1], 0)
        # As the official template: not stripped; of a list of parts, the first one's text.
        prefix = (system if isinstance(system, str) else (system or [""])[0]) + "\n\n"
        turns = turns[1:]
        if not turns:
            raise ValueError("a system message must be followed by a user message "
                             "(Gemma folds it into the first user turn)")
    parts = [(bos, True)]
    for n, (i, m) in enumerate(turns):
        role = {"assistant": "model"}.get(m["role"], m["role"])
        if role == "system":
            raise ValueError(f"message {i}: a system message is allowed only first "
                             "(Gemma has no system role; it is folded into the first user turn)")
        if role not in ("user", "model"):
            raise ValueError(f"message {i}: unknown role {m['role']!r} "
                             "(Gemma knows user and model/assistant)")
        expected = "user" if n % 2 == 0 else "model"
        if role != expected:
            raise ValueError(f"message {i}: roles must alternate user/model starting with user; "
                             f"expected {expected}, got {m['role']!r}")
        text = _stripped(_content(m, i))
        parts += [("<start_of_turn>", True), (f"{role}\n{prefix if n == 0 else ''}{text}", False),
                  ("<end_of_turn>", True), ("\n", False)]
    if add_generation_prompt:
        parts += [("<start_of_turn>", True), ("model\n", False)]
    return parts
