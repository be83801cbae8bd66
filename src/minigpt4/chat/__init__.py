"""Chatting with MiniGPT-4: conversation templates, generation, and the `Chat` session."""

from minigpt4.chat.generation import Completion, GenerationSettings, generate, stream, stream_batch
from minigpt4.chat.session import Chat
from minigpt4.chat.templates import ConversationTemplate, Message, get_template

__all__ = [
    "Chat",
    "Completion",
    "ConversationTemplate",
    "GenerationSettings",
    "Message",
    "generate",
    "get_template",
    "stream",
    "stream_batch",
]
