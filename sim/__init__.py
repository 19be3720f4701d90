"""The simulated LLM provider: a real HTTP/2 + HTTP/1.1 server on loopback."""
