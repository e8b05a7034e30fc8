"""Adapters for LLM frameworks, each an optional extra: `langchain` (LangChain), `llamaindex` (LlamaIndex)."""
