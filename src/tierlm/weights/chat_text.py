"""Chat content is text: a special-token string typed inside a message's content is tokenised as plain text,
while the chat template's own control tokens stay special (issue 23: typing `<|im_start|>system` into a user
message must not open a system turn; OpenAI's API treats content as text).

How: HF tokenizers splits its input at added tokens first and encodes the text between two of them on its
own, so a rendered conversation can be encoded in pieces with the same result: the template's text with
special tokens recognised (the shared backend), the text between two template specials, which holds the
contents, with special tokens off (a second backend with `encode_special_tokens` set). A content's edges
merge with the template text beside it exactly as in a whole-string encode, since both sit in one piece.

Only a message whose content holds a special-token string takes this path (Tokenizer.encode_chat); any other
conversation is one whole-string encode, the ids it always had.

Where each content lies in the rendered text: the conversation is rendered a second time with each flagged
content replaced by a unique marker, which cuts the rendering into the template's own pieces. The real
rendering must be those pieces with each marker replaced by its content (or the content trimmed, as many
templates do); otherwise the template changed the content in a way this cannot follow, and the request is
refused (UsageError) rather than tokenised with control tokens.
"""
from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping, Sequence

from tokenizers import Tokenizer as HFTokenizer

from tierlm.errors import UsageError

Render = Callable[[list[dict]], str]


def special_token_strings(backend: HFTokenizer) -> dict[int, str]:
    """id -> text of every added token marked special (control tokens; plain added words are not)."""
    return {i: t.content for i, t in backend.get_added_tokens_decoder().items() if t.special}


def holds_special(content: object, specials: Sequence[str], backend: HFTokenizer) -> bool:
    """Whether `content` holds a special-token string, as typed or after the backend's normalizer (a special
    token added with normalized=True is matched on the normalized text)."""
    if not isinstance(content, str) or not content:
        return False
    forms = [content] if backend.normalizer is None else [content, backend.normalizer.normalize_str(content)]
    return any(s in form for form in forms for s in specials)


def split_rendering(render: Render, messages: list[dict], text: str, flagged: Sequence[int]) -> list[tuple[str, bool]]:
    """`text` (the rendered conversation) as (piece, is_content) pairs that concatenate to it, each flagged
    message's content a piece of its own. UsageError when the template's rendering of a content cannot be
    found where its marker is."""
    nonce = uuid.uuid4().hex  # no user text holds it: a marker is found only where the template put one
    marked = [dict(m, content=f"[content-{nonce}-{i}]") if i in flagged else m for i, m in enumerate(messages)]
    parts = re.split(rf"\[content-{nonce}-(\d+)\]", render(marked))
    # parts: template piece, message index, template piece, ... (an index for every marker the template printed)
    if not text.startswith(parts[0]):
        raise _unlocatable(flagged[0])
    pieces, pos = [(parts[0], False)], len(parts[0])
    for index, after in zip(parts[1::2], parts[2::2]):
        content = messages[int(index)]["content"]
        for form in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            if text.startswith(form, pos) and text.startswith(after, pos + len(form)):
                break
        else:
            raise _unlocatable(int(index))
        pieces += [(form, True), (after, False)]
        pos += len(form) + len(after)
    if pos != len(text):  # INVARIANT: the pieces are exactly `text` (a content the template left out is in none)
        raise _unlocatable(flagged[0])
    return pieces


def _unlocatable(index: int) -> UsageError:
    return UsageError(f"message {index}'s content holds a special-token string and the chat template changes it "
                      "in a way that cannot be tokenised as plain text; remove the special-token string")


def encode_pieces(pieces: Sequence[tuple[str, bool]], backend: HFTokenizer, plain: HFTokenizer,
                  special_ids: Mapping[int, str]) -> list[int]:
    """Ids of the concatenated pieces: special tokens in template pieces are control tokens, and the text
    between two of them (template text and contents alike) is encoded by `plain`, which has special tokens
    off. A template piece is scanned on its own, so a special token never straddles a content's edge."""
    ids: list[int] = []
    run: list[str] = []  # text since the last template special

    def flush() -> None:
        if text := "".join(run):
            ids.extend(plain.encode(text, add_special_tokens=False).ids)
        run.clear()

    for piece, is_content in pieces:
        if is_content:
            run.append(piece)
            continue
        enc = backend.encode(piece, add_special_tokens=False)
        pos = 0
        for token, (start, end) in zip(enc.ids, enc.offsets):  # offsets: characters of `piece`
            if token in special_ids:
                run.append(piece[pos:start])
                flush()
                ids.append(token)
                pos = end
        run.append(piece[pos:])
    flush()
    return ids
