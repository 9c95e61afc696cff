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
