"""Request routing across LLMServer replicas."""
