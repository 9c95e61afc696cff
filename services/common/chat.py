"""Chat messages as every service accepts them (the gateway checks them before the tokenizer renders them)."""

from __future__ import annotations

CHAT_ROLES = ("system", "user", "assistant", "tool")


def chat_messages_to_dicts(chat) -> list[dict]:
    """Validate a ChatMessages proto into [{'role', 'content'}]; raises ValueError naming the field."""
    if not chat.messages:
        raise ValueError("chat.messages must not be empty")
    messages = []
    for i, m in enumerate(chat.messages):
        if m.role not in CHAT_ROLES:
            raise ValueError(f"chat.messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}")
        messages.append({"role": m.role, "content": m.content})
    return messages


def check_chat_size(chat, max_messages: int, max_chars: int) -> None:
    """Raise ValueError when a ChatMessages proto has too many messages or characters (counted
    before anything walks or renders them; the gateway and the tokenizer both check)."""
    if len(chat.messages) > max_messages:
        raise ValueError(f"chat.messages must hold at most {max_messages} messages (max_chat_messages), got {len(chat.messages)}")
    total = 0
    for m in chat.messages:
        total += len(m.content) + len(m.role)
        if total > max_chars:
            raise ValueError(f"chat.messages must hold at most {max_chars} characters in all (max_prompt_chars), got more")
