"""chatsessions: chat-session history for LLM and RAG applications."""

__version__ = "0.1.0"
