"""The chat template (ChatML), written in exactly one place.

A conversation is rendered as

    <|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n...

`render` returns the token ids and, computed in the same pass, the SFT loss mask: 1 on each assistant's content
tokens and on the `<|im_end|>` that closes its turn (so the model learns to stop), 0 on everything else (role
headers, the newline after `<|im_end|>`, system and user turns).

Special-token ids are appended directly (looked up by name in the tokenizer, so any ChatML vocabulary works);
headers and contents go through the ordinary encoder piece by piece.
So text can never produce a control token, and a message's tokens never merge with its header's. The price:
the ids can differ from encoding the whole template string at once (e.g. "\\n" + "Hello" here vs "\\nHello"
there); decoding them still gives the template text exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from tokenizers import Tokenizer

from lillm.tokenizer import IM_END_TOKEN, IM_START_TOKEN, BPETokenizer, encode_ordinary, special_tokens

CHAT_TEMPLATE_VERSION = 1  # bump when the rendered format changes; checkpoints record it
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")


class _Control(str):
    """A piece of the template that is a control token, not text to encode."""


IM_START, IM_END = _Control(IM_START_TOKEN), _Control(IM_END_TOKEN)

# A rendered conversation is a sequence of pieces: a control token or a text, each with its mask value.
Piece = tuple[str, int]


def _pieces(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool, system: str | None) -> Iterator[Piece]:
    """The template, as pieces. Validates the messages first, so bad input fails before any encoding."""
    messages = _validated(messages, system)
    for message in messages:
        is_assistant = int(message["role"] == "assistant")
        yield IM_START, 0
        yield f"{message['role']}\n", 0
        yield message["content"], is_assistant
        yield IM_END, is_assistant
        yield "\n", 0
    if add_generation_prompt:
        yield IM_START, 0
        yield "assistant\n", 0


def _validated(messages: Sequence[Mapping[str, str]], system: str | None) -> list[Mapping[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or len(messages) == 0:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r:.80}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"message {i} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if role == "system" and i > 0:
            raise ValueError(f"message {i} is a system message; only the first message may be one")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise ValueError(f"message {i} ({role}) content is empty")
    if system is not None and messages[0]["role"] != "system":
        if not isinstance(system, str) or not system.strip():
            raise ValueError(f"system must be a non-empty string, got {system!r:.80}")
        return [{"role": "system", "content": system}, *messages]
    return list(messages)


def render(
    tokenizer: Tokenizer | BPETokenizer,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = False,
    system: str | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its assistant mask (same length).

    `system`: a system message to prepend when `messages` has none (e.g. DEFAULT_SYSTEM_PROMPT).
    `add_generation_prompt`: end with "<|im_start|>assistant\\n" so the model writes the next reply.
    """
    specials = special_tokens(tokenizer)
    control_id = {IM_START: specials.im_start, IM_END: specials.im_end}
    ids: list[int] = []
    mask: list[int] = []
    for piece, mask_value in _pieces(messages, add_generation_prompt, system):
        piece_ids = [control_id[piece]] if isinstance(piece, _Control) else encode_ordinary(tokenizer, piece)
        ids.extend(piece_ids)
        mask.extend([mask_value] * len(piece_ids))
    return ids, mask


def render_text(
    messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False, system: str | None = None
) -> str:
    """The template as a string: what `decode(render(...)[0])` gives back. For display and tests."""
    return "".join(piece for piece, _ in _pieces(messages, add_generation_prompt, system))
